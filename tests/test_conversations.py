"""Conversations through the bank and the server: earlier turns and system messages in the prompt, the oldest
dropped to fit the budget (and reported), a domain's history strategy, chat messages checked field by field.
Tiny random Llama, real indexes, a real uvicorn server with the official openai client."""

import json
from dataclasses import replace

import httpx
import openai
import pytest

from retro_peft.adapters.model import RetroPeftModel
from retro_peft.domains.bank import DomainError
from retro_peft.generation import SamplingConfig
from retro_peft.index import open_index
from retro_peft.serving.app import create_app
from retro_peft.serving.settings import ServeSettings
from retro_peft.serving.testing import serve_in_thread

from test_serve import KEY, QUESTIONS, build_bank, settings

FOLLOW_UP = "Where does it flow into?"
HISTORY = [{"role": "system", "content": "You answer questions about European rivers."},
           {"role": "user", "content": "Tell me about the Rhine."},
           {"role": "assistant", "content": "It is a European river that begins in the Swiss Alps."}]
# Twelve long turns: far past the 160 tokens passages leave to the history (and past the whole budget).
LONG = [{"role": ("user", "assistant")[i % 2], "content": f"Turn {i}: " + "the river and its valleys " * 12}
        for i in range(12)]
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    return build_bank(tmp_path_factory.mktemp("conversations"))


