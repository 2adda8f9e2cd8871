import json

import pytest

from retro_peft.errors import InputError
from retro_peft.index import ChunkingConfig, load_documents
from retro_peft.index.chunking import chunk_documents
from retro_peft.qa import load_qa, squad_doc_id

from conftest import SQUAD


def test_reads_text_folders_jsonl_and_squad(corpus):
    docs = load_documents([corpus / "docs", corpus / "more.jsonl", SQUAD])
    by_id = {d.id: d for d in docs}
    assert by_id["cats.md"].metadata["title"] == "Cats"
    assert by_id["rust.txt"].metadata["title"] == "rust"
    assert by_id["volcano"].metadata == {"title": "Volcano", "topic": "geo"}
    assert by_id[squad_doc_id("Normans", 0)].metadata == {"title": "Normans"}
    assert sum(i.startswith("Normans/") for i in by_id) == 39
    assert len(docs) == 2 + 3 + 173


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": broken}\n', "bad.jsonl:2: malformed JSON"),
        ('{"text": "ok"}\n{"title": "no text"}\n', "bad.jsonl:2: each line needs a 'text'"),
    ],
)
def test_malformed_jsonl_names_the_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(InputError, match=message):
        load_documents([tmp_path / "bad.jsonl"])


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="input not found"):
        load_documents([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(InputError, match="corpus is empty"):
        load_documents([tmp_path / "empty.txt"])
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(InputError, match="unsupported input"):
        load_documents([tmp_path / "x.pdf"])
    (tmp_path / "a.json").write_text(json.dumps({"not": "squad"}))
    with pytest.raises(InputError, match="not SQuAD"):
        load_documents([tmp_path / "a.json"])


def test_chunks_respect_token_budget_overlap_and_stable_ids(encoder):
    text = " ".join(f"Sentence number {i} talks about topic {i % 7} in some detail." for i in range(60))
    from retro_peft.index import Document

    docs = [Document("long", text, {"title": "Long"})]
    config = ChunkingConfig(chunk_tokens=64, overlap=16)
    chunks = chunk_documents(docs, encoder.tokenizer, config)
    assert len(chunks) > 5
    for c in chunks:
        assert len(encoder.tokenizer(c.text, add_special_tokens=False)["input_ids"]) <= 64
        assert c.text in text and c.metadata == {"title": "Long"}
    # consecutive chunks overlap, and together they cover the document
    for a, b in zip(chunks, chunks[1:]):
        assert a.text[-20:] in text[: text.index(b.text) + len(b.text)]
        assert text.index(b.text) < text.index(a.text) + len(a.text)
    assert chunks[0].text.startswith("Sentence number 0") and text.rstrip(".").endswith(chunks[-1].text.rstrip("."))
    again = chunk_documents(docs, encoder.tokenizer, config)
    assert [c.id for c in again] == [c.id for c in chunks]
    assert len({c.id for c in chunks}) == len(chunks)


@pytest.mark.parametrize("tokens, overlap", [(0, 0), (32, 32), (32, -1)])
def test_invalid_chunking(tokens, overlap):
    with pytest.raises(InputError):
        ChunkingConfig(tokens, overlap).validate()


def test_qa_files(tmp_path):
    items = load_qa(SQUAD, articles=slice(3, 5))
    assert len(items) == 457 and sum(not i.is_impossible for i in items) == 232
    assert all(i.gold_doc_ids[0].split("/")[0] in {"Sky_(United_Kingdom)", "Victoria_(Australia)"} for i in items)
    (tmp_path / "qa.jsonl").write_text('{"question": "Why?", "answers": ["because"]}\n{"question": "Q2", "answers": []}\n')
    with pytest.raises(InputError, match="qa.jsonl:2: question has no answers"):
        load_qa(tmp_path / "qa.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="holds no questions"):
        load_qa(tmp_path / "empty.jsonl")


def _squad(paragraph=None, qa=None, article=None):
    qa = {"id": "q1", "question": "Who?", "answers": [{"text": "Rollo", "answer_start": 0}], **(qa or {})}
    paragraph = {"context": "Rollo led the Normans.", "qas": [qa], **(paragraph or {})}
    return {"data": [{"title": "Normans", "paragraphs": [paragraph]} if article is None else article]}


_NO_CONTEXT = _squad()
del _NO_CONTEXT["data"][0]["paragraphs"][0]["context"]
_NO_QUESTION = _squad()
del _NO_QUESTION["data"][0]["paragraphs"][0]["qas"][0]["question"]


@pytest.mark.parametrize(
    "obj, message",
    [
        (_NO_CONTEXT, r"article 0 \('Normans'\), paragraph 0: each paragraph needs a 'context' string"),
        (_squad(paragraph={"context": 5}), r"paragraph 0: each paragraph needs a 'context' string"),
        (_squad(article="Normans"), r"article 0: expected an object with 'title' and 'paragraphs'"),
        (_squad(article={"title": "Normans", "paragraphs": "text"}), r"article 0 \('Normans'\): 'paragraphs' must be a list"),
        (_NO_QUESTION, r"paragraph 0, question 0: needs a non-empty 'question' string"),
        (_squad(qa={"answers": ["Rollo"]}), r"question 0: 'answers' must be a list of objects with a 'text' string"),
        (_squad(qa={"is_impossible": "false"}), r"question 0: 'is_impossible' must be true or false, got 'false'"),
    ],
)
def test_malformed_squad_qa_files_name_the_article_paragraph_and_field(tmp_path, obj, message):
    (tmp_path / "bad.json").write_text(json.dumps(obj))
    with pytest.raises(InputError, match=message):
        load_qa(tmp_path / "bad.json")


@pytest.mark.parametrize("obj", [_NO_CONTEXT, _squad(paragraph={"context": 5}), _squad(article="Normans")])
def test_malformed_squad_documents_name_the_article_and_paragraph(tmp_path, obj):
    (tmp_path / "bad.json").write_text(json.dumps(obj))
    with pytest.raises(InputError, match=r"bad\.json: article 0"):
        load_documents([tmp_path / "bad.json"])


@pytest.mark.parametrize(
    "line, message",
    [
        ({"question": "Q", "answers": ["a"], "gold_doc_ids": 5}, "qa.jsonl:1: 'gold_doc_ids' must be a list of document ids"),
        ({"question": "Q", "answers": ["a"], "gold_doc_ids": [{"id": "d"}]}, "qa.jsonl:1: 'gold_doc_ids' must be a list"),
        ({"question": "Q", "answers": [], "is_impossible": "false"},
         "qa.jsonl:1: 'is_impossible' must be true or false, got 'false'"),
    ],
)
def test_malformed_jsonl_qa_fields_name_the_line_and_field(tmp_path, line, message):
    (tmp_path / "qa.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(InputError, match=message):
        load_qa(tmp_path / "qa.jsonl")


def test_well_formed_qa_fields_still_load(tmp_path):
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "Q", "answers": ["a"], "gold_doc_ids": ["d", 7]}) + "\n"
                                       + json.dumps({"question": "R", "is_impossible": True, "gold_doc_ids": "e"}) + "\n")
    first, second = load_qa(tmp_path / "qa.jsonl")
    assert first.gold_doc_ids == ("d", "7") and not first.is_impossible
    assert second.is_impossible and second.gold_doc_ids == ("e",)
    (tmp_path / "ok.json").write_text(json.dumps(_squad(qa={"is_impossible": False})))
    assert load_qa(tmp_path / "ok.json")[0].answers == ("Rollo",)
