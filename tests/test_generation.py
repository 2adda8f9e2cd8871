"""Prompt builder and generator: budget, templates, batched == single greedy decoding, stops, citations."""

import dataclasses
import pytest
from helpers_adapters import single_thread, smollm2_tokenizer, tiny_index, tiny_llama_folder

from retro_peft.adapters import RetrievalConfig
from retro_peft.errors import InputError
from retro_peft.generation import (Generator, Passage, SamplingConfig, StaticDecode, build_prompt, decode,
                                   is_abstention, normalize_answer)
from retro_peft.generation.answers import cite, mentions
from retro_peft.generation.decode import left_pad, stop_token_ids
from retro_peft.generation.prompt import encode

single_thread()

LONG = " ".join(f"word{i}" for i in range(400))
PASSAGES = [Passage("a#1", "a", "The Rhine flows into the North Sea.", "Rhine", 2.0),
            Passage("b#1", "b", LONG, "Long", 1.0),
            Passage("c#1", "c", "Tea comes from Camellia sinensis.", "Tea", 0.5)]


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer):
    from transformers import AutoModelForCausalLM

    # A wide initialisation makes the random model's greedy choices vary from token to token.
    folder = tiny_llama_folder(tmp_path_factory.mktemp("gen") / "llama", tokenizer, seed=3, initializer_range=0.5)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_prompt_numbers_passages_with_titles_in_the_chat_template(tokenizer):
    prompt = build_prompt(tokenizer, "Where does the Rhine flow?", [PASSAGES[0], PASSAGES[2]], RetrievalConfig())
    assert prompt.text.startswith("<|im_start|>")
    assert prompt.text.endswith("<|im_start|>assistant\n")
    assert "[1] (Rhine) The Rhine flows into the North Sea.\n[2] (Tea) Tea comes from" in prompt.text
    assert "Question: Where does the Rhine flow?" in prompt.text and '"I don\'t know."' in prompt.text
    assert prompt.input_ids == encode(tokenizer, prompt.text)


def test_plain_template_when_asked_or_when_the_tokenizer_has_none(tokenizer):
    plain = build_prompt(tokenizer, "Q?", PASSAGES[:1], RetrievalConfig(template="plain"))
    assert "<|im_start|>" not in plain.text and plain.text.endswith("Answer: ")
    saved = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        assert build_prompt(tokenizer, "Q?", PASSAGES[:1], RetrievalConfig()).text == plain.text
    finally:
        tokenizer.chat_template = saved


@pytest.mark.parametrize("budget", [170, 260, 400])
def test_budget_truncates_then_drops_passages_never_the_question(tokenizer, budget):
    question = "Where does the Rhine flow into the sea, and what does tea come from?"
    prompt = build_prompt(tokenizer, question, PASSAGES, RetrievalConfig(context_tokens=budget))
    assert len(prompt.input_ids) <= budget
    assert f"Question: {question}" in prompt.text
    assert prompt.passages[0] == PASSAGES[0]  # priority order: the first passage is kept whole
    assert len(prompt.passages) == 2  # the long one is truncated to fit, the one after it dropped
    assert prompt.passages[1].text.endswith(" ...") and len(prompt.passages[1].text) < len(LONG)


def test_a_question_longer_than_the_budget_is_kept_whole_without_passages(tokenizer):
    question = "Why " + " ".join(["really"] * 200) + "?"
    prompt = build_prompt(tokenizer, question, PASSAGES, RetrievalConfig(context_tokens=64))
    assert prompt.passages == [] and question in prompt.text


def test_empty_question_is_an_input_error(tokenizer):
    with pytest.raises(InputError):
        build_prompt(tokenizer, "  ", PASSAGES, RetrievalConfig())


