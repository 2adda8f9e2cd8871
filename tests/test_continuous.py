"""Continuous batching: rows join and leave one running decode batch (generation/continuous.py) and the
server's scheduler over it (serving/scheduler.py). Tiny random Llama in float32, real indexes, real servers."""

import asyncio
import json
import time

import httpx
import pytest
from peft import LoraConfig

from retro_peft.adapters.config import LLAMA_LINEAR, RetrievalConfig, RetroLoraConfig
from retro_peft.adapters.model import RetroPeftModel
from retro_peft.domains.bank import AdapterBank
from retro_peft.generation import SamplingConfig, StaticDecode
from retro_peft.generation.continuous import ContinuousBatch, Request
from retro_peft.serving.app import create_app
from retro_peft.serving.scheduler import ContinuousScheduler
from retro_peft.serving.settings import ServeSettings
from retro_peft.serving.testing import serve_in_thread

from helpers_adapters import DOCS, single_thread, smollm2_tokenizer, tiny_index, tiny_llama_folder

QUESTIONS = ["Who invented the piano?", "Into which sea does the Rhine flow?", "What is the atomic number of oxygen?",
             "Which shrub are tea leaves taken from?"]
KEY = "sk-test-continuous"


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    """LoRA domains `a`, `b` (random adapters: they really decode differently), `plain` (index only) and `a-kv`
    (adapter `a` answering through its frozen KV cache)."""
    single_thread()
    root = tmp_path_factory.mktemp("continuous")
    base = tiny_llama_folder(root / "base", smollm2_tokenizer(), initializer_range=0.2)
    index_a = tiny_index(root / "idx-a", DOCS[:3])
    index_b = tiny_index(root / "idx-b", DOCS[3:])
    bank = AdapterBank(str(base), max_new_tokens=8)
    adapters = {}
    for i, (name, index) in enumerate([("a", index_a), ("b", index_b)]):
        peft = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules=list(LLAMA_LINEAR),
                          init_lora_weights=False)
        model = RetroPeftModel.create(str(base), RetroLoraConfig(peft=peft, retrieval=RetrievalConfig(k=2)), seed=i)
        adapters[name] = model.save(root / f"adapter-{name}", index=index)
        bank.load(name, index.path, adapters[name])
    bank.load("plain", index_b.path)
    bank.load("a-kv", index_a.path, adapters["a"], kv_cache=root / "a.kv")
    return bank


def _rows(bank, question, domain):
    return bank.rows([question], [domain])[0]


def _alone(bank, question, domain, sampling, on_text=None):
    stream = None if on_text is None else (lambda _row, delta: on_text(delta))
    return bank.answer_many([question], [domain], sampling=sampling, on_text=stream)[0]


def _static(bank, slots: bool):
    """The engine's static decoding for `slots` (uncompiled here: the fixed-shape path CUDA graphs replay)."""
    return StaticDecode(bank.runner.model, compile=False) if slots else None


