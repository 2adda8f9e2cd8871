"""The adapter bank: mixed-domain batches, LRU eviction, failure isolation. Tiny random Llama, real indexes."""

import pytest
from peft import LoraConfig

from retro_peft.adapters import RetrievalConfig, RetroIA3Config, RetroLoraConfig
from retro_peft.adapters.config import LLAMA_LINEAR
from retro_peft.adapters.model import RetroPeftModel
from retro_peft.domains.bank import AdapterBank, DomainError
from retro_peft.errors import InputError
from retro_peft.generation import StaticDecode

from helpers_adapters import DOCS, smollm2_tokenizer, tiny_index, tiny_llama_folder

QUESTIONS = ["Who invented the piano?", "Into which sea does the Rhine flow?", "What is the atomic number of oxygen?",
             "Which shrub are tea leaves taken from?"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank")
    base = tiny_llama_folder(root / "base", smollm2_tokenizer(), initializer_range=0.2)
    index_a = tiny_index(root / "idx-a", DOCS[:3])
    index_b = tiny_index(root / "idx-b", DOCS[3:])
    adapters = {}
    for i, name in enumerate(["a", "b", "c"]):
        # init_lora_weights=False: random, non-zero adapters, so each domain really decodes differently
        peft = LoraConfig(task_type="CAUSAL_LM", r=4 + 2 * i, lora_alpha=16, target_modules=list(LLAMA_LINEAR),
                          init_lora_weights=False)
        model = RetroPeftModel.create(str(base), RetroLoraConfig(peft=peft, retrieval=RetrievalConfig(k=2)), seed=i)
        adapters[name] = model.save(root / f"adapter-{name}", index=index_a)
    ia3 = RetroPeftModel.create(str(base), RetroIA3Config(retrieval=RetrievalConfig(k=1)), seed=5)
    adapters["ia3"] = ia3.save(root / "adapter-ia3", index=index_b)
    return root, base, index_a.path, index_b.path, adapters


def _bank(setup, **kw):
    root, base, idx_a, idx_b, adapters = setup
    bank = AdapterBank(str(base), max_new_tokens=6, **kw)
    bank.load("a", idx_a, adapters["a"])
    bank.load("b", idx_b, adapters["b"])
    bank.load("c", idx_a, adapters["c"])
    bank.load("plain", idx_b)  # index, no adapter: base model + retrieval
    return bank


def test_mixed_domain_batch_equals_single_requests(setup):
    bank = _bank(setup)
    domains = ["a", "b", None, "c", "plain", "a", "b", "c"]
    questions = (QUESTIONS * 2)[: len(domains)]
    batched = bank.answer_many(questions, domains)
    singles = [bank.answer(q, d) if d else bank.answer_many([q], [None])[0] for q, d in zip(questions, domains)]
    assert [a.text for a in batched] == [a.text for a in singles]
    assert len({a.text for a in batched}) > 2  # the adapters really differ
    assert batched[2].citations == [] and batched[2].passages == []  # base row: no retrieval
    assert all(len(a.passages) == 2 for a in batched if a is not batched[2] and a is not batched[4])


def test_the_static_decode_path_gives_a_mixed_domain_batch_the_same_answers(setup):
    # What `compile_decode` replays as CUDA graphs, run eagerly: rows of several adapters (MixedLoRA), the base
    # model and retrieval-only in one fixed-shape pass; on a CPU the compiled path is refused at once.
    bank = _bank(setup)
    domains = ["a", "b", None, "c", "plain", "a"]
    questions = (QUESTIONS * 2)[: len(domains)]
    eager = [a.text for a in bank.answer_many(questions, domains)]
    bank._runner.static = StaticDecode(bank.model, compile=False)
    assert [a.text for a in bank.answer_many(questions, domains)] == eager
    with pytest.raises(InputError, match="CUDA"):
        AdapterBank(str(setup[1]), compile_decode=True)


def test_non_lora_adapters_decode_per_group_and_methods_do_not_mix(setup):
    root, base, idx_a, idx_b, adapters = setup
    bank = AdapterBank(str(base), max_new_tokens=6)
    bank.load("x", idx_b, adapters["ia3"])
    bank.load("y", idx_a, adapters["ia3"])
    bank.load("plain", idx_a)
    domains = ["x", "plain", "y", "x"]
    batched = bank.answer_many(QUESTIONS, domains)
    assert [a.text for a in batched] == [bank.answer(q, d).text for q, d in zip(QUESTIONS, domains)]
    with pytest.raises(DomainError, match="lora adapter cannot share the base model with the ia3 adapters"):
        bank.load("a", idx_a, adapters["a"])
    assert "a" not in bank.domains and bank.answer(QUESTIONS[0], "x").text == batched[0].text


def test_lru_eviction_keeps_at_most_max_adapters(setup):
    bank = _bank(setup, max_adapters=2)
    assert list(bank._resident) == ["b", "c"]
    assert set(bank.model.peft_config) == {"b", "c"}
    before = bank.answer(QUESTIONS[0], "a").text  # reloads "a", evicting "b"
    assert list(bank._resident) == ["c", "a"] and set(bank.model.peft_config) == {"c", "a"}
    fresh = _bank(setup)
    assert fresh.answer(QUESTIONS[0], "a").text == before
    assert bank.activate("c") < 0.05  # resident: a pointer switch


def test_broken_or_unknown_domain_fails_alone(setup, tmp_path):
    root, base, idx_a, idx_b, adapters = setup
    bank = _bank(setup)
    expected = bank.answer(QUESTIONS[1], "b").text
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in adapters["a"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DomainError, match="domain 'bad'"):
        bank.load("bad", idx_a, broken)
    with pytest.raises(DomainError, match="domain 'gone'.*adapter folder not found"):
        bank.load("gone", idx_a, tmp_path / "nowhere")
    assert "bad" not in bank.domains and "gone" not in bank.domains
    with pytest.raises(InputError, match="unknown domain 'nope'"):
        bank.answer("hi", "nope")
    with pytest.raises(InputError, match="question is empty"):
        bank.answer("  ", "a")
    assert bank.answer(QUESTIONS[1], "b").text == expected


def test_streaming_sampling_stop_strings_and_cancellation(setup):
    from retro_peft.generation import SamplingConfig

    bank = _bank(setup)
    greedy = bank.answer(QUESTIONS[0], "a")
    pieces = list(bank.stream(QUESTIONS[0], "a"))
    final = pieces.pop()
    assert final.text == greedy.text and "".join(pieces).strip() == greedy.text
    assert len(pieces) > 1  # really incremental

    # a stop string taken from the greedy text cuts the answer right before it
    stop = greedy.text.split()[1] if len(greedy.text.split()) > 1 else greedy.text[1:3]
    cut = bank.answer(QUESTIONS[0], "a", sampling=SamplingConfig(max_new_tokens=6, stop=(stop,)))
    assert stop not in cut.text and greedy.text.startswith(cut.text) and cut.finish_reason == "stop"

    sampled = [bank.answer(QUESTIONS[0], "a", sampling=SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=0.9,
                                                                        seed=s)).text for s in (1, 1, 2, 3)]
    assert sampled[0] == sampled[1]  # same seed, same text
    assert len(set(sampled)) > 1

    calls = []
    answers = bank.answer_many(QUESTIONS[:3], ["a", "b", "c"], cancelled=lambda row: calls.append(row) or row == 1)
    assert answers[1].finish_reason == "cancelled" and answers[1].completion_tokens == 0
    assert answers[0].text == greedy.text and answers[0].finish_reason in ("length", "stop")
    assert set(calls) >= {0, 1, 2}
    with pytest.raises(InputError, match="temperature"):
        SamplingConfig(temperature=-1)