def test_a_prompt_past_the_models_context_is_an_input_error(tiny_model, tokenizer):
    context = tiny_model.config.max_position_embeddings
    generator = Generator(tiny_model, tokenizer, max_new_tokens=8)
    question = "Where does the Rhine flow? " + "Tell me more. " * (context // 8)
    n = len(generator.prompts([question])[0].input_ids)
    assert n <= context  # the prompt alone fits; with the tokens to generate it does not
    with pytest.raises(InputError, match=f"exceeds the model's context of {context} tokens"):
        generator.answer(question, sampling=SamplingConfig(max_new_tokens=context - n + 1))
    assert generator.answer(question, sampling=SamplingConfig(max_new_tokens=context - n)).completion_tokens > 0


def test_batched_greedy_decoding_equals_one_request_at_a_time(tiny_model, tokenizer):
    retrieval = RetrievalConfig(context_tokens=160)
    questions = ["Where does the Rhine flow?", "Who made tea? Please answer in detail with all names.",
                 "Why?", "What is the longest river in Europe and where does it begin and end?"]
    passages = [[PASSAGES[0]], [PASSAGES[2], PASSAGES[0]], [], [PASSAGES[1]]]
    prompts = [build_prompt(tokenizer, q, p, retrieval).input_ids for q, p in zip(questions, passages)]
    assert len({len(p) for p in prompts}) == 4  # different lengths: the batch really is left-padded
    pad = tokenizer.pad_token_id
    ids, mask = left_pad(prompts, pad, "cpu")
    batched = decode(tiny_model, ids, mask, max_new_tokens=12, stop_ids=set(), pad_id=pad)
    single = [decode(tiny_model, *left_pad([p], pad, "cpu"), max_new_tokens=12, stop_ids=set(), pad_id=pad)[0]
              for p in prompts]
    assert batched == single
    assert all(len(row) == 12 for row in single) and len({tuple(r) for r in single}) > 1
    assert any(len(set(row)) > 1 for row in single)  # not a degenerate repeat-one-token model

    # The Generator (retrieve -> prompt -> decode) agrees between its batched and single paths too.
    gen = Generator(tiny_model, tokenizer, retrieval=retrieval, max_new_tokens=12, batch_size=4)
    many = gen.answer_many(questions, passages=passages)
    one = [gen.answer(q, passages=p) for q, p in zip(questions, passages)]
    assert [(a.text, a.completion_tokens, a.prompt_tokens) for a in many] == \
           [(a.text, a.completion_tokens, a.prompt_tokens) for a in one]


def test_sampled_rows_depend_only_on_their_own_seed_not_their_batch(tiny_model, tokenizer):
    # The serving batcher batches requests with equal SamplingConfig: each must get the text it gets alone.
    gen = Generator(tiny_model, tokenizer, retrieval=RetrievalConfig(context_tokens=160), batch_size=4)
    question, seeded = "Where does the Rhine flow?", lambda s: SamplingConfig(max_new_tokens=12, temperature=0.8, seed=s)
    alone = gen.answer(question, passages=PASSAGES[:1], sampling=seeded(1)).text
    together = [a.text for a in gen.answer_many([question, question], passages=[PASSAGES[:1]] * 2, sampling=seeded(1))]
    assert together == [alone, alone]
    others = {gen.answer(question, passages=PASSAGES[:1], sampling=seeded(s)).text for s in (2, 3, 4)}
    assert others - {alone}  # the seed still matters


def test_logprobs_are_the_models_log_probabilities_of_the_generated_tokens(tiny_model, tokenizer):
    import torch

    from retro_peft.generation.decode import generate_batch

    prompts = [encode(tokenizer, "Where does the Rhine flow?"), encode(tokenizer, "Tea?")]
    sampling = SamplingConfig(max_new_tokens=6, logprobs=3)
    done = generate_batch(tiny_model, tokenizer, prompts, stop_ids=set(), pad_id=0, sampling=sampling)
    for prompt, row in zip(prompts, done):
        assert len(row.logprobs) == len(row.tokens) == 6
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(input_ids=torch.tensor([prompt + row.tokens])).logits[0].float(), -1)
        for i, (token, (chosen, top)) in enumerate(zip(row.tokens, row.logprobs)):
            step = logp[len(prompt) - 1 + i]
            assert chosen == pytest.approx(float(step[token]), abs=1e-4)
            assert [t for t, _ in top] == step.topk(3).indices.tolist() and top[0][0] == token  # greedy: the top one
            assert [lp for _, lp in top] == pytest.approx(step.topk(3).values.tolist(), abs=1e-4)
    plain = generate_batch(tiny_model, tokenizer, prompts, stop_ids=set(), pad_id=0,
                           sampling=SamplingConfig(max_new_tokens=6))
    assert [r.tokens for r in plain] == [r.tokens for r in done] and plain[0].logprobs is None
    with pytest.raises(InputError, match="logprobs"):
        SamplingConfig(logprobs=21)


