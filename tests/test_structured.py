"""Structured answers: JSON (`response_format`) enforced while decoding by xgrammar's token masks, per row,
and choice answers; through the library and a real server on 127.0.0.1.

A tiny random Llama (config-built, float32, the SmolLM2 tokenizer): its answers are noise, so every one that
parses and validates does so because of the masks. Schemas here bound their strings and arrays so that the
noise ends within max_tokens (an unbounded string under a random model runs to the limit, as a real model's
may: that answer ends with finish reason `length`, as OpenAI's do).
"""

import json

import httpx
import openai
import pytest

from retro_peft.domains.bank import AdapterBank
from retro_peft.errors import InputError
from retro_peft.generation import Generator, SamplingConfig
from retro_peft.generation.grammar import CLOSING_HORIZON, CLOSING_SLACK, JsonConstraint
from retro_peft.serving.app import create_app
from retro_peft.serving.settings import ServeSettings
from retro_peft.serving.testing import serve_in_thread

from helpers_adapters import DOCS, single_thread, smollm2_tokenizer, tiny_index, tiny_llama_folder

KEY = "sk-test-structured"
QUESTIONS = ["Who invented the piano?", "Into which sea does the Rhine flow?", "What is the atomic number of oxygen?",
             "Which shrub are tea leaves taken from?"]
SCHEMA = {"type": "object",
          "properties": {"answer": {"type": "string", "maxLength": 16},
                         "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                         "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
                         "kind": {"enum": ["person", "place", "thing"]},
                         "sure": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2}},
          "required": ["answer", "confidence", "year", "kind", "sure", "tags"]}


