"""Contrastive retriever training (`train_retriever`, `retro-peft train-retriever`) and re-embedding with the result."""

import json
import shutil

import numpy as np
import pytest

from retro_peft.cli import main
from retro_peft.errors import InputError
from retro_peft.index import Encoder, IndexConfig, build_index, evaluate_retrieval, load_documents, open_index
from retro_peft.index.retriever import RetrieverTrainConfig, train_retriever, training_pairs
from retro_peft.qa import QAItem, load_qa

from conftest import SQUAD

# The first SQuAD article's paragraphs, embedded by the tiny random encoder: fast to build and to train.
N_QUESTIONS = 48


@pytest.fixture(scope="module")
def squad_index(tmp_path_factory, small_encoder_dir):
    docs = [d for d in load_documents([SQUAD]) if d.metadata.get("title") == "Normans"]
    path = tmp_path_factory.mktemp("retriever") / "idx"
    return build_index(path, docs, IndexConfig(encoder=str(small_encoder_dir), chunk_tokens=96, overlap=16))


@pytest.fixture(scope="module")
def questions():
    return [it for it in load_qa(SQUAD, articles=slice(0, 1)) if not it.is_impossible][:N_QUESTIONS]


@pytest.fixture(scope="module")
def trained(squad_index, questions, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "encoder"
    config = RetrieverTrainConfig(epochs=4, batch_size=8, lr=1e-3, hard_negatives=1)
    return out, train_retriever(squad_index, questions, out, config)


def test_the_trained_folder_loads_in_plain_sentence_transformers_and_matches_the_encoder(trained, squad_index):
    from sentence_transformers import SentenceTransformer

    out, summary = trained
    assert summary["out"] == str(out) and summary["pairs"] == N_QUESTIONS and summary["steps"] > 0
    assert summary["fingerprint"] != squad_index.manifest["encoder"]["fingerprint"]
    texts = ["Who were the Normans?", "a paragraph about Normandy", "Rollo"]
    plain = SentenceTransformer(str(out), device="cpu").encode(texts, normalize_embeddings=True)
    ours = Encoder(str(out))
    assert np.allclose(plain, ours.encode(texts), atol=1e-5)
    assert ours.fingerprint == summary["fingerprint"]
    assert not any(p.name.endswith(".tmp") for p in out.parent.iterdir())  # no temporary folder left


def test_training_lowers_the_loss_and_does_not_hurt_retrieval_of_its_questions(trained, squad_index, questions,
                                                                            tmp_path, monkeypatch):
    monkeypatch.setenv("RETRO_PEFT_HOME", str(tmp_path / "home"))  # an empty embedding cache: every vector is new
    out, summary = trained
    assert summary["loss"]["last"] < summary["loss"]["first"]
    before = evaluate_retrieval(squad_index, questions, modes=("dense",))["dense"]
    shutil.copytree(squad_index.path, tmp_path / "copy")
    stats = open_index(tmp_path / "copy").reembed(str(out))
    assert stats["changed"] and stats["embedded"] == stats["chunks"] == len(squad_index)
    after = evaluate_retrieval(open_index(tmp_path / "copy"), questions, modes=("dense",))["dense"]
    assert after["ndcg@10"] >= before["ndcg@10"], (before, after)


def test_gold_chunk_prefers_the_one_holding_the_answer_and_negatives_avoid_gold_documents(squad_index, questions):
    pairs = training_pairs(squad_index, questions)
    by_doc = {}
    for c in squad_index.chunks():
        by_doc.setdefault(c.doc_id, []).append(c.text)
    for item, pair in zip(questions, pairs):
        assert pair.positive in by_doc[item.gold_doc_ids[0]]
        if any(a.lower() in t.lower() for t in by_doc[item.gold_doc_ids[0]] for a in item.answers):
            assert any(a.lower() in pair.positive.lower() for a in item.answers)

    from retro_peft.index.retriever import mined_negatives

    docs_of = {}
    for c in squad_index.chunks():
        docs_of.setdefault(c.text, set()).add(c.doc_id)
    corpus = list(docs_of)
    negatives = mined_negatives(squad_index.encoder.model, pairs[:10], corpus, docs_of,
                           RetrieverTrainConfig(hard_negatives=3))
    for pair, negs in zip(pairs, negatives):
        assert len(negs) == 3 and len(set(negs)) == 3
        assert all(not docs_of[t] & pair.gold_doc_ids for t in negs)


@pytest.mark.parametrize("case, message", [
    ("empty", "no questions to train"),
    ("no-gold", "no answerable question has gold_doc_ids"),
    ("unknown-gold", "gold document 'Nowhere/p0' of question 'q2' is not in index"),
    ("model-there", "already holds a model"),
    ("other-folder", "is not a sentence-transformers model folder"),
    ("bad-config", "batch_size must be an integer >= 2"),
])
def test_bad_input_is_refused_before_anything_is_written(squad_index, questions, tmp_path, case, message,
                                                         monkeypatch):
    from retro_peft.index import retriever

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(retriever, "_fit", no_training)
    monkeypatch.setattr(retriever, "mined_negatives", no_training)
    out = tmp_path / "out"
    items, config = questions[:4], RetrieverTrainConfig()
    if case == "empty":
        items = []
    elif case == "no-gold":
        items = [QAItem("q1", "Who?", ("x",), ())]
    elif case == "unknown-gold":
        items = [questions[0], QAItem("q2", "Where?", ("y",), ("Nowhere/p0",))]
    elif case == "model-there":
        out.mkdir()
        (out / "modules.json").write_text("[]")
    elif case == "other-folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "bad-config":
        config = RetrieverTrainConfig(batch_size=1, hard_negatives=0)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InputError, match=message):
        train_retriever(squad_index, items, out, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary folder
    if case in ("empty", "no-gold", "unknown-gold", "bad-config"):
        assert not out.exists()


def test_cli_train_retriever_then_reembed(squad_index, tmp_path, capsys):
    qa = tmp_path / "qa.jsonl"
    chunks = squad_index.chunks()
    firsts = list({c.doc_id: c for c in reversed(chunks)}.values())[:6]  # one chunk of each of six paragraphs
    qa.write_text("".join(json.dumps({"question": f"What does paragraph {c.doc_id} say?", "answers": [c.text.split()[0]],
                                      "gold_doc_ids": [c.doc_id]}) + "\n" for c in firsts))
    out = tmp_path / "enc"
    argv = ["train-retriever", "--index", str(squad_index.path), "--qa", str(qa), "--out", str(out), "--epochs", "1",
            "--batch-size", "4", "--hard-negatives", "0", "--seed", "3"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 6 and summary["steps"] >= 2 and summary["out"] == str(out.absolute())
    assert summary["config"]["seed"] == 3 and summary["hard_negatives"] == 0
    assert main(argv) == 2 and "already holds a model" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    capsys.readouterr()

    copy = tmp_path / "copy"
    shutil.copytree(squad_index.path, copy)
    assert main(["index", "reembed", str(copy), "--encoder", str(out)]) == 0
    assert f"re-embedded {len(chunks)} chunks" in capsys.readouterr().out
    index = open_index(copy)
    assert index.manifest["encoder"]["name"] == str(out.absolute())
    assert index.manifest["encoder"]["fingerprint"] == Encoder(str(out)).fingerprint
    assert index.search("Normans", k=3, mode="dense")


# -- LM-supervised training (REPLUG's LSR) -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_generator(squad_index, tmp_path_factory):
    import torch
    from helpers_adapters import smollm2_tokenizer, tiny_llama_folder

    from retro_peft.base_model import load_base_model
    from retro_peft.generation import Generator, RetrievalConfig

    tokenizer = smollm2_tokenizer()
    folder = tiny_llama_folder(tmp_path_factory.mktemp("lsr") / "llama", tokenizer, initializer_range=0.2)
    model, tokenizer, _ = load_base_model(str(folder), dtype=torch.float32, device="cpu")
    return Generator(model, tokenizer, index=squad_index, retrieval=RetrievalConfig(context_tokens=400), batch_size=8)


def test_lm_scores_are_the_answer_likelihood_with_each_chunk(tiny_generator, squad_index, questions):
    import torch

    from retro_peft.generation import Passage
    from retro_peft.generation.prompt import build_prompt, encode, end_of_turn_ids
    from retro_peft.training.lsr import lm_scores

    item = questions[0]
    row = [Passage.from_hit(h) for h in squad_index.search_many([item.question], k=2, mode="dense")[0]]
    (scores,) = lm_scores(tiny_generator, [item], [row])
    tok, retrieval = tiny_generator.tokenizer, tiny_generator.retrieval
    answer = encode(tok, item.answers[0]) + end_of_turn_ids(tok, retrieval)
    for passage, score in zip(row, scores):
        prompt = build_prompt(tok, item.question, [passage], retrieval).input_ids
        with torch.no_grad():
            logits = tiny_generator.model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        expected = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(answer))
        assert score == pytest.approx(expected, abs=1e-3)


def test_lsr_training_fits_the_generators_preference_and_saves_a_model(tiny_generator, squad_index, questions,
                                                                        tmp_path):
    from sentence_transformers import SentenceTransformer

    from retro_peft.training.lsr import LSRConfig, train_retriever_lsr

    out = tmp_path / "lsr"
    summary = train_retriever_lsr(tiny_generator, squad_index, questions[:16], out,
                                  LSRConfig(k=3, epochs=6, batch_size=8, lr=1e-3))
    assert summary["questions"] == 16 and summary["steps"] == 12
    assert summary["loss"]["last"] < summary["loss"]["first"]  # the retriever moved toward the generator's choice
    assert SentenceTransformer(str(out), device="cpu").encode(["Rollo"]).shape[1] == squad_index.encoder.dim
    with pytest.raises(InputError, match="needs questions with answers"):
        train_retriever_lsr(tiny_generator, squad_index, [QAItem("x", "Who?", (), is_impossible=True)],
                            tmp_path / "none")
    assert not (tmp_path / "none").exists()
    with pytest.raises(InputError, match="k >= 2"):
        LSRConfig(k=1).validate()