def test_static_decoding_gives_the_same_tokens_and_compiling_it_needs_cuda(tiny_model, tokenizer):
    # The fixed-shape path that CUDA graphs replay (StaticCache, full-length mask, the prompt padded to a
    # prefill bucket, finished rows read back once per sync_every steps), run eagerly here.
    retrieval = RetrievalConfig(context_tokens=160)
    prompts = [build_prompt(tokenizer, q, p, retrieval).input_ids
               for q, p in [("Where does the Rhine flow?", PASSAGES[:1]), ("Why?", []), ("Who made tea?", PASSAGES[2:])]]
    pad = tokenizer.pad_token_id
    ids, mask = left_pad(prompts, pad, "cpu")
    ordinary = decode(tiny_model, ids, mask, max_new_tokens=10, stop_ids=set(), pad_id=pad)
    fixed, shapes = StaticDecode(tiny_model, compile=False), []
    forward = fixed.forward
    fixed.forward = lambda kind, **kw: shapes.append((kind, kw["input_ids"].shape, kw["attention_mask"].shape,
                                                      type(kw.get("cache", kw.get("past_key_values"))).__name__)) \
        or forward(kind, **kw)
    static = decode(tiny_model, ids, mask, max_new_tokens=10, stop_ids=set(), pad_id=pad, static=fixed)
    assert static == ordinary and len({tuple(r) for r in ordinary}) > 1
    bucket = fixed.prefill_bucket(ids.shape[1])
    width = fixed.cache_length(bucket + 10)  # lengths in steps of 64
    assert bucket in StaticDecode.PREFILL_BUCKETS and bucket > ids.shape[1]
    assert shapes == [("prefill", (3, bucket), (3, width), "StaticCache")] + \
        [("step", (3, 1), (3, width), "StaticCache")] * 9
    assert len(fixed._caches) == 1  # the next call of this shape reuses the cache
    assert decode(tiny_model, ids, mask, max_new_tokens=10, stop_ids=set(), pad_id=pad, static=fixed) == ordinary
    stop = ordinary[0][3]  # rows that stop early keep the fixed shapes; any sync interval gives the same tokens
    for sync_every in (1, 3, 8):
        assert decode(tiny_model, ids, mask, max_new_tokens=10, stop_ids={stop}, pad_id=pad,
                      static=StaticDecode(tiny_model, compile=False, sync_every=sync_every)) == \
            decode(tiny_model, ids, mask, max_new_tokens=10, stop_ids={stop}, pad_id=pad)
    with pytest.raises(InputError, match="CUDA"):
        Generator(tiny_model, tokenizer, compile_decode=True)
    with pytest.raises(InputError, match="sync_every"):
        StaticDecode(tiny_model, compile=False, sync_every=0)


