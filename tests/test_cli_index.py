import json
import os
import signal
import subprocess
import sys
import time

import pytest

from retro_peft.cli import main
from retro_peft.index import open_index

from conftest import WIKI, run_cli


def test_cli_build_query_info_eval_delete(corpus, tmp_path):
    idx = tmp_path / "cli-idx"
    out = run_cli("index", "build", idx, corpus / "docs", corpus / "more.jsonl", "--chunk-tokens", "64", "--overlap", "8",
                  check=True)
    assert "5 documents" in out.stdout
    hits = json.loads(run_cli("index", "query", idx, "molten lava", "-k", "2", "--json", check=True).stdout)
    assert hits[0]["doc_id"] == "volcano" and set(hits[0]) == {"chunk_id", "doc_id", "text", "score", "metadata"}
    hits = json.loads(run_cli("index", "query", idx, "molten lava", "--filter", "topic=arts", "--mode", "dense", "--json",
                              check=True).stdout)
    assert [h["doc_id"] for h in hits] == ["opera"]
    info = json.loads(run_cli("index", "info", idx, check=True).stdout)
    assert info["counts"] == {"documents": 5, "chunks": 5} and info["chunking"]["chunk_tokens"] == 64
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "What erupts from volcanoes?", "answers": ["lava"],
                                                   "gold_doc_ids": ["volcano"]}) + "\n")
    report = json.loads(run_cli("index", "eval", idx, "--qa", tmp_path / "qa.jsonl", "--json", check=True).stdout)
    assert report["n"] == 1 and set(report) == {"n", "dense", "sparse", "hybrid"}
    assert report["hybrid"]["recall@1"] == 1.0
    assert "deleted 1 documents" in run_cli("index", "delete", idx, "--doc-id", "opera", check=True).stdout
    assert "opera" not in open_index(idx).doc_ids()


def test_cli_index_lives_under_home(corpus, tmp_path):
    env = {"RETRO_PEFT_HOME": str(tmp_path / "home")}
    run_cli("index", "build", "notes", corpus / "docs", env=env, check=True)
    assert (tmp_path / "home" / "indexes" / "notes" / "manifest.json").exists()
    assert "added 3" in run_cli("index", "add", "notes", corpus / "more.jsonl", env=env, check=True).stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["index", "build", "{idx}", "{tmp}/missing.txt"], "input not found"),
        (["index", "build", "{idx}", "{tmp}/empty.txt"], "corpus is empty"),
        (["index", "build", "{idx}", "{tmp}/bad.jsonl"], "bad.jsonl:2: malformed JSON"),
        (["index", "build", "{idx}", "{tmp}/docs", "--backend", "milvus"], "unknown backend 'milvus'"),
        (["index", "build", "{idx}", "{tmp}/docs", "--overlap", "500"], "overlap must be"),
        (["index", "query", "{built}", "cats", "-k", "0"], "k must be a positive integer"),
        (["index", "query", "{built}", "cats", "--filter", "oops"], "expected FIELD=VALUE"),
        (["index", "query", "{tmp}/nowhere", "cats"], "no index at"),
        (["index", "add", "{built}", "{tmp}/docs", "--encoder", "{tiny}"], "built with encoder 'minilm'"),
        (["index", "build", "", "{tmp}/docs"], "index name is empty"),
        (["index", "query", " ", "cats"], "index name is empty"),
    ],
)
def test_cli_bad_input_exits_2_with_a_clear_message_and_no_index(corpus, tmp_path, args, message, small_encoder_dir,
                                                               capsys):
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{oops}\n')
    built = tmp_path / "built"
    if any("{built}" in a for a in args):
        assert main(["index", "build", str(built), str(corpus / "docs")]) == 0
    argv = [a.format(idx=tmp_path / "new-idx", tmp=tmp_path, built=built, tiny=small_encoder_dir) for a in args]
    assert main(argv) == 2  # in-process: the same entry point as the console script, minus start-up time
    assert message in capsys.readouterr().err
    if "{idx}" in args:  # a refused build leaves no index behind (other cases never name a folder to write)
        assert not (tmp_path / "new-idx" / "manifest.json").exists()


