"""Progress bars of the long jobs (chunks embedded, a frozen KV cache's passages, questions answered): drawn on
stderr when it is a terminal (a real pseudo-terminal here), never with --no-progress or a redirected stderr,
and never on stdout (--json stays clean)."""

import contextlib
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
import uuid

import pytest

from retro_peft.cli import main

from helpers_adapters import DOCS, single_thread, smollm2_tokenizer, tiny_llama_folder, write_jsonl

ENV = {"OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def terminal():
    """A pseudo-terminal 120 columns wide: yields (its end for a writer, a list that gets what was written)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    chunks, written = [], []

    def drain():  # the terminal's buffer is small: read while the writer runs
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: every writer's end is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        yield follower, written
    finally:
        os.close(follower)
        reader.join(timeout=30)
        os.close(leader)
        written.append(b"".join(chunks).decode(errors="replace"))


@contextlib.contextmanager
def stderr_on_a_terminal(monkeypatch):
    """This process's sys.stderr on a pseudo-terminal; yields a list that gets what was drawn there."""
    with terminal() as (follower, written):
        tty = os.fdopen(os.dup(follower), "w", buffering=1)
        with monkeypatch.context() as m:
            m.setattr(sys, "stderr", tty)
            try:
                yield written
            finally:
                tty.close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The test documents, made new to the embedding cache (which the test run shares): a bar counts only the
    chunks it embeds, and a cache that has them all leaves nothing to show."""
    single_thread()
    root = tmp_path_factory.mktemp("progress")
    run = uuid.uuid4().hex
    return write_jsonl(root / "docs.jsonl", [{**d, "text": f"{d['text']} (run {run})"} for d in DOCS]), root


def test_index_build_add_and_reembed_draw_a_chunks_bar_only_on_a_terminal(corpus, small_encoder_dir, monkeypatch,
                                                                          capsys):
    docs, root = corpus
    with stderr_on_a_terminal(monkeypatch) as drawn:
        assert main(["index", "build", str(root / "a"), str(docs), "--chunk-tokens", "96", "--overlap", "8"]) == 0
    assert "embed chunks" in drawn[0] and "chunk/s" in drawn[0], drawn  # the bar, with its rate
    assert f"{len(DOCS)}/{len(DOCS)}" in drawn[0]  # counted in chunks (one per short document), to the end
    out = capsys.readouterr().out
    assert out.startswith("built ") and "chunk" not in out.split(":")[0] and "chunk/s" not in out

    more = write_jsonl(root / "more.jsonl", [{"id": "new", "text": f"Kettles boil water ({uuid.uuid4().hex})."}])
    with stderr_on_a_terminal(monkeypatch) as drawn:
        added = main(["index", "add", str(root / "a"), str(more)])
        reembedded = main(["index", "reembed", str(root / "a"), "--encoder", str(small_encoder_dir)])
    assert added == 0 and reembedded == 0, drawn
    assert "embed new chunks" in drawn[0] and "1/1" in drawn[0], drawn
    assert "re-embed chunks" in drawn[0] and f"{len(DOCS) + 1}/{len(DOCS) + 1}" in drawn[0], drawn

    with stderr_on_a_terminal(monkeypatch) as drawn:  # a terminal, but --no-progress
        assert main(["index", "build", str(root / "b"), str(docs), "--no-progress"]) == 0
    assert "embed chunks" not in drawn[0] and "chunk/s" not in drawn[0], drawn
    capsys.readouterr()
    assert main(["index", "build", str(root / "c"), str(docs)]) == 0  # stderr captured: not a terminal
    err = capsys.readouterr().err
    assert "embed chunks" not in err and "chunk/s" not in err, err


def test_eval_with_a_kv_cache_build_draws_its_bars_on_stderr_and_json_stays_clean(corpus, tmp_path, monkeypatch,
                                                                                  capsys):
    """`eval --kv-cache` computes the cache first (a bar over its passages), then answers (a bar over the
    questions). In a real process with stderr on a terminal, stdout is the JSON alone; --no-progress draws
    nothing on the terminal."""
    docs, root = corpus
    base = tiny_llama_folder(tmp_path / "base", smollm2_tokenizer())
    assert main(["index", "build", str(tmp_path / "index"), str(docs), "--chunk-tokens", "96", "--overlap", "8"]) == 0
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"id": f"q{i}", "question": f"Where is the piano {i}?", "answers": ["x"]}
                                             for i in range(3)])
    command = ["eval", "--model", str(base), "--index", str(tmp_path / "index"), "--qa", str(qa),
               "--max-new-tokens", "2", "--device", "cpu", "--json"]
    with terminal() as (follower, drawn):
        proc = subprocess.run([sys.executable, "-m", "retro_peft.cli", *command, "--kv-cache",
                               str(tmp_path / "kv1.safetensors")], stdout=subprocess.PIPE, stderr=follower,
                              env={**os.environ, **ENV}, timeout=300)
    assert proc.returncode == 0, drawn
    assert json.loads(proc.stdout)["n"] == 3  # the whole of stdout is the JSON
    assert "kv cache" in drawn[0] and "passage/s" in drawn[0], drawn
    assert "answer" in drawn[0] and "3/3" in drawn[0] and "q/s" in drawn[0], drawn

    capsys.readouterr()
    with stderr_on_a_terminal(monkeypatch) as drawn:
        assert main([*command, "--kv-cache", str(tmp_path / "kv2.safetensors"), "--no-progress"]) == 0
    assert "passage/s" not in drawn[0] and "3/3" not in drawn[0], drawn
    assert json.loads(capsys.readouterr().out)["n"] == 3


def test_the_embedding_bar_counts_texts_and_gives_the_vectors_of_a_plain_encode(encoder, monkeypatch):
    """With a bar the encoder embeds batch by batch (longest texts first, as sentence-transformers orders them
    itself); the vectors are the ones a single call gives, in the texts' order."""
    import numpy as np

    texts = [f"{d['text'][: 20 + 13 * i]}" for i, d in enumerate(DOCS * 3)]
    plain = encoder.encode(texts, show_progress=True)  # stderr captured by pytest: not a terminal, no bar
    monkeypatch.setattr(encoder, "batch_size", 4)
    with stderr_on_a_terminal(monkeypatch) as drawn:
        barred = encoder.encode(texts, show_progress=True, desc="embed test")
    assert "embed test: 100%" in drawn[0] and f"{len(texts)}/{len(texts)}" in drawn[0], drawn
    np.testing.assert_allclose(barred, plain, atol=1e-5)