def test_grouped_decode_attention_gives_sdpas_logits_for_short_queries(tmp_path, tokenizer):
    # StaticDecode's compiled steps and prefill graphs attend through hf_compat.short_query_attention: a short
    # query's heads grouped by key/value head, the values summed in chunks of DECODE_KEY_CHUNK keys (128 keys here: two
    # chunks), over a left-padded batch, eagerly and compiled; a one-token step and a short prefill (its padding
    # queries see no key: finite, never NaN); longer queries still go to SDPA; the implementation is restored.
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from retro_peft.hf_compat import DECODE_KEY_CHUNK, GROUPED_QUERY_TOKENS, short_query_attention

    folder = tiny_llama_folder(tmp_path / "gqa", tokenizer, seed=1)  # 4 query heads over 2 key/value heads
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    ids, mask = left_pad([list(range(5, 5 + 2 * DECODE_KEY_CHUNK - 1)), [11, 12, 13]], 0, "cpu")
    long_ids = torch.arange(5, 5 + GROUPED_QUERY_TOKENS + 1)[None]
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        step = dict(input_ids=torch.tensor([[3], [4]]), attention_mask=torch.cat([mask, torch.ones(2, 1).long()], 1))
        expected = model(**step, past_key_values=copy.deepcopy(cache)).logits
        expected_prefill = model(input_ids=ids, attention_mask=mask).logits
        sdpa, seen = torch.nn.functional.scaled_dot_product_attention, []
        spy = lambda q, k, v, **kw: seen.append(q.shape[2]) or sdpa(q, k, v, **kw)  # noqa: E731
        torch.nn.functional.scaled_dot_product_attention = spy
        try:
            with short_query_attention(model):
                assert model.config._attn_implementation != "sdpa"
                eager = model(**step, past_key_values=copy.deepcopy(cache)).logits
                prefill = model(input_ids=ids, attention_mask=mask).logits
                assert seen == []
                model(input_ids=long_ids)
                assert seen == [long_ids.shape[1]] * 2  # a long prefill: SDPA, in both layers
                torch._dynamo.reset()
                compiled = torch.compile(lambda c: model(**step, past_key_values=c).logits)(copy.deepcopy(cache))
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa
            torch._dynamo.reset()
    assert model.config._attn_implementation == "sdpa"
    assert torch.allclose(eager, expected, atol=1e-5) and torch.allclose(compiled, expected, atol=1e-5)
    real = mask.bool()
    assert torch.isfinite(prefill).all() and torch.allclose(prefill[real], expected_prefill[real], atol=1e-5)


def test_flex_decode_attention_gives_the_same_tokens_with_its_mask_built_outside_the_graph(tmp_path, tokenizer):
    # StaticDecode(decode_attention="flex"): short queries through flex_attention, whose compiled lowering takes
    # only a mask that is a graph input, so StaticDecode builds the 4D mask (padding and causality over the
    # static cache's slots) itself. Its static path gives the ordinary path's tokens (left-padded batch, a
    # frozen-cache-like context, eagerly); compiled (inductor on the CPU), a forward's logits equal SDPA's,
    # for a left-padded short prefill and a one-token step over a cache.
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from retro_peft.hf_compat import short_query_attention

    folder = tiny_llama_folder(tmp_path / "gqa", tokenizer, seed=1, initializer_range=0.5)  # 4 query heads, 2 kv heads
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    ids, mask = left_pad([list(range(5, 40)), [11, 12, 13]], 0, "cpu")
    plain = decode(model, ids, mask, max_new_tokens=8, stop_ids=set(), pad_id=0)
    flex = StaticDecode(model, compile=False, decode_attention="flex")
    assert decode(model, ids, mask, max_new_tokens=8, stop_ids=set(), pad_id=0, static=flex) == plain
    assert len({tuple(row) for row in plain}) > 1
    built = flex.attention_mask(mask, 0, ids.shape[1])
    assert built.shape == (2, 1, ids.shape[1], ids.shape[1]) and built.dtype == torch.bool
    assert not built[1, 0, -1, :-3].any() and built[1, 0, -1, -3:].all() and not built[0, 0, 0, 1:].any()
    assert StaticDecode(model, compile=False).attention_mask(mask, 0, 3) is mask
    with pytest.raises(InputError, match="decode_attention"):
        StaticDecode(model, compile=False, decode_attention="paged")
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        expected_prefill = model(input_ids=ids, attention_mask=mask).logits
        step_mask = torch.cat([mask, torch.ones(2, 1).long()], 1)
        step = dict(input_ids=torch.tensor([[3], [4]]))
        expected = model(**step, attention_mask=step_mask, past_key_values=copy.deepcopy(cache)).logits
        prefill_mask, step_mask4 = built, flex.attention_mask(step_mask, ids.shape[1], 1)  # as StaticDecode passes
        torch._dynamo.reset()
        try:
            with short_query_attention(model, "flex"):
                forward = torch.compile(lambda i, m, c=None: model(input_ids=i, attention_mask=m,
                                                                  past_key_values=c).logits, dynamic=False)
                prefill = forward(ids, prefill_mask)
                compiled = forward(step["input_ids"], step_mask4, copy.deepcopy(cache))
        finally:
            torch._dynamo.reset()
    real = mask.bool()
    # (logits up to 12 here: float32's rounding differs by kernel, 3e-5 seen)
    assert torch.isfinite(prefill).all() and torch.allclose(prefill[real], expected_prefill[real], atol=1e-4)
    assert torch.allclose(compiled, expected, atol=1e-4)