@pytest.fixture(scope="module")
def url(bank):
    with serve_in_thread(create_app(settings(), bank)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def _domain_generator(bank, name: str):
    """A Generator of its own for a bank's domain: its adapter loaded apart, its index opened again."""
    domain = bank.domains[name]
    return RetroPeftModel.load(domain.adapter_dir).generator(open_index(domain.index.path), max_new_tokens=8)


def test_bank_rows_with_history_are_prompted_and_answered_as_the_domains_generator(bank, monkeypatch):
    generator = _domain_generator(bank, "a")
    questions = [FOLLOW_UP, QUESTIONS[0], "And how long is it?", FOLLOW_UP]
    histories = [HISTORY, None, HISTORY[1:], LONG]
    rows = []
    run = bank._runner.run
    monkeypatch.setattr(bank._runner, "run", lambda batch, *a, **kw: rows.extend(batch) or run(batch, *a, **kw))
    answers = bank.answer_many(questions, ["a"] * 4, history=histories)
    want = generator.prompts(questions, history=histories)
    assert [r.prompt.text for r in rows] == [p.text for p in want]
    assert "You answer questions about European rivers." in rows[0].prompt.text
    assert "Tell me about the Rhine." in rows[0].prompt.text and "Tell me about the Rhine." in rows[2].prompt.text
    assert [a.text for a in answers] == [a.text for a in generator.answer_many(questions, history=histories)]
    assert answers[0].prompt_tokens > bank.answer(FOLLOW_UP, "a").prompt_tokens  # the turns are in the prompt
    # a history past the budget still answers: the oldest turns are left out, and counted
    assert [a.dropped_turns for a in answers][:3] == [0, 0, 0] and answers[3].dropped_turns > 0
    assert answers[3].prompt_tokens <= generator.retrieval.context_tokens and answers[3].completion_tokens > 0
    assert [t.content for t in rows[3].prompt.history] == [t["content"].strip() for t in LONG[answers[3].dropped_turns:]]

    # a mixed batch (LoRA domains, an index-only domain, the base model) with and without history: as singles
    domains = ["a", "b", None, "plain", "a"]
    mixed = bank.answer_many([FOLLOW_UP] * 5, domains, history=[HISTORY, HISTORY, HISTORY, None, LONG])
    singles = [bank.answer(FOLLOW_UP, d, history=h) for d, h in zip(domains, [HISTORY, HISTORY, HISTORY, None, LONG])]
    assert [(a.text, a.prompt_tokens, a.dropped_turns) for a in mixed] == \
        [(a.text, a.prompt_tokens, a.dropped_turns) for a in singles]
    streamed = list(bank.stream(FOLLOW_UP, "a", history=HISTORY))
    assert streamed[-1].text == answers[0].text and "".join(streamed[:-1]).strip() == answers[0].text


def test_a_domains_history_strategy_applies_to_its_retrieval_and_its_version(bank):
    a = bank.domains["a"]
    concat = bank.load("a-concat", a.index.path, a.adapter_dir, history="concat")
    try:
        assert concat.generator.retrieval == replace(a.generator.retrieval, history="concat")
        assert a.generator.retrieval.history == "none" and concat.version != a.version
        generator = _domain_generator(bank, "a")
        generator.retrieval = replace(generator.retrieval, history="concat")
        got = bank.answer(FOLLOW_UP, "a-concat", history=HISTORY)
        want = generator.answer(FOLLOW_UP, history=HISTORY)
        assert (got.text, got.passages) == (want.text, want.passages)
        with pytest.raises(DomainError, match="domain 'x': history must be one of none, concat, rewrite"):
            bank.load("x", a.index.path, a.adapter_dir, history="summarise")
        assert "x" not in bank.domains
    finally:
        bank.unload("a-concat")


def test_the_server_reads_a_registered_domains_history(bank, tmp_path, monkeypatch):
    from retro_peft.domains import add_domain
    from retro_peft.serving.state import ServerState

    monkeypatch.setenv("RETRO_PEFT_HOME", str(tmp_path / "home"))
    add_domain("rivers", str(bank.domains["a"].index.path), history="rewrite")
    add_domain("plain", str(bank.domains["plain"].index.path))
    configured = {d.name: d.history for d in ServerState(settings())._configured_domains()}
    assert configured == {"rivers": "rewrite", "plain": None}
    with pytest.raises(ValueError, match="history"):
        ServeSettings(domains=[{"name": "x", "index": "i", "history": "summarise"}])


# -- the server -------------------------------------------------------------------------------------------


def chat(url: str, messages: list, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", headers=HEADERS, timeout=60,
                      json={"model": "a", "messages": messages, **extra})


def test_a_served_chat_has_its_system_message_and_earlier_turns_in_the_prompt(bank, client, url):
    alone = client.chat.completions.create(model="a", messages=[{"role": "user", "content": FOLLOW_UP}])
    # a developer message is a system message; a list of text parts is their text, one part a line
    messages = [{"role": "developer", "content": HISTORY[0]["content"]},
                {"role": "user", "content": [{"type": "text", "text": "Tell me about"},
                                             {"type": "text", "text": "the Rhine."}]},
                HISTORY[2], {"role": "user", "content": FOLLOW_UP}]
    served = client.chat.completions.create(model="a", messages=messages)
    history = [HISTORY[0], {"role": "user", "content": "Tell me about\nthe Rhine."}, HISTORY[2]]
    want = bank.answer(FOLLOW_UP, "a", history=history, sampling=SamplingConfig(max_new_tokens=8))
    assert served.choices[0].message.content == want.text
    assert served.usage.prompt_tokens == want.prompt_tokens > alone.usage.prompt_tokens
    assert served.usage.model_extra["dropped_turns"] == alone.usage.model_extra["dropped_turns"] == 0
    completion = client.completions.create(model="a", prompt=FOLLOW_UP)
    assert "dropped_turns" not in completion.usage.model_extra  # completions have no turns

    # the turns are part of the response cache's key: another history is another answer, the same one a hit
    first = chat(url, [*HISTORY[1:], {"role": "user", "content": FOLLOW_UP}])
    again = chat(url, [*HISTORY[1:], {"role": "user", "content": FOLLOW_UP}])
    other = chat(url, [HISTORY[1], {"role": "assistant", "content": "A river."}, {"role": "user", "content": FOLLOW_UP}])
    assert (first.headers["x-cache"], again.headers["x-cache"], other.headers["x-cache"]) == ("miss", "hit", "miss")
    assert first.json()["usage"] == again.json()["usage"] != other.json()["usage"]


def test_a_history_past_the_budget_answers_and_reports_the_dropped_turns(bank, url):
    messages = [HISTORY[0], *LONG, {"role": "user", "content": FOLLOW_UP}]
    response = chat(url, messages)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    want = bank.answer(FOLLOW_UP, "a", history=[HISTORY[0], *LONG], sampling=SamplingConfig(max_new_tokens=8))
    assert usage["dropped_turns"] == want.dropped_turns > 0 and usage["prompt_tokens"] == want.prompt_tokens
    assert response.json()["choices"][0]["message"]["content"] == want.text

    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=HEADERS, timeout=60,
                      json={"model": "a", "messages": messages, "stream": True,
                            "stream_options": {"include_usage": True}}) as streamed:
        events = [json.loads(line[6:]) for line in streamed.iter_lines() if line and line != "data: [DONE]"]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    last, usage_only = events[-2], events[-1]
    assert text.strip() == want.text and last["choices"][0]["finish_reason"]
    assert last["usage"]["dropped_turns"] == usage_only["usage"]["dropped_turns"] == want.dropped_turns
    assert "usage" not in events[0]  # only the last chunks carry it


