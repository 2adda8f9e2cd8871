"""`retro-peft serve` against real uvicorn servers on 127.0.0.1, with the official openai client.

A tiny random Llama with two LoRA domains and one index-only domain; one bank
shared by the module's servers (used by one server at a time).
"""

import asyncio
import http.client
import json
import threading
import time
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from peft import LoraConfig

from retro_peft.adapters.config import LLAMA_LINEAR, RetrievalConfig, RetroLoraConfig
from retro_peft.adapters.model import RetroPeftModel
from retro_peft.domains.bank import AdapterBank
from retro_peft.errors import InputError
from retro_peft.serving.app import create_app
from retro_peft.serving.cache import RequestKeys
from retro_peft.serving.settings import ServeSettings, load_settings
from retro_peft.serving.testing import serve_in_thread

from helpers_adapters import DOCS, single_thread, smollm2_tokenizer, tiny_index, tiny_llama_folder

QUESTIONS = ["Who invented the piano?", "Into which sea does the Rhine flow?", "What is the atomic number of oxygen?",
             "Which shrub are tea leaves taken from?"]
KEY = "sk-test-generate-and-retrieve"


def build_bank(root) -> AdapterBank:
    """Domains `a`, `b` (random LoRA adapters, so they really decode differently) and `plain` (index only)."""
    single_thread()
    base = tiny_llama_folder(root / "base", smollm2_tokenizer(), initializer_range=0.2)
    index_a = tiny_index(root / "idx-a", DOCS[:3])
    index_b = tiny_index(root / "idx-b", DOCS[3:])
    bank = AdapterBank(str(base), max_new_tokens=8)
    for i, (name, index) in enumerate([("a", index_a), ("b", index_b)]):
        peft = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules=list(LLAMA_LINEAR),
                          init_lora_weights=False)
        model = RetroPeftModel.create(str(base), RetroLoraConfig(peft=peft, retrieval=RetrievalConfig(k=2)), seed=i)
        bank.load(name, index.path, model.save(root / f"adapter-{name}", index=index))
    bank.load("plain", index_b.path)
    return bank


