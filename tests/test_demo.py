"""`retro-peft demo`: the shipped corpus and QA pairs, the report, and a real (quick) run."""

import json
import os

import pytest

from retro_peft.demo import DemoConfig, data_dir, docs_dir, format_answers, format_table, qa_file
from retro_peft.generation import Answer
from retro_peft.qa import load_qa
from retro_peft.training import score


def _docs() -> dict[str, str]:
    # Answers are verbatim spans; only the line wrapping of the Markdown may differ.
    return {p.name: " ".join(p.read_text(encoding="utf-8").split()) for p in sorted(docs_dir().glob("*.md"))}


def _rows(split: str) -> list[dict]:
    return [json.loads(line) for line in qa_file(split).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_corpus_is_packaged_documentation():
    docs = _docs()
    assert 5 <= len(docs) <= 8
    for name, text in docs.items():
        assert text.startswith("# "), f"{name} needs a title heading"
        assert len(text.split()) > 200, f"{name} is too short to ask questions about"


@pytest.mark.parametrize("split", ["train", "eval"])
def test_qa_answers_are_verbatim_spans_of_their_gold_docs(split):
    docs = _docs()
    rows = _rows(split)
    bad = []
    for row in rows:
        assert set(row) <= {"id", "question", "answers", "gold_doc_ids", "is_impossible"}, row
        if row.get("is_impossible"):
            assert row["answers"] == [] and not row.get("gold_doc_ids"), row["id"]
            continue
        assert row["answers"] and row["gold_doc_ids"], row["id"]
        for gold in row["gold_doc_ids"]:
            assert gold in docs, f"{row['id']}: unknown gold doc {gold!r}"
        for answer in row["answers"]:
            if not any(answer in docs[g] for g in row["gold_doc_ids"]):
                bad.append((row["id"], answer))
    assert not bad, f"answers that are not spans of their gold document: {bad}"
    impossible = sum(bool(r.get("is_impossible")) for r in rows) / len(rows)
    assert 0.1 <= impossible <= 0.2, impossible
    assert len({r["id"] for r in rows}) == len(rows)
    assert len(load_qa(qa_file(split))) == len(rows)  # the library reads them as they are


def test_splits_are_disjoint_and_sized():
    train, held_out = _rows("train"), _rows("eval")
    assert len(train) >= 80 and 20 <= len(held_out) <= 30
    assert not {r["question"].lower() for r in train} & {r["question"].lower() for r in held_out}


def test_gold_ids_are_the_ids_the_index_gives():
    from retro_peft.index.documents import load_documents

    ids = {d.id for d in load_documents([docs_dir()])}
    assert ids == set(_docs())
    assert str(data_dir()).endswith(os.path.join("retro_peft", "data", "demo"))


def test_table_and_answers_report():
    items = load_qa(qa_file("eval"))[:4]
    answers = [Answer(text=it.answers[0] if it.answers else "I don't know.", abstained=not it.answers,
                      citations=[("c", it.gold_doc_ids[0] if it.gold_doc_ids else "x.md", "", 1.0)])
               for it in items]
    result = score(items, answers, retrieval=False)
    table = format_table({"base, closed-book": result, "RetroLoRA + retrieval": result})
    assert "RetroLoRA + retrieval" in table and "EM" in table and "100.0" in table
    text = format_answers(result, 3)
    assert text.count("Q: ") == 3 and "cites:" in text


def test_config_validation():
    from retro_peft.errors import InputError

    with pytest.raises(InputError):
        DemoConfig(steps=0).validate()
    quick = DemoConfig.quick(steps=5)
    assert quick.steps == 5 and quick.eval_limit


def test_demo_refuses_a_folder_as_report_before_any_work(tmp_path, monkeypatch, capsys):
    import retro_peft.demo

    def no_work(*args, **kwargs):
        raise AssertionError("the demo started working before checking its output paths")

    monkeypatch.setattr(retro_peft.demo, "build_demo_index", no_work)
    assert _run_demo_cli(["demo", "--quick", "--out", str(tmp_path / "adapter"), "--report", str(tmp_path)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err


def _run_demo_cli(argv: list[str]) -> int:
    """Through the real `retro-peft` entry point."""
    from retro_peft.cli import main

    return main(argv)


@pytest.mark.slow
def test_quick_demo_leaves_index_adapter_and_domain(tmp_path, monkeypatch, capsys):
    from retro_peft.adapters.model import read_retro_config
    from retro_peft.domains.registry import get_domain
    from retro_peft.index import open_index

    shared = os.environ["RETRO_PEFT_HOME"]  # the session's home: the converted SmolLM2 is reused, not redone
    home = tmp_path / "home"
    home.mkdir()
    os.makedirs(os.path.join(shared, "models"), exist_ok=True)
    (home / "models").symlink_to(os.path.join(shared, "models"))
    monkeypatch.setenv("RETRO_PEFT_HOME", str(home))
    report = tmp_path / "report.json"

    assert _run_demo_cli(["demo", "--quick", "--no-progress", "--report", str(report)]) == 0

    out = capsys.readouterr().out
    for setup in ("base, closed-book", "base + retrieval", "RetroLoRA + retrieval"):
        assert setup in out
    assert "EM" in out and "cites:" in out and "total" in out
    index = open_index("retro-docs")
    assert set(index.doc_ids()) == {p.name for p in docs_dir().glob("*.md")}
    adapter = home / "adapters" / "retro-docs"
    info = read_retro_config(adapter)
    assert info["adapter"]["retrieval"]["k"] == DemoConfig().k
    spec = get_domain("retro-docs")
    assert spec.index == "retro-docs" and spec.adapter == str(adapter.resolve())
    data = json.loads(report.read_text())
    assert set(data["scores"]) == {"base, closed-book", "base + retrieval", "RetroLoRA + retrieval"}
    assert data["scores"]["base, closed-book"]["n"] == DemoConfig.quick().eval_limit