def test_retrieval_history_is_accepted_per_request_and_checked(bank, url):
    messages = [*HISTORY, {"role": "user", "content": FOLLOW_UP}]
    for strategy in ("none", "concat", "rewrite"):
        response = chat(url, messages, retrieval={"history": strategy})
        assert response.status_code == 200, (strategy, response.text)
    generator = _domain_generator(bank, "a")
    generator.retrieval = replace(generator.retrieval, history="concat")
    cited = chat(url, messages, retrieval={"history": "concat"}).json()["choices"][0]["citations"]
    want = generator.answer(FOLLOW_UP, history=HISTORY)
    assert [c["chunk_id"] for c in cited] == [c[0] for c in want.citations]
    bad = chat(url, messages, retrieval={"history": "summarise"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "retrieval.history", bad.text


@pytest.mark.parametrize("messages, param, message", [
    ([{"role": "user", "content": "Hi?"}, {"role": "tool", "content": "42"}], "messages[1].role", "not supported"),
    ([{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}], "messages[1].role",
     "must end with the question"),
    ([{"role": "system", "content": " "}, {"role": "user", "content": "Hi?"}], "messages[0].content", "empty"),
    ([{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": None}, {"role": "user", "content": "So?"}],
     "messages[1].content", "empty"),
    ([{"role": "user", "content": [{"type": "text", "text": "  "}]}], "messages[0].content", "empty"),
    ([{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hello."}], "messages",
     "no user message"),
    ([{"role": "narrator", "content": "Once"}, {"role": "user", "content": "Hi?"}], "messages.0.role", "system"),
])
def test_malformed_messages_are_400s_naming_the_field(url, messages, param, message):
    response = chat(url, messages)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_earlier_turns_count_towards_the_prompt_and_token_limits(bank):
    configured = ServeSettings(**{**settings().model_dump(), "generation": {"default_max_tokens": 8,
                                                                            "max_prompt_tokens": 120}})
    with serve_in_thread(create_app(configured, bank)) as base_url:
        messages = [*HISTORY, {"role": "user", "content": FOLLOW_UP}]
        response = chat(base_url, messages, temperature=0.5)  # sampled: not cached, always admitted
        assert response.status_code == 200, response.text
        tokens = sum(len(bank.tokenizer(m["content"], add_special_tokens=False).input_ids) for m in messages)
        limit = int(response.headers["x-ratelimit-limit-tokens"])
        assert limit - int(response.headers["x-ratelimit-remaining-tokens"]) == tokens + 8
        too_long = chat(base_url, [*LONG[:4], {"role": "user", "content": FOLLOW_UP}])
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "messages", too_long.text
        assert too_long.json()["error"]["code"] == "context_length_exceeded"