@pytest.mark.parametrize("slots", [False, True], ids=["growing-cache", "static-slots"])
def test_rows_joining_at_different_steps_answer_as_alone(bank, slots):
    # (question, domain, sampling, the step it joins at): mixed adapters, the base model, retrieval only, a
    # frozen KV cache's row, different max tokens and stop strings; in a growing cache, or in the slots of a
    # static cache (rows copied in at the shared write column, freed slots reused, repacked as it fills)
    plan = [(QUESTIONS[0], "a", SamplingConfig(max_new_tokens=12), 0),
            (QUESTIONS[1], "b", SamplingConfig(max_new_tokens=5), 0),
            (QUESTIONS[2], None, SamplingConfig(max_new_tokens=9), 2),
            (QUESTIONS[3], "plain", SamplingConfig(max_new_tokens=12), 3),
            (QUESTIONS[1], "a-kv", SamplingConfig(max_new_tokens=10), 3),
            (QUESTIONS[2], "b", SamplingConfig(max_new_tokens=3), 6)]
    alone_streamed = {i: [] for i in range(len(plan) + 1)}
    alone = [_alone(bank, q, d, s, alone_streamed[i].append) for i, (q, d, s, _) in enumerate(plan)]
    # a stop string cut from one of the answers: a row that stops on it mid-answer
    cut = next(a.text for a in alone if len(a.text.strip()) > 6).strip()[3:6]
    stopped = (QUESTIONS[0], "a", SamplingConfig(max_new_tokens=12, stop=(cut,)), 1)
    plan.append(stopped)
    alone.append(_alone(bank, *stopped[:3], alone_streamed[len(plan) - 1].append))
    assert alone[-1].finish_reason == "stop" and len(alone[-1].text) < len(alone[0].text)

    streamed = {i: [] for i in range(len(plan))}
    requests = [Request(_rows(bank, q, d), s, on_text=streamed[i].append, tag=bank.adapter_of(d))
                for i, (q, d, s, _) in enumerate(plan)]
    engine = ContinuousBatch(bank.runner, bank.adapters_for, static=_static(bank, slots))
    assert (engine._slots is not None) == slots
    repacks, held = [], set()
    if slots:
        repack = engine._slots._repack
        engine._slots._repack = lambda *a: repacks.append(a[:3]) or repack(*a)
    answers, step, widths = {}, 0, set()
    while len(answers) < len(plan):
        joining = [r for r, (*_, at) in zip(requests, plan) if at == step]
        for done in engine.admit(joining) + engine.step():
            answers[requests.index(done.request)] = done.answer
        widths.add(engine.running)
        held |= {(id(r.request), r.slot) for r in engine.rows}
        step += 1
    assert len(widths) > 3  # rows really joined and left between steps
    if slots:  # (slots, width, write column): 8 slots (a batch bucket), repacked wider when a longer prompt
        # joined; a freed slot taken again by a later row
        assert len(repacks) >= 2 and {n for n, *_ in repacks} == {8} and repacks[-1][1] > repacks[0][1]
        assert len({slot for _, slot in held}) < len({request for request, _ in held})
    assert [answers[i].text for i in range(len(plan))] == [a.text for a in alone]
    assert [answers[i].finish_reason for i in range(len(plan))] == [a.finish_reason for a in alone]
    assert [answers[i].completion_tokens for i in range(len(plan))] == [a.completion_tokens for a in alone]
    assert all("".join(streamed[i]) == "".join(alone_streamed[i]) for i in range(len(plan)))
    assert engine.running == 0 and engine._cache is None


@pytest.mark.parametrize("slots", [False, True], ids=["growing-cache", "static-slots"])
def test_a_long_prompt_is_prefilled_in_chunks_while_the_running_rows_decode(bank, slots):
    # Chunked prefill: a prompt longer than chunk_tokens is read a chunk per call between steps; the running
    # row gains a token at every step meanwhile, and both answers are their alone answers.
    long_question = " ".join(["Tell me what the documents say about rivers, seas, tea and pianos."] * 6)
    running = Request(_rows(bank, QUESTIONS[0], "a"), SamplingConfig(max_new_tokens=40), tag="a")
    long_row = _rows(bank, long_question, "b")
    chunk = 16
    chunks = -(-len(long_row.prompt.input_ids) // chunk)
    assert chunks >= 4
    long = Request(long_row, SamplingConfig(max_new_tokens=6), tag="b")
    engine = ContinuousBatch(bank.runner, bank.adapters_for, static=_static(bank, slots))
    finished = engine.admit([running]) + engine.step()
    finished += engine.admit([long], chunk_tokens=chunk)
    grown, calls = [], 1
    while engine.prefilling:
        assert [r.request for r in engine.rows] == [running]
        before = len(engine.rows[0].tokens)
        finished += engine.step()
        grown.append(len(engine.rows[0].tokens) - before)
        finished += engine.prefill_chunk(chunk)
        calls += 1
    assert calls == chunks and set(grown) == {1} and engine.running == 2
    with pytest.raises(ValueError, match="prefill"):
        engine._prefill = object()
        engine.admit([running])
    engine._prefill = None
    while engine.running:
        finished += engine.step()
    got = {id(f.request): f.answer.text for f in finished}
    assert got[id(running)] == _alone(bank, QUESTIONS[0], "a", running.sampling).text
    assert got[id(long)] == _alone(bank, long_question, "b", long.sampling).text


def test_sampled_rows_keep_their_own_seed_beside_others(bank):
    sampled = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    alone = _alone(bank, QUESTIONS[0], "a", sampled).text
    engine = ContinuousBatch(bank.runner, bank.adapters_for)
    others = [Request(_rows(bank, q, "b"), SamplingConfig(max_new_tokens=8, temperature=1.0, seed=s), tag="b")
              for s, q in enumerate(QUESTIONS[1:])]
    mine = Request(_rows(bank, QUESTIONS[0], "a"), sampled, tag="a")
    finished = engine.admit(others) + engine.step()
    finished += engine.admit([mine])
    while engine.running:
        finished += engine.step()
    assert next(f.answer.text for f in finished if f.request is mine) == alone


def test_a_cancelled_row_leaves_at_the_next_step(bank):
    flag = {"cancelled": False}
    engine = ContinuousBatch(bank.runner, bank.adapters_for)
    gone = Request(_rows(bank, QUESTIONS[0], "a"), SamplingConfig(max_new_tokens=50), cancelled=lambda: flag["cancelled"],
                   tag="a")
    stays = Request(_rows(bank, QUESTIONS[1], "b"), SamplingConfig(max_new_tokens=50), tag="b")
    assert engine.admit([gone, stays]) + engine.step() == []
    flag["cancelled"] = True
    finished = engine.step()
    assert [(f.request, f.answer.finish_reason) for f in finished] == [(gone, "cancelled")]
    assert engine.running == 1 and engine._mask.shape[0] == 1


def test_rows_the_engine_does_not_decode_are_refused(bank):
    assert not ContinuousBatch.decodes(_rows(bank, QUESTIONS[0], "a"), SamplingConfig(logprobs=2))
    row = bank.domains["a"].generator.rows([QUESTIONS[0]], choices=[("yes", "no")])[0]
    assert not ContinuousBatch.decodes(row, SamplingConfig())
    with pytest.raises(ValueError, match="BatchRunner"):
        ContinuousBatch(bank.runner).admit([Request(row, SamplingConfig())])


def _settings(**batching) -> ServeSettings:
    return ServeSettings(auth={"keys": [{"name": "test", "key": KEY}]},
                         batching={"mode": "continuous", **batching}, generation={"default_max_tokens": 8},
                         cache={"enabled": False})  # every answer decoded, none from the cache


async def _stream(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, str]:
    text = ""
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                             headers={"Authorization": f"Bearer {KEY}"}) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0].get("text") or ""
        return response.status_code, text