def test_fused_sibling_projections_give_the_same_logits_in_the_same_memory(tmp_path, tokenizer):
    # StaticDecode's fused_projections: each layer's q/k/v and gate/up weights concatenated once, the layers' own
    # weights views of its rows (the parameters' storage is unchanged), computed as one matmul per group inside
    # hf_compat.fused_siblings, under a LoRA adapter on every projection too. A weight replaced by another tensor
    # (not an in-place change) is fused again before the next call, never read stale.
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from retro_peft.hf_compat import fused_siblings, sibling_groups

    folder = tiny_llama_folder(tmp_path / "fused", tokenizer, seed=2, initializer_range=0.5)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    config = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"], init_lora_weights=False)
    model = get_peft_model(model, config).eval()
    ids, mask = left_pad([list(range(5, 40)), [11, 12, 13]], 0, "cpu")
    storage = lambda: sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()  # noqa: E731
                           for p in model.parameters()}.values())
    products, linear = [], torch.nn.functional.linear
    spy = lambda x, w, b=None: products.append(tuple(w.shape)) or linear(x, w, b)  # noqa: E731
    with torch.no_grad():
        expected, before = model(input_ids=ids, attention_mask=mask).logits, storage()
        groups = sibling_groups(model)
        assert len(groups) == 4 and sibling_groups(model) is groups  # 2 layers x (q/k/v, gate/up), fused once
        assert storage() == before
        torch.nn.functional.linear = spy
        try:
            with fused_siblings(groups):
                fused = model(input_ids=ids, attention_mask=mask).logits
            q = groups[0].linears[0]
            q.weight = torch.nn.Parameter(q.weight * 2, requires_grad=False)  # replaced, not changed in place
            products.clear()
            with fused_siblings(groups):
                changed = model(input_ids=ids, attention_mask=mask).logits
        finally:
            torch.nn.functional.linear = linear
        unfused = model(input_ids=ids, attention_mask=mask).logits
    plain = decode(model, ids, mask, max_new_tokens=6, stop_ids=set(), pad_id=0)
    assert decode(model, ids, mask, max_new_tokens=6, stop_ids=set(), pad_id=0,
                  static=StaticDecode(model, compile=False, fused_projections=True)) == plain
    # per layer: q/k/v as one (32 + 2 x 16 rows), o, gate/up as one (2 x 64), down; no lone q, k, v, gate or up
    assert products.count((64, 32)) == 2 and products.count((128, 32)) == 2
    assert products.count((32, 32)) == 2 and (16, 32) not in products
    assert torch.allclose(fused, expected, atol=1e-5)
    assert torch.allclose(changed, unfused, atol=1e-5) and not torch.allclose(changed, expected, atol=1e-3)
    assert all(linear.__dict__.get("forward") is None for group in groups for linear in group.linears)