def test_bfloat16_on_a_cpu_is_a_choice_and_bad_dtypes_are_named(setup):
    import torch

    from retro_peft.base_model import inference_dtype

    assert inference_dtype("cpu") == torch.float32 and inference_dtype("cuda:0", "auto") == torch.bfloat16
    with pytest.raises(InputError, match="unknown dtype 'fp8'"):
        inference_dtype("cpu", "fp8")
    bank = _bank(setup, dtype="bfloat16")
    assert bank.model.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    answers = bank.answer_many(QUESTIONS, ["a", "b", "plain", None])  # mixed adapters over a bf16 base
    assert all(a.completion_tokens > 0 for a in answers)
    # (no batched == single check here: bf16 rounds differently with the batch's shape; float32 is the CPU default)


def test_a_batch_with_more_adapters_than_fit_in_memory_decodes_in_parts(setup):
    bank = _bank(setup, max_adapters=2)
    domains = ["a", "b", "c", None, "c", "b", "a", "plain"]
    questions = (QUESTIONS * 2)[: len(domains)]
    batched = bank.answer_many(questions, domains)
    assert len(bank._resident) <= 2
    fresh = _bank(setup)  # room for all three
    assert [a.text for a in batched] == [a.text for a in fresh.answer_many(questions, domains)]