@pytest.fixture(params=[False, True], ids=["growing-cache", "static-slots"])
def static_bank(bank, request):
    """The bank as `compile_decode` leaves it (a StaticDecode, uncompiled here) or without static decoding."""
    bank.runner.static = _static(bank, request.param)
    yield bank
    bank.runner.static = None


def test_a_continuous_server_streams_concurrent_requests_as_alone_and_frees_a_gone_client(static_bank):
    bank = static_bank
    app = create_app(_settings(max_batch_size=4), bank)
    plan = [(QUESTIONS[i % 4], model, tokens) for i, (model, tokens) in
            enumerate([("a", 8), ("b", 3), ("plain", 6), ("a-kv", 8), ("b", 8), ("a", 2)])]
    with serve_in_thread(app) as url:
        scheduler = app.state.server.batcher
        assert isinstance(scheduler, ContinuousScheduler)
        assert (scheduler._engine._slots is not None) == (bank.runner.static is not None)

        async def ask(together: bool):
            async with httpx.AsyncClient(timeout=120) as client:
                calls = [_stream(client, url, {"model": m, "prompt": q, "max_tokens": t}) for q, m, t in plan]
                return await asyncio.gather(*calls) if together else [await call for call in calls]

        def batched() -> tuple[float, float]:  # (rows over all decode steps, decode steps)
            registry = app.state.server.metrics.registry
            return (registry.get_sample_value("retro_peft_batch_size_sum") or 0.0,
                    registry.get_sample_value("retro_peft_batch_size_count") or 0.0)

        alone = asyncio.run(ask(together=False))
        rows_before, steps_before = batched()
        together = asyncio.run(ask(together=True))
        rows, steps = batched()
        assert (rows - rows_before) / (steps - steps_before) > 2  # they really decoded together
        assert [status for status, _ in together] == [200] * len(plan)
        assert together == alone
        assert len({text for _, text in alone}) > 3

        async def beside_the_pass_path():  # rows the engine does not decode go through a pass, between steps
            async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as client:
                free = _stream(client, url, {"model": "b", "prompt": QUESTIONS[0], "max_tokens": 8})
                guided = client.post(f"{url}/v1/completions", json={"model": "a", "prompt": QUESTIONS[0],
                                                                    "guided_choice": ["yes", "no"]})
                scored = client.post(f"{url}/v1/completions", json={"model": "plain", "prompt": QUESTIONS[2],
                                                                    "max_tokens": 4, "logprobs": 2})
                return await asyncio.gather(free, guided, scored)

        free, guided, scored = asyncio.run(beside_the_pass_path())
        assert free == alone[4]
        assert guided.status_code == 200 and guided.json()["choices"][0]["text"] in ("yes", "no")
        assert scored.status_code == 200 and len(scored.json()["choices"][0]["logprobs"]["tokens"]) >= 1

        async def give_up_after_first_piece():  # a long answer; the client goes away after its first event
            async with httpx.AsyncClient(timeout=120) as client:
                async with client.stream("POST", f"{url}/v1/completions",
                                         json={"model": "a", "prompt": QUESTIONS[0], "max_tokens": 400,
                                               "stream": True},
                                         headers={"Authorization": f"Bearer {KEY}"}) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            return scheduler._engine.running

        assert asyncio.run(give_up_after_first_piece()) == 1
        deadline = time.monotonic() + 30
        while scheduler.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.in_flight == 0 and scheduler._engine.running == 0
        assert scheduler.finished["cancelled"] == 1  # its row left at a step, not after its 400 tokens