@pytest.fixture
def wiki_docs(tmp_path):
    lines = WIKI.read_text().splitlines()[:300]
    path = tmp_path / "wiki.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _kill_when(proc, folder, prefix, timeout=240):
    """SIGKILL `proc` the moment a file starting with `prefix` appears in `folder` (mid-write)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(name.startswith(prefix) for name in os.listdir(folder)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.0005)
    proc.wait()
    return proc.returncode


@pytest.mark.parametrize("command", ["add", "build"])
@pytest.mark.parametrize("trigger", ["chunks-000002", ".sparse-000002"])
def test_kill_9_mid_write_leaves_the_last_good_index(corpus, tmp_path, wiki_docs, command, trigger):
    idx = tmp_path / "idx"
    run_cli("index", "build", idx, corpus / "docs", corpus / "more.jsonl", check=True)
    args = ["add", idx, wiki_docs] if command == "add" else ["build", idx, wiki_docs, "--overwrite"]
    proc = subprocess.Popen([sys.executable, "-m", "retro_peft.cli", "index", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    returncode = _kill_when(proc, idx, trigger)
    assert returncode == -signal.SIGKILL, "the writer finished before it could be killed"
    index = open_index(idx)  # verifies every checksum
    assert index.manifest["generation"] == 1
    assert sorted(index.doc_ids()) == ["cats.md", "glacier", "opera", "rust.txt", "volcano"]
    assert index.search("molten lava", k=1)[0].doc_id == "volcano"
    # and the next write succeeds, cleaning up what the killed one left behind
    stats = index.add([wiki_docs])
    assert stats["added"] == 300
    names = {p.name for p in idx.iterdir()}
    assert names - {".lock", "manifest.json"} == set(index.manifest["files"])


@pytest.fixture(scope="module")
def other_small_encoder_dir(small_encoder_dir, tmp_path_factory):
    """The tiny encoder with its weights nudged: another fingerprint, the same shapes and tokenizer."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(small_encoder_dir), device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path_factory.mktemp("other-tiny") / "st"
    model.save(str(out))
    return out


@pytest.mark.parametrize("trigger", ["chunks-000002", ".sparse-000002"])
def test_kill_9_mid_reembed_leaves_the_previous_index_answering(tmp_path, wiki_docs, small_encoder_dir,
                                                               other_small_encoder_dir, trigger):
    from retro_peft.index import IndexConfig, build_index

    idx = tmp_path / "idx"
    built = build_index(idx, [wiki_docs], IndexConfig(encoder=str(small_encoder_dir), chunk_tokens=64, overlap=8))
    queries = ["the history of mathematics", "a river in Europe", "famous painters"]
    before = {mode: [[h.chunk_id for h in hits] for hits in built.search_many(queries, k=5, mode=mode)]
              for mode in ("dense", "hybrid")}
    proc = subprocess.Popen([sys.executable, "-m", "retro_peft.cli", "index", "reembed", str(idx),
                             "--encoder", str(other_small_encoder_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    returncode = _kill_when(proc, idx, trigger)
    assert returncode == -signal.SIGKILL, "the re-embed finished before it could be killed"
    index = open_index(idx)  # verifies every checksum
    assert index.manifest["generation"] == 1
    assert index.manifest["encoder"] == built.manifest["encoder"]
    for mode, ids in before.items():
        assert [[h.chunk_id for h in hits] for hits in index.search_many(queries, k=5, mode=mode)] == ids
    # and the next re-embed succeeds, cleaning up what the killed one left behind
    out = run_cli("index", "reembed", idx, "--encoder", other_small_encoder_dir, check=True)
    assert f"re-embedded {len(index)} chunks" in out.stdout
    reopened = open_index(idx)
    assert reopened.manifest["generation"] == 2 and reopened.manifest["encoder"]["name"] == str(other_small_encoder_dir)
    assert reopened.search("a river in Europe", k=1, mode="dense")
    names = {p.name for p in idx.iterdir()}
    assert names - {".lock", "manifest.json"} == set(reopened.manifest["files"])