def test_a_prompt_past_the_models_context_is_refused_before_decoding(setup):
    bank = _bank(setup)
    context = bank.model.config.max_position_embeddings
    long_question = "Who invented the piano " + "and why " * context + "?"
    with pytest.raises(InputError, match=f"exceeds the model's context of {context} tokens"):
        bank.answer_many([QUESTIONS[0], long_question], ["a", "b"])
    assert bank.answer(QUESTIONS[0], "a").completion_tokens > 0  # nothing else is affected


def test_domains_answer_through_their_frozen_kv_cache_alone_mixed_and_as_their_generator(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    from retro_peft.generation import Generator
    from retro_peft.index import open_index
    from retro_peft.kvcache import FrozenKVCache

    root, base, idx_a, idx_b, adapters = setup
    bank = AdapterBank(str(base), max_new_tokens=6)
    bank.load("plain-kv", idx_b, kv_cache=tmp_path / "plain.kv")  # computed and written on first load
    bank.load("a-kv", idx_a, adapters["a"], kv_cache=tmp_path / "kv" / "a.kv")
    bank.load("b", idx_b, adapters["b"])  # no cache: full prefill
    assert (tmp_path / "plain.kv").is_file() and (tmp_path / "kv" / "a.kv").is_file()
    # the cache changes answers, so it changes the domain's version (the server's cache keys)
    assert bank.load("plain", idx_b).version != bank.domains["plain-kv"].version
    # the prefix layout (head and first passage stored, the rest prefilled) answers as the full prefill does
    exact = bank.load("b-prefix", idx_b, adapters["b"], kv_cache=tmp_path / "b.kv", kv_layout="prefix")
    assert exact.generator.kv_cache.layout == "prefix" and exact.version != bank.domains["b"].version
    for bad, message in ((dict(kv_layout="prefix"), "kv_layout needs kv_cache"),
                         (dict(kv_cache=tmp_path / "b.kv", kv_layout="exact"), "unknown frozen KV cache layout")):
        with pytest.raises(DomainError, match=message):  # refused before the loaded domain is touched
            bank.load("b-prefix", idx_b, adapters["b"], **bad)
        assert bank.domains["b-prefix"] is exact
    assert [a.text for a in bank.answer_many(QUESTIONS, ["b-prefix"] * len(QUESTIONS))] == \
        [a.text for a in bank.answer_many(QUESTIONS, ["b"] * len(QUESTIONS))]
    domains = ["a-kv", "b", "plain-kv", None, "a-kv", "plain-kv"]
    questions = (QUESTIONS * 2)[: len(domains)]
    batched = bank.answer_many(questions, domains)  # one mixed pass: two caches, a full-prefill row, a base row
    singles = [bank.answer_many([q], [d])[0] for q, d in zip(questions, domains)]
    assert [a.text for a in batched] == [a.text for a in singles]

    # each cached domain answers what a Generator with its weights and its cache file answers
    lora = RetroPeftModel.load(adapters["a"])
    cache_a = FrozenKVCache.load(tmp_path / "kv" / "a.kv", lora.model)
    want_a = lora.generator(open_index(idx_a), kv_cache=cache_a, max_new_tokens=6).answer_many(questions[0::4])
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    cache_plain = FrozenKVCache.load(tmp_path / "plain.kv", plain)
    want_plain = Generator(plain, lora.tokenizer, index=open_index(idx_b), retrieval=RetrievalConfig(),
                           kv_cache=cache_plain, max_new_tokens=6).answer_many([questions[2], questions[5]])
    assert [batched[0].text, batched[4].text] == [a.text for a in want_a]
    assert [batched[2].text, batched[5].text] == [a.text for a in want_plain]
    assert batched[0].passages == want_a[0].passages and batched[0].prompt_tokens == want_a[0].prompt_tokens

    # a cache file of other weights is refused, not rebuilt over: that domain fails alone
    with pytest.raises(DomainError, match="domain 'c-kv'.*other model weights"):
        bank.load("c-kv", idx_a, adapters["c"], kv_cache=tmp_path / "kv" / "a.kv")
    assert "c-kv" not in bank.domains and bank.answer(questions[0], "a-kv").text == batched[0].text
    # so is a cache file that cannot be written (its folder is a file): an OSError, not a library error
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(DomainError, match="domain 'd-kv'"):
        bank.load("d-kv", idx_a, adapters["c"], kv_cache=tmp_path / "a-file" / "kv.safetensors")
    assert "d-kv" not in bank.domains and "d-kv" not in bank.model.peft_config
    assert bank.answer(questions[0], "a-kv").text == batched[0].text


# -- answer choices and the answerability head --------------------------------------------------


def adapter_with_head(model_dir, out_dir, index, threshold: float | None = None):
    """A copy of the adapter in `model_dir` with an answerability head fitted on random features (saved).
    threshold: put in place of the fitted one (1e9: every prompt scores below it, so the head abstains)."""
    import dataclasses

    import torch

    from retro_peft.generation.answerability import fit_head
    from retro_peft.generation.prompt import encode

    model = RetroPeftModel.load(model_dir)
    torch.manual_seed(0)
    features = torch.randn(16, model.model.config.hidden_size + 1)
    head = fit_head(features, [i % 4 != 0 for i in range(16)], answer_rate=0.9,
                    abstain_token=encode(model.tokenizer, model.retrieval.abstention)[0])
    model.answerability = head if threshold is None else dataclasses.replace(head, threshold=threshold)
    return model.save(out_dir, index=index)


def test_domain_choices_and_answerability_heads_per_row_of_a_mixed_batch(setup, tmp_path):
    from retro_peft.index import open_index

    root, base, idx_a, idx_b, adapters = setup
    head_dir = adapter_with_head(adapters["a"], tmp_path / "with-head", open_index(idx_a), threshold=1e9)
    bank = _bank(setup)
    abstention = bank.domains["a"].generator.retrieval.abstention
    bank.load("yn", idx_b, adapters["b"], choices=["yes", "no", "maybe"])
    bank.load("strict", idx_a, head_dir)  # the threshold as saved: everything scores below it
    bank.load("off", idx_a, head_dir, abstain_at=0.0)  # "off": never abstains by the score
    assert len({bank.version(n) for n in ("a", "strict", "off")}) == 3  # the head and its rate change answers

    strict, off = bank.answer(QUESTIONS[0], "strict"), bank.answer(QUESTIONS[0], "off")
    assert strict.abstained and strict.text == abstention and strict.answerability < 1e9
    assert strict.completion_tokens == 0 and strict.citations == []
    assert not off.abstained and off.completion_tokens > 0 and off.answerability == strict.answerability
    assert bank.answer(QUESTIONS[0], "a").answerability is None  # no head: no score

    assert bank.answer(QUESTIONS[1], "yn").text in ("yes", "no", "maybe")
    assert bank.answer(QUESTIONS[1], "yn", choices=["red", "blue"]).text in ("red", "blue")  # the request's first
    assert bank.answer(QUESTIONS[1], "strict", choices=["red", "blue"]).abstained  # the head decides first

    # one batch: free and choice rows, LoRA adapters of several domains, the base model, heads or none
    domains = ["yn", "strict", "a", "off", None, "c", "yn", "a", "plain"]
    choices = [None, None, ["red", "blue"], None, ["up", "down"], ["x", "y", "z"], ["on", "off"], None, None]
    questions = (QUESTIONS * 3)[: len(domains)]
    batched = bank.answer_many(questions, domains, choices=choices)
    singles = [bank.answer_many([q], [d], choices=[c])[0] for q, d, c in zip(questions, domains, choices)]
    assert [(a.text, a.abstained) for a in batched] == [(a.text, a.abstained) for a in singles]
    assert [a.answerability for a in batched] == [pytest.approx(a.answerability, abs=1e-4) for a in singles]
    assert batched[0].text in ("yes", "no", "maybe") and batched[6].text in ("on", "off")
    assert batched[2].text in ("red", "blue") and batched[4].text in ("up", "down") and batched[5].text in "xyz"
    assert batched[1].abstained and not batched[3].abstained
    assert [a.answerability is None for a in batched] == [d not in ("strict", "off") for d in domains]

    for bad, message in ((dict(choices=["yes"]), "at least two different non-empty"),
                         (dict(choices=["yes", " "]), "at least two different non-empty"),
                         (dict(abstain_at=1.5), "abstain_at must be an answer rate")):
        with pytest.raises(DomainError, match=message):
            bank.load("bad", idx_a, head_dir, **bad)
    with pytest.raises(InputError, match="choices must be at least two"):
        bank.answer(QUESTIONS[0], "a", choices=["only"])