def check_schema(document: dict) -> None:
    """SCHEMA's constraints, checked by hand (jsonschema is not a dependency)."""
    assert isinstance(document, dict) and list(document) == list(SCHEMA["properties"]), document  # strict, in order
    assert isinstance(document["answer"], str) and len(document["answer"]) <= 16
    assert isinstance(document["confidence"], (int, float)) and 0 <= document["confidence"] <= 1
    assert isinstance(document["year"], int) and 1000 <= document["year"] <= 2100
    assert document["kind"] in ("person", "place", "thing")
    assert isinstance(document["sure"], bool)
    assert isinstance(document["tags"], list) and len(document["tags"]) <= 2
    assert all(isinstance(t, str) and len(t) <= 4 for t in document["tags"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    single_thread()
    # initializer_range 0.2: peaked random logits, so different prompts and seeds really decode differently
    return tiny_llama_folder(tmp_path_factory.mktemp("structured") / "base", smollm2_tokenizer(),
                             initializer_range=0.2)


@pytest.fixture(scope="module")
def generator(folder):
    from transformers import AutoModelForCausalLM

    return Generator(AutoModelForCausalLM.from_pretrained(folder), smollm2_tokenizer())


def test_every_json_answer_parses_and_validates_over_prompts_and_seeds(generator):
    constraint = JsonConstraint.of(SCHEMA)
    texts = set()
    for seed in range(3):
        sampling = SamplingConfig(max_new_tokens=80, temperature=0.0 if seed == 0 else 1.0, seed=seed)
        for answer in generator.answer_many(QUESTIONS, sampling=sampling, constraints=[constraint] * len(QUESTIONS)):
            assert answer.finish_reason == "stop", answer.text
            check_schema(json.loads(answer.text))
            texts.add(answer.text)
    assert len(texts) >= 4  # the noise differs: the masks, not one lucky sequence, make them valid
    for answer in generator.answer_many(QUESTIONS[:2], sampling=SamplingConfig(max_new_tokens=80),
                                        constraints=[JsonConstraint()] * 2):  # json_object: any object
        assert isinstance(json.loads(answer.text), dict)


# unbounded strings and arrays, nested: noise under it runs to any budget unless the budget closes it
OPEN_SCHEMA = {"type": "object",
               "properties": {"answer": {"type": "string"},
                              "detail": {"type": "object", "properties": {"why": {"type": "string"},
                                                                          "score": {"type": "number"}},
                                         "required": ["why", "score"]},
                              "tags": {"type": "array", "items": {"type": "string"}}},
               "required": ["answer", "detail", "tags"]}


def test_an_answer_cut_by_max_tokens_is_still_a_whole_document(generator):
    constraint = JsonConstraint.of(OPEN_SCHEMA)
    cut = 0
    for budget in (32, 40, 56):  # the shortest document of this schema is about 26 tokens
        for seed in range(3):
            sampling = SamplingConfig(max_new_tokens=budget, temperature=0.0 if seed == 0 else 1.0, seed=seed)
            for answer in generator.answer_many(QUESTIONS, sampling=sampling, constraints=[constraint] * 4):
                document = json.loads(answer.text)  # parses, whatever the budget
                assert list(document) == ["answer", "detail", "tags"] and list(document["detail"]) == ["why", "score"]
                assert isinstance(document["answer"], str) and isinstance(document["tags"], list)
                assert answer.completion_tokens <= budget
                cut += answer.completion_tokens >= budget - CLOSING_SLACK - 1
    assert cut >= 18  # most of these reached the budget: closed by it, not by the noise
    # the budget only steers the end: greedy, the first tokens are the model's own as with a large budget
    sampling = SamplingConfig(max_new_tokens=80, logprobs=0)
    short = generator.answer_many(QUESTIONS[:1], sampling=sampling, constraints=[constraint])[0]
    long = generator.answer_many(QUESTIONS[:1], sampling=SamplingConfig(max_new_tokens=160, logprobs=0),
                                 constraints=[constraint])[0]
    free = 80 - CLOSING_HORIZON
    assert [t for t, _, _ in short.logprobs][:free] == [t for t, _, _ in long.logprobs][:free]
    assert len(short.logprobs) <= 80 and short.logprobs != long.logprobs[:len(short.logprobs)]


def test_a_batch_mixing_a_json_row_and_a_free_row_decodes_the_free_row_as_alone(generator):
    sampling = SamplingConfig(max_new_tokens=12, logprobs=0)  # logprobs: the token ids of each answer
    alone = generator.answer_many([QUESTIONS[1]], sampling=sampling)[0]
    json_row, free_row = generator.answer_many([QUESTIONS[0], QUESTIONS[1]], sampling=sampling,
                                               constraints=[JsonConstraint.of(SCHEMA), None])
    assert [t for t, _, _ in free_row.logprobs] == [t for t, _, _ in alone.logprobs]
    assert free_row.text == alone.text and not free_row.text.startswith("{")
    assert json_row.text.startswith("{")
    # the reported log-probabilities are the model's own, before the mask: a finite number for each token
    assert all(lp <= 0 for _, lp, _ in json_row.logprobs)


def test_plain_answers_do_not_need_the_grammar_library(generator, monkeypatch):
    # xgrammar comes with the `serve` extra: `ask`/`eval` (and a server without JSON requests) decode without it
    import sys

    expected = generator.answer(QUESTIONS[0]).text
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` now raises ImportError
    assert generator.answer(QUESTIONS[0]).text == expected
    with pytest.raises(ImportError):
        generator.answer_many(QUESTIONS[:1], sampling=SamplingConfig(max_new_tokens=4),
                              constraints=[JsonConstraint.of({"type": "object", "properties": {"x": {"type": "integer"}}})])


def test_the_library_refuses_bad_constraints(generator):
    with pytest.raises(InputError, match="cannot be compiled"):
        generator.runner.grammars.compile(JsonConstraint.of({"type": "strnig"}))
    with pytest.raises(InputError, match="not both"):
        generator.answer_many([QUESTIONS[0]], choices=[["yes", "no"]], constraints=[JsonConstraint()])


# -- through a real server ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def url(folder, tmp_path_factory):
    bank = AdapterBank(str(folder), max_new_tokens=8)
    bank.load("plain", tiny_index(tmp_path_factory.mktemp("structured-index") / "idx", DOCS).path)
    settings = ServeSettings(auth={"keys": [{"name": "test", "key": KEY},
                                            {"name": "ops", "key": "sk-ops", "scopes": ["admin"]}]},
                             batching={"max_wait_ms": 5}, generation={"default_max_tokens": 80})
    with serve_in_thread(create_app(settings, bank)) as base_url:
        yield base_url


def post(url: str, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def passes(url: str) -> float:
    """Decode passes the server has run (its batch-size histogram's count)."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer sk-ops"}).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("retro_peft_batch_size_count"))


def json_schema(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_served_json_answers_validate_keep_citations_and_cache_by_format(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    for question in QUESTIONS:
        raw = client.chat.completions.with_raw_response.create(
            model="plain", messages=[{"role": "user", "content": question}], response_format=json_schema(SCHEMA))
        choice = raw.parse().choices[0]
        check_schema(json.loads(choice.message.content))
        assert choice.finish_reason == "stop" and choice.model_extra["citations"], choice  # it keeps its citations
        assert raw.headers["x-cache"] == "miss"
    body = {"model": "plain", "messages": [{"role": "user", "content": QUESTIONS[0]}]}
    assert post(url, {**body, "response_format": json_schema(SCHEMA)}).headers["x-cache"] == "hit"
    free = post(url, body)  # the same question without the format is another answer (the key has the format)
    assert free.headers["x-cache"] == "miss" and not free.json()["choices"][0]["message"]["content"].startswith("{")
    other = post(url, {**body, "response_format": {"type": "json_object"}})
    assert other.headers["x-cache"] == "miss"
    anything = other.json()["choices"][0]  # any object: its keys are unbounded strings, which noise may not end
    assert anything["message"]["content"].startswith("{")
    assert anything["finish_reason"] == "length" or isinstance(json.loads(anything["message"]["content"]), dict)
    completion = post(url, {"model": "plain", "prompt": QUESTIONS[1], "response_format": json_schema(SCHEMA)},
                      "/v1/completions")
    check_schema(json.loads(completion.json()["choices"][0]["text"]))


def test_streamed_json_answers_parse_when_joined(url):
    body = {"model": "plain", "messages": [{"role": "user", "content": QUESTIONS[2]}], "stream": True,
            "response_format": json_schema(SCHEMA)}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                   if json.loads(e)["choices"])
    check_schema(json.loads(text))


def test_choice_answers_are_one_of_the_choices(url):
    choices = ["Bartolomeo Cristofori", "Carl Scheele", "Rollo"]
    for question in QUESTIONS:
        answer = post(url, {"model": "plain", "messages": [{"role": "user", "content": question}],
                            "guided_choice": choices}).json()["choices"][0]
        assert answer["message"]["content"] in choices and answer["citations"]


def test_bad_formats_and_choices_are_400s_naming_the_field_before_any_generation(url):
    chat = {"model": "plain", "messages": [{"role": "user", "content": QUESTIONS[0]}]}
    bad = [({"type": "xml"}, "response_format.type"),
           ({"type": "json_schema"}, "response_format"),  # no schema
           ({"type": "json_object", "json_schema": {"name": "a", "schema": {}}}, "response_format"),
           ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "response_format.json_schema.name"),
           ({"type": "json_schema", "json_schema": {"name": "a", "schema": "an object"}},
            "response_format.json_schema.schema"),
           (json_schema({"type": "strnig"}), "response_format.json_schema.schema"),  # the library cannot compile it
           (json_schema({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}),
            "response_format.json_schema.schema")]
    before = passes(url)
    for response_format, field in bad:
        response = post(url, {**chat, "response_format": response_format})
        assert response.status_code == 400, (response_format, response.text)
        error = response.json()["error"]
        assert error["param"] == field and error["message"], (response_format, error)
    for body, field in [({**chat, "guided_choice": []}, "guided_choice"),
                        ({**chat, "guided_choice": ["yes"]}, "guided_choice"),
                        ({**chat, "guided_choice": ["yes", "no"], "response_format": {"type": "json_object"}},
                         "response_format")]:
        response = post(url, body)
        assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
    assert passes(url) == before  # refused before anything was queued
    assert post(url, {**chat, "response_format": {"type": "text"}}).status_code == 200