def test_static_decoding_pads_a_batch_to_its_bucket_and_drops_the_padding_rows(tiny_model, tokenizer):
    # Three rows decode as a batch of 8 (StaticDecode.BATCH_BUCKETS: a server's batch sizes share a few graphs);
    # the copies added start finished, and each real row's answer, sampled draws and stop string are its own.
    from retro_peft.generation.decode import generate_batch

    prompts = [build_prompt(tokenizer, q, [], RetrievalConfig()).input_ids for q in ("Why?", "Where?", "Who made tea?")]
    fixed, shapes = StaticDecode(tiny_model, compile=False), []
    forward = fixed.forward
    fixed.forward = lambda kind, **kw: shapes.append(kw["input_ids"].shape[0]) or forward(kind, **kw)
    for sampling in (SamplingConfig(max_new_tokens=8), SamplingConfig(max_new_tokens=8, temperature=0.9, seed=3)):
        free = generate_batch(tiny_model, tokenizer, prompts[1:2], stop_ids=set(), pad_id=0, sampling=sampling)[0]
        assert len(free.text) > 4
        sampling = dataclasses.replace(sampling, stop=(free.text[2:4],))
        alone = [generate_batch(tiny_model, tokenizer, [p], stop_ids=set(), pad_id=0, sampling=sampling)[0]
                 for p in prompts]
        shapes.clear()
        padded = generate_batch(tiny_model, tokenizer, prompts, stop_ids=set(), pad_id=0, sampling=sampling,
                                static=fixed)
        assert [(r.tokens, r.text, r.finish_reason) for r in padded] == \
            [(r.tokens, r.text, r.finish_reason) for r in alone]
        assert len(padded) == 3 and set(shapes) == {8} and alone[1].finish_reason == "stop"
    assert [fixed.batch_bucket(n) for n in (1, 2, 8, 9, 32, 33, 70)] == [1, 8, 8, 32, 32, 64, 96]


@pytest.mark.parametrize("fails_at", [0, 4])
def test_a_graph_that_fails_falls_back_to_eager_decoding_with_one_warning(tiny_model, tokenizer, caplog, fails_at):
    # A compile or capture failure (an unsupported model, out of memory while recording), at the prefill or in
    # the middle of decoding: the answer goes on eagerly from the tokens so far and is the eager one.
    prompts = [build_prompt(tokenizer, q, [], RetrievalConfig()).input_ids for q in ("Why?", "Where is the tea?")]
    pad = tokenizer.pad_token_id
    ids, mask = left_pad(prompts, pad, "cpu")
    ordinary = decode(tiny_model, ids, mask, max_new_tokens=10, stop_ids=set(), pad_id=pad)
    fixed, calls = StaticDecode(tiny_model, compile=False), []

    def capture(**inputs):
        calls.append(inputs["input_ids"].shape)
        if len(calls) > fails_at:
            raise RuntimeError("CUDA error: out of memory while capturing")
        return fixed.eager(**inputs)

    # what a real failure looks like from the decode loop: the compiled call raises
    fixed.compiled = {"prefill": capture, "step": capture}
    with caplog.at_level("WARNING", logger="retro_peft.generation.decode"):
        assert decode(tiny_model, ids, mask, max_new_tokens=10, stop_ids=set(), pad_id=pad, static=fixed) == ordinary
        assert decode(tiny_model, ids, mask, max_new_tokens=10, stop_ids=set(), pad_id=pad, static=fixed) == ordinary
    assert len(calls) == fails_at + 1 and fixed.compiled is None  # eager from then on
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "decoding eagerly" in caplog.records[0].message


def test_decoding_stops_at_a_stop_token(tiny_model, tokenizer):
    prompt = build_prompt(tokenizer, "Where does the Rhine flow?", PASSAGES[:1], RetrievalConfig()).input_ids
    pad = tokenizer.pad_token_id
    free = decode(tiny_model, *left_pad([prompt], pad, "cpu"), max_new_tokens=6, stop_ids=set(), pad_id=pad)[0]
    stopped = decode(tiny_model, *left_pad([prompt], pad, "cpu"), max_new_tokens=6, stop_ids={free[2]}, pad_id=pad)[0]
    assert stopped == free[:free.index(free[2])]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tokenizer, tiny_model)


def test_generator_retrieves_from_a_real_index_and_cites(tiny_model, tokenizer, tmp_path):
    index = tiny_index(tmp_path / "idx")
    gen = Generator(tiny_model, tokenizer, index=index, retrieval=RetrievalConfig(k=2), max_new_tokens=4)
    answer = gen.answer("Into which sea does the Rhine flow?")
    assert [p.doc_id for p in answer.passages][0] == "rhine"
    assert answer.prompt_tokens > 0 and 0 < answer.completion_tokens <= 4
    assert not answer.abstained and answer.citations  # every prompt passage, when none holds the answer text
    assert {c[1] for c in answer.citations} <= {p.doc_id for p in answer.passages}


