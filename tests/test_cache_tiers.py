"""The response and retrieval caches' disk tier (diskcache) and the semantic tier, through real servers.

The disk tier: a `retro-peft serve` process is killed with SIGKILL and started again on the same
`cache.disk_dir`; the earlier answers come from disk. An entry damaged the way a crash or a bad disk could
leave it (its stored bytes cut short) is dropped and answered afresh, never served.
The semantic tier: a paraphrase of a cached question is answered from its entry (`x-cache: semantic`); a
different question about the same paragraph is not.
"""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from retro_peft.domains.bank import AdapterBank
from retro_peft.serving.app import create_app
from retro_peft.serving.cache import DiskCache, MemoryCache, TieredCache
from retro_peft.serving.settings import ServeSettings
from retro_peft.serving.testing import serve_in_thread

from helpers_adapters import DOCS, single_thread, smollm2_tokenizer, tiny_index, tiny_llama_folder

KEY = "sk-test-cache-tiers"
HEADERS = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "docs", "messages": [{"role": "user", "content": "Who invented the piano?"}], "max_tokens": 8}
RETRIEVE = {"model": "docs", "query": "Which river flows into the North Sea?", "k": 2}


@pytest.fixture(scope="module")
def model_and_index(tmp_path_factory):
    single_thread()
    root = tmp_path_factory.mktemp("tiers")
    return tiny_llama_folder(root / "base", smollm2_tokenizer(), initializer_range=0.2), tiny_index(root / "idx", DOCS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "retro_peft.cli", "serve", "--config", str(config), "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not become ready")


def kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()


def ask(port: int) -> tuple[str, dict]:
    response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, headers=HEADERS, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    return response.headers["x-cache"], {k: body[k] for k in ("choices", "usage", "model")}


def test_the_disk_tier_survives_kill_9_and_never_serves_a_damaged_entry(model_and_index, tmp_path):
    folder, index = model_and_index
    cache_dir = tmp_path / "cache"
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(folder), "domains": [{"name": "docs", "index": str(index.path)}], "log_json": False,
        "log_level": "warning", "auth": {"keys": [{"name": "test", "key": KEY}]},
        "generation": {"default_max_tokens": 8}, "cache": {"disk_dir": str(cache_dir), "disk_bytes": 8 << 20}}))
    port = free_port()
    proc = start_server(config, port)
    try:
        status, first = ask(port)
        assert status == "miss"
        retrieved = httpx.post(f"http://127.0.0.1:{port}/v1/retrieve", json=RETRIEVE, headers=HEADERS)
        assert retrieved.status_code == 200 and "x-cache" not in retrieved.headers  # (a hit is marked, not a miss)
    finally:
        kill_9(proc)

    # the stored search results' bytes cut short in place (a torn write), while no server runs
    with sqlite3.connect(cache_dir / "retrieval" / "cache.db") as db:
        (rowid, value), = db.execute("SELECT rowid, value FROM Cache").fetchall()
        db.execute("UPDATE Cache SET value = ? WHERE rowid = ?", (value[: len(value) // 2], rowid))

    proc = start_server(config, port)  # a new process: its memory tier is empty, answers come from disk
    try:
        status, again = ask(port)
        assert (status, again) == ("hit", first)
        fresh = httpx.post(f"http://127.0.0.1:{port}/v1/retrieve", json=RETRIEVE, headers=HEADERS)
        assert "x-cache" not in fresh.headers and fresh.json() == retrieved.json()  # the damaged entry: not served
        stored = httpx.post(f"http://127.0.0.1:{port}/v1/retrieve", json=RETRIEVE, headers=HEADERS)
        assert stored.headers["x-cache"] == "hit" and stored.json() == retrieved.json()  # and stored again, whole
    finally:
        kill_9(proc)


def test_tiers_are_looked_up_in_order_and_a_lower_hit_fills_the_upper(tmp_path):
    memory, disk = MemoryCache(60, 10), DiskCache(tmp_path / "d", 60, 1 << 20)
    tiers = TieredCache([memory, disk])
    disk.set("k", b"value")
    assert memory.get("k") is None and tiers.get("k") == b"value" and memory.get("k") == b"value"
    tiers.set("j", b"both")
    assert memory.get("j") == disk.get("j") == b"both"
    # a stored value whose checksum does not match (bytes overwritten) is a miss, and is dropped
    disk._cache.set("bad", b"\0" * DiskCache.DIGEST + b"value")
    assert disk.get("bad") is None and "bad" not in disk._cache


@pytest.fixture(scope="module")
def semantic_url(model_and_index):
    folder, index = model_and_index
    bank = AdapterBank(str(folder), max_new_tokens=8)
    bank.load("docs", index.path)
    settings = ServeSettings(auth={"keys": [{"name": "test", "key": KEY}]}, batching={"max_wait_ms": 5},
                             generation={"default_max_tokens": 8}, cache={"semantic": True})
    with serve_in_thread(create_app(settings, bank)) as url:
        yield url


def test_the_semantic_tier_hits_on_a_paraphrase_not_on_another_question(semantic_url):
    def chat(question: str, **extra) -> httpx.Response:
        body = {**CHAT, "messages": [{"role": "user", "content": question}], **extra}
        response = httpx.post(f"{semantic_url}/v1/chat/completions", json=body, headers=HEADERS, timeout=60)
        assert response.status_code == 200, response.text
        return response

    first = chat("Who invented the piano?")
    assert first.headers["x-cache"] == "miss"
    for paraphrase in ["who invented the piano", "Who invented the piano ?", "Could you tell me who invented the "
                                                                            "piano?"]:
        near = chat(paraphrase)
        assert near.headers["x-cache"] == "semantic", paraphrase
        assert near.json()["choices"] == first.json()["choices"]
    assert chat("Who invented the piano?").headers["x-cache"] == "hit"  # exact hits stay marked as they were
    for other in ["When was the piano invented?", "Where was the piano invented?", "Who didn't invent the piano?"]:
        assert chat(other).headers["x-cache"] == "miss", other  # about the same paragraph, another question
    # other settings are another bucket: the paraphrase of a question asked with other settings does not hit
    assert chat("who invented the piano", max_tokens=4).headers["x-cache"] == "miss"