def settings(**batching) -> ServeSettings:
    return ServeSettings(auth={"keys": [{"name": "test", "key": KEY}, {"name": "ops", "key": "sk-admin",
                                                                         "scopes": ["admin"]}]},
                         batching={"max_wait_ms": 5, **batching}, generation={"default_max_tokens": 8})


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    return build_bank(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def url(bank):
    with serve_in_thread(create_app(settings(), bank)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def metric(url: str, name: str, **labels) -> float:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer sk-admin"}).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_completion_chat_and_models_with_the_openai_client(client):
    completion = client.completions.create(model="a", prompt=QUESTIONS[0], max_tokens=6)
    assert completion.object == "text_completion" and completion.model == "a"
    assert completion.choices[0].finish_reason in ("stop", "length") and completion.choices[0].text
    assert completion.usage.completion_tokens <= 6 and completion.usage.prompt_tokens > 10
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    citations = completion.choices[0].model_extra["citations"]
    assert citations and {"chunk_id", "doc_id", "title", "score"} <= set(citations[0])

    chat = client.chat.completions.create(model="b", messages=[{"role": "system", "content": "Be brief."},
                                                                {"role": "user", "content": QUESTIONS[1]}])
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens <= 8  # the configured default max_tokens

    models = {m.id for m in client.models.list()}
    assert models == {"a", "b", "plain", "auto"}


def test_streaming_gives_openai_chunks_ending_with_done(client, url):
    pieces, finish, usage = [], None, None
    stream = client.chat.completions.create(model="a", messages=[{"role": "user", "content": QUESTIONS[2]}],
                                            max_tokens=6, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    full = client.chat.completions.create(model="a", messages=[{"role": "user", "content": QUESTIONS[2]}],
                                          max_tokens=6)
    assert "".join(pieces).strip() == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason and usage.completion_tokens == full.usage.completion_tokens

    completion_pieces = [c.choices[0].text for c in client.completions.create(
        model="a", prompt=QUESTIONS[2], max_tokens=6, stream=True) if c.choices]
    assert "".join(completion_pieces).strip() == full.choices[0].message.content

    with httpx.stream("POST", f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "b", "prompt": QUESTIONS[0], "max_tokens": 4, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[-2][6:])["usage"]["total_tokens"] > 0  # usage in every response


def test_mixed_domain_batches_equal_single_requests(bank, client):
    domains = ["a", "b", "plain", "a"]
    singles = [client.completions.create(model=d, prompt=q, max_tokens=8, temperature=0).choices[0].text
               for d, q in zip(domains, QUESTIONS)]
    assert len(set(singles)) > 1
    # The batch fills before its (very long) wait ends: these four are decoded in one pass.
    with serve_in_thread(create_app(settings(max_batch_size=4, max_wait_ms=600_000), bank)) as batch_url:
        mixed = openai.AsyncOpenAI(base_url=f"{batch_url}/v1", api_key=KEY, max_retries=0)

        async def all_at_once():
            return await asyncio.gather(*[mixed.completions.create(model=d, prompt=q, max_tokens=8, temperature=0)
                                          for d, q in zip(domains, QUESTIONS)])

        batched = asyncio.run(all_at_once())
        assert metric(batch_url, "retro_peft_batch_size_bucket", le="4.0") == 1
        assert metric(batch_url, "retro_peft_batch_size_bucket", le="2.0") == 0
    assert [r.choices[0].text for r in batched] == singles


def test_batch_waits_only_for_the_requests_it_expects(bank):
    # Before any pass the batcher expects a full batch (8): a lone request waits the whole 3 s window.
    # That pass had one request in flight, so the next lone request starts at once.
    with serve_in_thread(create_app(settings(max_batch_size=8, max_wait_ms=3000), bank)) as batch_url:
        body = {"model": "a", "prompt": QUESTIONS[0], "max_tokens": 2}
        headers = {"Authorization": f"Bearer {KEY}"}
        seconds = []
        for _ in range(2):
            start = time.monotonic()
            assert httpx.post(f"{batch_url}/v1/completions", json=body, headers=headers, timeout=60).status_code == 200
            seconds.append(time.monotonic() - start)
        assert seconds[0] >= 3.0 and seconds[1] < 1.5, seconds


def test_cache_hit_returns_the_same_answer(client, url):
    question = "Who discovered oxygen?"
    hits_before = metric(url, "retro_peft_cache_total", cache="response", result="hit")
    first = client.completions.with_raw_response.create(model="plain", prompt=question, max_tokens=5, temperature=0)
    second = client.completions.with_raw_response.create(model="plain", prompt=question, max_tokens=5, temperature=0)
    assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit"
    a, b = first.parse(), second.parse()
    assert a.choices[0].text == b.choices[0].text and a.usage == b.usage and a.id != b.id
    assert metric(url, "retro_peft_cache_total", cache="response", result="hit") == hits_before + 1
    sampled = client.completions.with_raw_response.create(model="plain", prompt=question, max_tokens=5,
                                                          temperature=0.7)
    assert "x-cache" not in sampled.headers  # sampling is not deterministic: never cached


def test_remembered_requests_are_bounded_in_entries_and_bytes():
    def request(body: bytes) -> tuple:
        return "/v1/completions", "application/json", body

    by_count = RequestKeys(max_entries=3)
    for i in range(4):
        by_count.put(request(b"%d" % i), (f"key{i}",))
    assert by_count.get(request(b"0")) is None and by_count.get(request(b"3")) == ("key3",)
    by_size = RequestKeys(max_entries=10, max_bytes=100)
    for i in range(4):
        by_size.put(request(b"%d" % i), (f"key{i}",))
    by_size.put(request(b"x" * 99), ("big",))  # 103 bytes held: the oldest go until 100 remain
    assert by_size.bytes == 100 and by_size.get(request(b"x" * 99)) == ("big",)
    assert [by_size.get(request(b"%d" % i)) for i in range(4)] == [None, None, None, ("key3",)]


def test_retrieve_and_auto_routing(url, client):
    headers = {"Authorization": f"Bearer {KEY}"}
    response = httpx.post(f"{url}/v1/retrieve", headers=headers, json={"model": "b", "query": "piano inventor", "k": 2})
    assert response.status_code == 200
    data = response.json()["data"]
    assert len(data) == 2 and data[0]["doc_id"] == "piano" and data[0]["text"]
    again = httpx.post(f"{url}/v1/retrieve", headers=headers, json={"model": "b", "query": "piano inventor", "k": 2})
    assert again.headers["x-cache"] == "hit" and again.json()["data"] == data
    routed = client.completions.create(model="auto", prompt="Who invented the piano?", max_tokens=4)
    # The piano passage is in index b, which `plain` shares; `a` (Normans, tea, Rhine) or base would be wrong.
    assert routed.model in {"b", "plain"}
    assert routed.choices[0].model_extra["citations"][0]["doc_id"] == "piano"


def test_retrieval_options_k_mode_and_filters_apply_to_generation(url):
    headers = {"Authorization": f"Bearer {KEY}"}

    def cited(retrieval):
        body = {"model": "b", "prompt": "Who invented the piano?", "max_tokens": 2, "retrieval": retrieval}
        response = httpx.post(f"{url}/v1/completions", headers=headers, json=body)
        assert response.status_code == 200, response.text
        return [c["doc_id"] for c in response.json()["choices"][0]["citations"]]

    assert cited({"k": 0}) == []
    assert cited({"k": 1, "mode": "sparse"}) == ["piano"]
    assert cited({"k": 2, "filters": {"doc_id": "chess"}}) == ["chess"]  # the filter beats the better match
    assert sorted(cited({"k": 3, "filters": {"doc_id": ["chess", "oxygen"]}})) == ["chess", "oxygen"]
    # /v1/retrieve takes the same list filter
    response = httpx.post(f"{url}/v1/retrieve", headers=headers,
                          json={"model": "b", "query": "piano", "k": 3, "filters": {"doc_id": ["chess", "oxygen"]}})
    assert sorted(h["doc_id"] for h in response.json()["data"]) == ["chess", "oxygen"]


def test_malformed_requests_get_openai_errors_not_500(url):
    headers = {"Authorization": f"Bearer {KEY}"}
    cases = [
        ("/v1/completions", b"{not json", 400),
        ("/v1/completions", json.dumps({"model": "a"}).encode(), 400),  # no prompt
        ("/v1/completions", json.dumps({"model": "a", "prompt": "hi", "max_tokens": 10**6}).encode(), 400),
        ("/v1/completions", json.dumps({"model": "a", "prompt": "hi", "temperature": 9}).encode(), 400),
        ("/v1/completions", json.dumps({"model": "a", "prompt": "   "}).encode(), 400),
        ("/v1/completions", json.dumps({"model": "nope", "prompt": "hi"}).encode(), 404),
        ("/v1/completions", json.dumps({"model": "a", "prompt": "hi " * 5000}).encode(), 400),
        ("/v1/chat/completions", json.dumps({"model": "a", "messages": []}).encode(), 400),
        ("/v1/chat/completions", json.dumps({"model": "a", "messages": [{"role": "system", "content": "x"}]}).encode(),
         400),
        ("/v1/retrieve", json.dumps({"model": "a", "query": "x", "k": 10_000}).encode(), 400),
        ("/v1/retrieve", json.dumps({"model": "a", "query": "x", "mode": "psychic"}).encode(), 400),
        ("/v1/retrieve", json.dumps({"model": "auto", "query": "  "}).encode(), 400),  # routed before searching
        ("/v1/retrieve", json.dumps({"model": "a", "query": "  "}).encode(), 400),
        ("/v1/completions", b"x" * (2 << 20), 413),
    ]
    for path, body, status in cases:
        response = httpx.post(f"{url}{path}", content=body, headers={**headers, "content-type": "application/json"})
        assert response.status_code == status, (path, body[:80], response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"], response.text
    assert httpx.get(f"{url}/v1/nothing-here").json()["error"]["type"] == "not_found_error"
    # /v1/retrieve is retro-peft's own endpoint: a misspelt field is refused, not ignored (results unfiltered)
    typo = httpx.post(f"{url}/v1/retrieve", headers=headers,
                      json={"model": "b", "query": "piano", "filter": {"doc_id": "chess"}})
    assert typo.status_code == 400 and typo.json()["error"]["param"] == "filter", typo.text


def test_no_openai_field_is_silently_ignored(url):
    """Fields the server does not implement are refused with a 400 naming them, unless they hold their no-op
    value; a misspelt field is refused as unknown; `user` and friends are accepted (documented: no effect)."""
    headers = {"Authorization": f"Bearer {KEY}"}
    chat = {"model": "a", "messages": [{"role": "user", "content": "Who invented the piano?"}], "max_tokens": 2}
    refused = [("/v1/chat/completions", {**chat, "top_logprobs": 2}, "top_logprobs"),
               ("/v1/chat/completions", {**chat, "response_format": {"type": "json_schema"}}, "response_format"),
               ("/v1/chat/completions", {**chat, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
               ("/v1/chat/completions", {**chat, "logit_bias": {"50256": -100}}, "logit_bias"),
               ("/v1/chat/completions", {**chat, "max_token": 5}, "max_token"),
               ("/v1/completions", {"model": "a", "prompt": "Who?", "logprobs": 6}, "logprobs"),
               ("/v1/completions", {"model": "a", "prompt": "Who?", "echo": True}, "echo")]
    for path, body, field in refused:
        response = httpx.post(f"{url}{path}", json=body, headers=headers)
        assert response.status_code == 400 and response.json()["error"]["param"] == field, (field, response.text)
    accepted = {**chat, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0, "tools": [],
                "response_format": {"type": "text"}, "user": "someone", "metadata": {"team": "x"}, "n": 1}
    response = httpx.post(f"{url}/v1/chat/completions", json=accepted, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["logprobs"] is None


def test_logprobs_in_openai_shapes(url):
    headers = {"Authorization": f"Bearer {KEY}"}
    chat = {"model": "a", "messages": [{"role": "user", "content": "Who invented the piano?"}], "max_tokens": 4,
            "logprobs": True, "top_logprobs": 2}
    body = httpx.post(f"{url}/v1/chat/completions", json=chat, headers=headers).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] > 0
    for entry in content:
        assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode())
        alternatives = entry["top_logprobs"]
        assert len(alternatives) == 2 and alternatives[0]["logprob"] >= alternatives[1]["logprob"]
        assert entry["logprob"] == pytest.approx(alternatives[0]["logprob"])  # greedy: the most likely token
    legacy = httpx.post(f"{url}/v1/completions", headers=headers,
                        json={"model": "a", "prompt": "Who invented the piano?", "max_tokens": 4, "logprobs": 1}).json()
    lp = legacy["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == len(lp["top_logprobs"])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and all(len(t) == 1 for t in lp["top_logprobs"])
    # streamed: each chunk carries the tokens decoded with its piece; together, the same entries
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**chat, "stream": True}, headers=headers) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [e for ev in events for c in ev["choices"] if c.get("logprobs") for e in c["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-5)


def chunked_post(url: str, path: str, chunks: list[bytes]) -> tuple[int, dict]:
    """POST with `Transfer-Encoding: chunked` and no Content-Length (http.client does so for an iterable body)."""
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        connection.request("POST", path, body=iter(chunks),
                           headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_chunked_bodies_are_held_to_the_size_limit(url):
    # No Content-Length to check up front: the bytes received are counted (default limit 1 MiB).
    for path in ("/v1/completions", "/v1/retrieve"):
        status, body = chunked_post(url, path, [b"x" * (64 << 10)] * 32)
        assert (status, body["error"]["code"]) == (413, "body_too_large"), (path, body)
    search = json.dumps({"model": "b", "query": "piano inventor", "k": 1}).encode()
    status, body = chunked_post(url, "/v1/retrieve", [search[:10], search[10:]])
    assert status == 200 and body["data"][0]["doc_id"] == "piano", body


def test_routing_errors_are_400_not_500(tmp_path, small_encoder_dir, bank):
    # `auto` compares scores across domains, so their indexes must share an encoder (EncoderMismatchError).
    mixed = AdapterBank(bank.base_model_name, max_new_tokens=4)
    mixed.load("mini", tiny_index(tmp_path / "idx-mini", DOCS[:3]).path)
    mixed.load("tiny", tiny_index(tmp_path / "idx-tiny", DOCS[3:], encoder=str(small_encoder_dir)).path)
    with serve_in_thread(create_app(settings(), mixed)) as mixed_url:
        headers = {"Authorization": f"Bearer {KEY}"}
        for path, body in [("/v1/retrieve", {"model": "auto", "query": "piano"}),
                           ("/v1/completions", {"model": "auto", "prompt": "Who invented the piano?"})]:
            response = httpx.post(f"{mixed_url}{path}", headers=headers, json=body)
            assert response.status_code == 400, (path, response.text)
            error = response.json()["error"]
            assert error["param"] == "model" and "encoder" in error["message"], error
        # a named domain needs no routing
        assert httpx.post(f"{mixed_url}/v1/retrieve", headers=headers,
                          json={"model": "tiny", "query": "piano"}).status_code == 200


def test_a_bad_log_level_is_a_settings_error(monkeypatch):
    monkeypatch.setenv("RETRO_PEFT_LOG_LEVEL", "verbose")
    with pytest.raises(InputError, match="log_level"):
        load_settings()
    monkeypatch.setenv("RETRO_PEFT_LOG_LEVEL", "debug")
    assert load_settings().log_level == "debug"


def test_an_internal_error_is_a_500_and_keeps_the_connection(bank, monkeypatch):
    def broken(*args, **kwargs):
        raise AssertionError("a bug inside generation")

    monkeypatch.setattr(bank, "answer_many", broken)
    with serve_in_thread(create_app(settings(), bank)) as base_url, httpx.Client() as http:
        for i in range(3):  # one keep-alive connection: each request after a 500 must still be answered
            reply = http.post(f"{base_url}/v1/completions", json={"model": "a", "prompt": f"Question {i}?",
                                                                   "max_tokens": 2},
                              headers={"Authorization": f"Bearer {KEY}"})
            assert reply.status_code == 500 and reply.json()["error"]["code"] == "internal_error"
        assert metric(base_url, "retro_peft_requests_total", route="/v1/completions", status="500", domain="a") == 3


def test_health_and_metrics(url, client):
    assert httpx.get(f"{url}/health/live").json()["status"] == "ok"
    ready = httpx.get(f"{url}/health/ready").json()
    assert ready["status"] == "ok" and ready["domains"] == {"a": "loaded", "b": "loaded", "plain": "loaded"}
    client.completions.create(model="b", prompt=QUESTIONS[3], max_tokens=3)
    assert metric(url, "retro_peft_requests_total", route="/v1/completions", status="200", domain="b") >= 1
    assert metric(url, "retro_peft_request_duration_seconds_count", route="/v1/completions", domain="b") >= 1
    assert metric(url, "retro_peft_generated_tokens_total", domain="b") >= 1
    assert metric(url, "retro_peft_batch_size_count") >= 1
    assert "retro_peft_queue_depth" in httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer sk-admin"}).text


def test_full_queue_is_503_with_retry_after_and_disconnect_frees_the_slot(bank):
    # A batch waits for 8 requests for 10 minutes: the two queued here never start.
    app = create_app(settings(max_batch_size=8, max_wait_ms=600_000, max_queue=2, request_timeout_s=600), bank)
    with serve_in_thread(app) as url:
        headers = {"Authorization": f"Bearer {KEY}"}
        body = {"model": "a", "prompt": QUESTIONS[0], "max_tokens": 4}
        results = []

        def give_up_soon():  # the client disconnects after a second
            try:
                httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=1.0)
            except httpx.TimeoutException:
                results.append("gave up")

        clients = [threading.Thread(target=give_up_soon) for _ in range(2)]
        for t in clients:
            t.start()
        deadline = time.monotonic() + 60
        while metric(url, "retro_peft_queue_depth") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        full = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
        assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
        assert full.json()["error"]["code"] == "overloaded"
        streamed = httpx.post(f"{url}/v1/completions", json={**body, "stream": True}, headers=headers)
        assert streamed.status_code == 503 and "retry-after" in streamed.headers
        for t in clients:
            t.join()
        assert results == ["gave up", "gave up"]
        while metric(url, "retro_peft_queue_depth") > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert metric(url, "retro_peft_queue_depth") == 0  # the disconnected requests left the queue


def test_request_timeout_is_503_with_retry_after(bank):
    app = create_app(settings(max_batch_size=8, max_wait_ms=600_000, request_timeout_s=0.5), bank)
    with serve_in_thread(app) as url:
        response = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": "a", "prompt": QUESTIONS[0], "max_tokens": 4})
        assert response.status_code == 503 and response.json()["error"]["code"] == "timeout"
        assert int(response.headers["retry-after"]) >= 1


def test_a_server_configured_with_frozen_kv_caches_builds_them_and_answers_through_them(bank, tmp_path):
    a, plain = bank.domains["a"], bank.domains["plain"]
    domains = [{"name": "a", "index": str(a.index.path), "adapter": str(a.adapter_dir), "kv_cache": str(tmp_path / "a.kv")},
               {"name": "plain", "index": str(plain.index.path), "kv_cache": str(tmp_path / "plain.kv"),
                "kv_layout": "prefix"}]
    with pytest.raises(ValueError, match="kv_layout needs kv_cache"):
        ServeSettings(domains=[{"name": "x", "index": "i", "kv_layout": "prefix"}])
    (tmp_path / "a-file").write_text("not a folder")  # a cache that cannot be written fails its domain alone
    broken = {"name": "broken", "index": str(plain.index.path), "kv_cache": str(tmp_path / "a-file" / "kv")}
    configured = ServeSettings(**{**settings().model_dump(), "model": bank.base_model_name,
                                  "domains": domains + [broken]})
    with serve_in_thread(create_app(configured), wait_ready=False) as base_url:  # its own bank builds both caches
        deadline = time.monotonic() + 120
        while (ready := httpx.get(f"{base_url}/health/ready")).json()["status"] == "loading" and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        status = ready.json()["domains"]
        assert ready.status_code == 503 and status.pop("broken").startswith("error: domain 'broken'")
        assert status == {"a": "loaded", "plain": "loaded"}
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0)
        served = [client.completions.create(model=d, prompt=QUESTIONS[0], max_tokens=6, temperature=0)
                  for d in ("a", "plain")]
    assert (tmp_path / "a.kv").is_file() and (tmp_path / "plain.kv").is_file()
    reference = AdapterBank(bank.base_model_name, max_new_tokens=8)  # reads the files the server wrote
    for d in domains:
        reference.load(d["name"], d["index"], d.get("adapter"), kv_cache=d["kv_cache"], kv_layout=d.get("kv_layout"))
    from retro_peft.generation import SamplingConfig

    want = reference.answer_many([QUESTIONS[0]] * 2, ["a", "plain"], sampling=SamplingConfig(max_new_tokens=6))
    assert [c.choices[0].text for c in served] == [w.text for w in want]


# -- answer choices and abstention -----------------------------------------------------------------

YES_NO = ["yes", "no", "maybe"]


def last_event(url: str, path: str, body: dict) -> tuple[str, dict]:
    """A streamed answer's text, and its last chunk's choice (the one with the finish reason)."""
    with httpx.stream("POST", f"{url}{path}", headers={"Authorization": f"Bearer {KEY}"},
                      json={**body, "stream": True}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line and line != "data: [DONE]"]
    choices = [e["choices"][0] for e in events if e["choices"]]
    text = "".join(c.get("text") or c.get("delta", {}).get("content") or "" for c in choices)
    return text, choices[-1]


def test_guided_choice_answers_one_of_them_and_every_choice_says_whether_it_abstained(client, url):
    free = client.completions.create(model="a", prompt=QUESTIONS[1], max_tokens=6, temperature=0)
    assert free.choices[0].model_extra["abstained"] is False and free.choices[0].model_extra["answerability"] is None
    # same question, now constrained: not the cached free answer (the choices are part of the cache key)
    guided = client.completions.create(model="a", prompt=QUESTIONS[1], max_tokens=6, temperature=0,
                                       extra_body={"guided_choice": YES_NO})
    assert guided.choices[0].text in YES_NO and guided.choices[0].model_extra["abstained"] is False
    assert guided.choices[0].model_extra["citations"]
    chat = client.chat.completions.create(model="plain", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                          extra_body={"guided_choice": ["Cristofori", "Scheele"]})
    assert chat.choices[0].message.content in ("Cristofori", "Scheele")
    assert chat.choices[0].model_extra["abstained"] is False and "answerability" in chat.choices[0].model_extra
    several = client.completions.create(model="auto", prompt=QUESTIONS[:3], extra_body={"guided_choice": YES_NO})
    assert all(c.text in YES_NO for c in several.choices)

    for path, body in (("/v1/completions", {"model": "b", "prompt": QUESTIONS[0]}),
                       ("/v1/chat/completions", {"model": "b", "messages": [{"role": "user", "content": QUESTIONS[0]}]})):
        text, last = last_event(url, path, {**body, "guided_choice": YES_NO})
        assert text in YES_NO and last["abstained"] is False and "answerability" not in last  # no head: absent
        assert last["finish_reason"] == "stop" and "citations" in last

    headers = {"Authorization": f"Bearer {KEY}"}
    for bad in (["yes"], ["yes", ""], ["yes", "  "], ["yes", "yes"], "yes", [1, 2], [str(i) for i in range(33)]):
        response = httpx.post(f"{url}/v1/completions", headers=headers,
                              json={"model": "a", "prompt": QUESTIONS[0], "guided_choice": bad})
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"]["param"].startswith("guided_choice"), response.text


def test_domains_with_choices_and_answerability_heads_serve_them_and_mix_in_a_batch(bank, tmp_path):
    from test_bank import adapter_with_head

    a, plain = bank.domains["a"], bank.domains["plain"]
    head = adapter_with_head(a.adapter_dir, tmp_path / "with-head", a.index, threshold=1e9)
    domains = [{"name": "yn", "index": str(plain.index.path), "choices": YES_NO},
               {"name": "strict", "index": str(a.index.path), "adapter": str(head)},  # abstains on every question
               {"name": "off", "index": str(a.index.path), "adapter": str(head), "abstain_at": 0.0},
               {"name": "a", "index": str(a.index.path), "adapter": str(a.adapter_dir)}]
    configured = ServeSettings(**{**settings(max_batch_size=4, max_wait_ms=600_000).model_dump(),
                                  "model": bank.base_model_name, "domains": domains})
    requests = [("yn", None), ("strict", None), ("off", ["up", "down"]), ("a", ["red", "blue"])]
    with serve_in_thread(create_app(configured)) as base_url:
        async def both_rounds():  # each round fills the batch before its (very long) wait ends: one mixed pass
            client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0)

            async def ask(model, choices, question=QUESTIONS[0]):
                extra = {} if choices is None else {"guided_choice": choices}
                return (await client.completions.create(model=model, prompt=question, temperature=0,
                                                        extra_body=extra)).choices[0]

            first = await asyncio.gather(*[ask(m, c) for m, c in requests])
            body = {"model": "strict", "messages": [{"role": "user", "content": QUESTIONS[1]}]}
            streamed = asyncio.to_thread(last_event, base_url, "/v1/chat/completions", body)
            second = await asyncio.gather(streamed, *[ask(m, c, QUESTIONS[2]) for m, c in requests[1:]])
            return first, second

        batched, ((streamed, last), *more) = asyncio.run(both_rounds())
        assert metric(base_url, "retro_peft_batch_size_bucket", le="4.0") == 2
        assert metric(base_url, "retro_peft_batch_size_bucket", le="2.0") == 0
    yn, strict, off, guided = (c.model_extra for c in batched)
    assert batched[0].text in YES_NO and batched[3].text in ("red", "blue") and batched[2].text in ("up", "down")
    assert yn["abstained"] is False and yn["answerability"] is None
    assert strict["abstained"] is True and batched[1].text == a.generator.retrieval.abstention
    assert isinstance(strict["answerability"], float) and strict["answerability"] < 1e9
    assert off["abstained"] is False and isinstance(off["answerability"], float)
    assert guided["answerability"] is None
    assert last["abstained"] is True and isinstance(last["answerability"], float)
    assert streamed == a.generator.retrieval.abstention
    assert more[0].model_extra["abstained"] and not more[1].model_extra["abstained"] and more[2].text in ("red", "blue")