def test_abstention_and_answer_normalisation():
    assert is_abstention("I don't know.", "I don't know.")
    assert is_abstention("i dont know, sorry", "I don't know.")
    assert not is_abstention("Normandy", "I don't know.")
    assert normalize_answer("The  North Sea!") == "north sea"


def test_citations_match_the_answer_as_whole_words_only():
    numbers = Passage("n#1", "n", "Sampling at 0.8 on 448 tokens.", "Numbers", 2.0)
    oxygen = Passage("o#1", "o", "Oxygen has atomic number 8.", "Oxygen", 1.0)
    assert cite("8", [numbers, oxygen]) == [("o#1", "o", "Oxygen", 1.0)]  # not "0.8" or "448"
    assert cite("North Sea", PASSAGES) == [("a#1", "a", "Rhine", 2.0)]  # several words, inside a sentence
    assert cite("Sea.", PASSAGES) == [("a#1", "a", "Rhine", 2.0)]  # at the passage's end, punctuation aside
    assert len(cite("8", [numbers])) == 1  # no passage holds it: every passage the prompt held
    # Other punctuation separates words: the demo guide's "32-token overlap" holds the answer "32".
    assert mentions("Chunks overlap by a 32-token window.", "32") and mentions("retro-peft's index", "Retro-PEFT")
    assert mentions("It stores the hash of the chunk text.", "hash of chunk text")  # articles aside
    assert not mentions("In 1945 and 1776.", "1") and not mentions("top-p 0.8", "8") and not mentions("x", "")


def test_the_growing_cache_decodes_as_transformers_cache_and_never_writes_into_the_states_it_adopts(tiny_model):
    """dynamic_cache's layers write each step into spare room (reallocating as it runs out) instead of
    concatenating: every step's logits equal transformers' own DynamicCache's, the states it started from are left
    as they were, and a cache whose states were replaced from outside (a batch selection) goes on correctly."""
    import torch
    from transformers import DynamicCache

    from retro_peft.hf_compat import TRANSFORMERS_MAJOR, cache_kwarg, dynamic_cache, layer_states

    torch.manual_seed(0)
    prompt = torch.randint(0, tiny_model.config.vocab_size, (2, 9))
    with torch.inference_mode():
        prefilled = DynamicCache()
        kw = cache_kwarg(tiny_model)
        tiny_model(input_ids=prompt, use_cache=True, **{kw: prefilled})
        layers = range(tiny_model.config.num_hidden_layers)
        states = [tuple(t.clone() for t in layer_states(prefilled, i)) for i in layers]
        originals = [tuple(t.clone() for t in pair) for pair in states]
        growing = dynamic_cache([k for k, _ in states], [v for _, v in states])
        plain = DynamicCache()
        for i, (k, v) in enumerate(states):
            plain.update(k.clone(), v.clone(), i)
        if TRANSFORMERS_MAJOR >= 5:
            assert type(growing.layers[0]).__name__ == "GrowingLayer"
        token = prompt[:, -1:]
        for step in range(150):  # past the first room (64 tokens) and a reallocation after it
            if step == 100:  # transformers' batch selection sets the layers' states itself
                growing.batch_select_indices(torch.tensor([1]))
                plain.batch_select_indices(torch.tensor([1]))
                token = token[1:]
            ours = tiny_model(input_ids=token, use_cache=True, **{kw: growing}).logits[:, -1]
            theirs = tiny_model(input_ids=token, use_cache=True, **{kw: plain}).logits[:, -1]
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
            token = theirs.argmax(-1, keepdim=True)
        assert growing.get_seq_length() == plain.get_seq_length() == 9 + 150
    for (k, v), (k0, v0) in zip(states, originals):
        assert torch.equal(k, k0) and torch.equal(v, v0)