def test_a_continuous_server_prefills_a_long_prompt_in_chunks_beside_running_rows(bank, monkeypatch):
    import retro_peft.serving.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "PREFILL_TOKENS", 16)  # every prompt here is longer than a chunk
    long_question = " ".join(["Tell me what the documents say about rivers, seas, tea and pianos."] * 6)
    plan = [(QUESTIONS[0], "a", 24), (long_question, "b", 6), (QUESTIONS[1], "plain", 12), (long_question, "a", 4)]
    app = create_app(_settings(max_batch_size=4), bank)
    with serve_in_thread(app) as url:
        chunks = []
        engine_chunk = ContinuousBatch.prefill_chunk
        monkeypatch.setattr(ContinuousBatch, "prefill_chunk",
                            lambda self, n: chunks.append(n) or engine_chunk(self, n))

        async def ask(together: bool):
            async with httpx.AsyncClient(timeout=120) as client:
                calls = [_stream(client, url, {"model": m, "prompt": q, "max_tokens": t}) for q, m, t in plan]
                return await asyncio.gather(*calls) if together else [await call for call in calls]

        alone = asyncio.run(ask(together=False))
        assert chunks == []  # one request at a time: an idle batch prefills a prompt at once
        together = asyncio.run(ask(together=True))
        assert together == alone and [status for status, _ in together] == [200] * len(plan)
        assert len(chunks) > 4 and set(chunks) == {16}


def test_a_continuous_server_overloaded_answers_503_with_retry_after(bank):
    app = create_app(_settings(max_batch_size=1, max_queue=1), bank)
    with serve_in_thread(app) as url:
        async def flood():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(client.post(f"{url}/v1/completions",
                                                          json={"model": "a", "prompt": QUESTIONS[0], "max_tokens": 30},
                                                          headers={"Authorization": f"Bearer {KEY}"})
                                              for _ in range(6)))

        responses = asyncio.run(flood())
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses
        assert all(int(r.headers["retry-after"]) >= 1 for r in responses if r.status_code == 503)


def test_admission_never_evicts_an_adapter_a_running_row_uses(bank):
    bank._drop_adapter("a-kv")
    bank.max_adapters = 2  # a and b resident: a third needs an eviction
    try:
        assert not bank.bring_in("a-kv", in_use={"a", "b"})  # both in use: it waits
        assert set(bank._resident) == {"a", "b"}
        bank.keep_resident(["a"])  # a is now the most recent: b would go first by LRU, a is in use
        assert bank.bring_in("a-kv", in_use={"b"})
        assert set(bank._resident) == {"b", "a-kv"}  # the adapter in use stayed, the idle one went
    finally:
        bank.max_adapters = 8
        bank.keep_resident(["a", "b", "a-kv"])


def test_admitted_prompts_prefill_in_groups_of_similar_length():
    from retro_peft.generation.continuous import PADDING_SLACK, length_groups

    lengths = [100, 700, 120, 650, 400, 400]
    groups = length_groups(lengths)
    assert groups == [[0, 2], [4, 5], [3, 1]]  # by length: 400 beside 100 and 120 would pad 3 x 400 for 620 tokens
    for group in groups:  # each group's padding within the slack
        assert len(group) * max(lengths[i] for i in group) <= (1 + PADDING_SLACK) * sum(lengths[i] for i in group)
    assert length_groups([300] * 5) == [[0, 1, 2, 3, 4]] and length_groups([]) == []
    assert length_groups([100, 700], slack=10.0) == [[0, 1]]
