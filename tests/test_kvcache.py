"""Frozen KV cache: stored passage states put together at query time, against the full prefill."""

import pytest
import torch
from helpers_adapters import DOCS, single_thread, smollm2_tokenizer, tiny_index, tiny_llama_folder

from retro_peft.adapters import RetrievalConfig
from retro_peft.errors import InputError
from retro_peft.generation import Generator, Passage
from retro_peft.generation import StaticDecode
from retro_peft.hf_compat import as_cache, cache_kwarg
from retro_peft.kvcache import FrozenKVCache
from retro_peft.kvcache.layout import HEAD
from retro_peft.kvcache.rotation import rotate

single_thread()

QUESTIONS = ["Where does the Rhine flow?", "What is tea made from?", "Who were the Normans?", "What do cats do?"]


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def tiny(tmp_path_factory, tokenizer, seed):
    from transformers import AutoModelForCausalLM

    folder = tiny_llama_folder(tmp_path_factory.mktemp("kv") / "llama", tokenizer, seed=seed, initializer_range=0.5)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer):
    return tiny(tmp_path_factory, tokenizer, seed=3)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return tiny_index(tmp_path_factory.mktemp("kv-index") / "idx")


def first_logits(model, tokenizer, generator, question, passages=None):
    """Logits of the first answer token: through the frozen cache if the generator has one, else full prefill."""
    from transformers import DynamicCache

    retrieved = generator.retrieve([question]) if passages is None else [passages]
    with torch.inference_mode():
        if generator.kv_cache is None:
            ids = generator.prompts([question], retrieved)[0].input_ids
            return model(input_ids=torch.tensor([ids])).logits[0, -1], ids
        row = generator.kv_cache.prompts(tokenizer, [question], retrieved, generator.retrieval)[0]
        past, mask = generator.kv_cache.assemble([row.keys], "cpu")
        assert isinstance(past, DynamicCache)
        tail = torch.tensor([row.tail_ids])
        mask = torch.cat([mask, torch.ones_like(tail)], dim=1)
        positions = torch.arange(mask.shape[1] - tail.shape[1], mask.shape[1])[None]
        out = model(input_ids=tail, attention_mask=mask, position_ids=positions, **{cache_kwarg(model): past})
        return out.logits[0, -1], row.prompt.input_ids


def test_with_one_passage_the_frozen_cache_is_the_full_prefill(model, tokenizer, index):
    retrieval = RetrievalConfig(k=1)
    cache = FrozenKVCache.build(model, tokenizer, index, retrieval)
    full = Generator(model, tokenizer, index=index, retrieval=retrieval, max_new_tokens=8)
    frozen = Generator(model, tokenizer, index=index, retrieval=retrieval, max_new_tokens=8, kv_cache=cache)
    for question in QUESTIONS:
        want, want_ids = first_logits(model, tokenizer, full, question)
        got, got_ids = first_logits(model, tokenizer, frozen, question)
        assert got_ids == want_ids  # the segments tokenize exactly like the whole prompt
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert [a.text for a in frozen.answer_many(QUESTIONS)] == [a.text for a in full.answer_many(QUESTIONS)]


def test_the_prefix_layout_is_the_full_prefill_with_several_passages(model, tokenizer, index):
    """Stored head, "[1]" and first passage, the rest prefilled over them: a full prefill's computation, so
    the same prompt ids, logits and answers with 3 passages (where the block layout's answers differ), also
    when the budget shortens or drops passages (a shortened first passage is prefilled in full)."""
    for budget, stored_rows in ((1000, len(QUESTIONS)), (150, None)):
        retrieval = RetrievalConfig(k=3, context_tokens=budget)
        cache = FrozenKVCache.build(model, tokenizer, index, retrieval)
        full = Generator(model, tokenizer, index=index, retrieval=retrieval, max_new_tokens=8, batch_size=8)
        block = Generator(model, tokenizer, index=index, retrieval=retrieval, max_new_tokens=8, kv_cache=cache)
        prefix_cache = FrozenKVCache(cache.keys, cache.values, cache.spans, cache.token_ids, cache.meta,
                                     cache.digests, layout="prefix")
        prefix = Generator(model, tokenizer, index=index, retrieval=retrieval, max_new_tokens=8, batch_size=8,
                           kv_cache=prefix_cache)
        rows = prefix_cache.prompts(tokenizer, QUESTIONS, prefix.retrieve(QUESTIONS), retrieval)
        for question, row in zip(QUESTIONS, rows):
            want, want_ids = first_logits(model, tokenizer, full, question)
            got, got_ids = first_logits(model, tokenizer, prefix, question)
            assert got_ids == want_ids == row.prompt.input_ids and row.keys in ([], [HEAD, "<marker 1>", *row.keys[2:3]])
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            if budget == 1000:
                assert len(row.keys) == 3 and len(row.prompt.passages) == 3
                blocked, _ = first_logits(model, tokenizer, block, question)
                assert not torch.allclose(blocked, want, atol=1e-3)  # several passages: block attention differs
        if stored_rows is None:  # the tight budget shortened passages: some rows still start from the store
            assert any(r.keys for r in rows) and any(len(r.prompt.passages) < 3 for r in rows)
        assert [a.text for a in prefix.answer_many(QUESTIONS)] == [a.text for a in full.answer_many(QUESTIONS)]
    with pytest.raises(InputError, match="unknown frozen KV cache layout 'exact'"):
        FrozenKVCache(cache.keys, cache.values, cache.spans, cache.token_ids, cache.meta, layout="exact")


def blend_logits(model, tokenizer, cache, retrieval, question, passages):
    """First-answer-token logits through `cache` as the batch runner assembles a pass (a recomputing layout's
    pass included, the question's tokens but the last in it), after checking them against the question
    prefilled in a pass of its own."""
    row = cache.prompts(tokenizer, [question], [passages], retrieval)[0]
    logits = []
    with torch.inference_mode():
        for tails in (None, [row.tail_ids]):
            past, mask, rest = cache.assemble_rows([(cache, row.keys)], model, tails=tails)
            past = as_cache(past)
            tail = torch.tensor([row.tail_ids if rest is None else rest[0]])
            mask = torch.cat([mask, torch.ones_like(tail)], dim=1)
            positions = mask.sum(1, keepdim=True) - tail.shape[1] + torch.arange(tail.shape[1])[None]
            out = model(input_ids=tail, attention_mask=mask, position_ids=positions, **{cache_kwarg(model): past})
            logits.append(out.logits[0, -1])
        full = model(input_ids=torch.tensor([row.prompt.input_ids])).logits[0, -1]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    return logits[1], full, row


def recomputing(model, tokenizer, index, layout):
    """(retrieval of 3 passages, the block-layout cache, the same states in `layout`, a generator over it)."""
    retrieval = RetrievalConfig(k=3, context_tokens=1000)
    block = FrozenKVCache.build(model, tokenizer, index, retrieval).attach(model)
    cache = block.with_layout(layout)
    return retrieval, block, cache, Generator(model, tokenizer, index=index, retrieval=retrieval, max_new_tokens=8,
                                              batch_size=8, kv_cache=cache)


def recomputes_from_block_to_full(model, tokenizer, cache, block, retrieval, question, passages, setting, values):
    """`cache.<setting>` at values (everything, nothing, some): a full prefill's logits, the block layout's,
    neither. Returns the question's cached prompt."""
    outcomes = []
    for value in values:
        setattr(cache, setting, value)
        logits, full, row = blend_logits(model, tokenizer, cache, retrieval, question, passages)
        outcomes.append(logits)
    everything, none, some = outcomes
    blocked, _, _ = blend_logits(model, tokenizer, block, retrieval, question, passages)
    torch.testing.assert_close(everything, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(none, blocked, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(some, full, atol=1e-3) and not torch.allclose(some, blocked, atol=1e-3)
    return row


def test_the_blend_layout_recomputes_later_passages_up_to_a_full_prefill(model, tokenizer, index):
    """blend: with every token after the first passage recomputed, the logits are a full prefill's; with none,
    the block layout's; in between, neither. Batched answers equal one-at-a-time ones."""
    retrieval, block, blend, generator = recomputing(model, tokenizer, index, "blend")
    for question in QUESTIONS:
        passages = generator.retrieve([question])[0]
        row = recomputes_from_block_to_full(model, tokenizer, blend, block, retrieval, question, passages,
                                            "recompute_tokens", (10**6, 0, 4))
        assert len(row.keys) == 7  # head + 3 x (marker, passage)
    batched = [a.text for a in generator.answer_many(QUESTIONS)]
    assert batched == [generator.answer_many([q])[0].text for q in QUESTIONS]


def test_the_deviation_layout_recomputes_the_tokens_that_deviate_most(model, tokenizer, index):
    """deviation (CacheBlend's selection): all later tokens recomputed is a full prefill, none the block layout;
    the tokens chosen are those whose layer-1 states differ most from a full prefill's (a slot whose stored
    states are corrupted is chosen first), and the model runs all its layers again afterwards."""
    from retro_peft.kvcache.blend import DEVIATION_LAYER, context_ids, deviating, recompute_slots
    from retro_peft.hf_compat import layer_states

    retrieval, block, deviation, generator = recomputing(model, tokenizer, index, "deviation")
    question = QUESTIONS[0]
    passages = generator.retrieve([question])[0]
    row = recomputes_from_block_to_full(model, tokenizer, deviation, block, retrieval, question, passages,
                                        "recompute_ratio", (1.0, 0.0, 0.3))
    _, full, _ = blend_logits(model, tokenizer, block, retrieval, question, passages)
    assert model(input_ids=torch.tensor([row.prompt.input_ids])).logits[0, -1].allclose(full)  # all layers back

    from retro_peft.kvcache.assembly import assemble_rows

    past, mask = assemble_rows([(deviation, row.keys)], "cpu")
    width = mask.shape[1]
    candidates = recompute_slots(deviation, row.keys, width - int(mask.sum()), None)
    ids = context_ids([(deviation, row.keys)], width, "cpu")
    assert ids[0, -len(candidates):].tolist() == [t for _, t in candidates]  # later passages end the context
    target = candidates[len(candidates) // 2][0]
    keys, _ = layer_states(past, DEVIATION_LAYER)
    keys[0, :, target] += 100.0  # stored states that are far off
    picked = deviating(model, past, mask, ids, [candidates], [1 / len(candidates)])[0]
    assert [s for s, _ in picked] == [target]
    picked = deviating(model, past, mask, ids, [candidates], [0.25])[0]
    assert len(picked) == -(-len(candidates) // 4) and target in [s for s, _ in picked]
    assert picked == sorted(picked)  # in slot order
    with pytest.raises(InputError, match="recompute_ratio"):
        block.with_layout("deviation", recompute_ratio=1.5)
    batched = [a.text for a in generator.answer_many(QUESTIONS)]
    assert batched == [generator.answer_many([q])[0].text for q in QUESTIONS]


def test_moving_keys_equals_computing_them_at_the_new_position(model, tokenizer):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rotary = model.model.rotary_emb
    k = torch.randn(1, 2, 5, 8)
    at = torch.arange(10, 15)[None]
    cos, sin = rotary(k, at)
    _, k_at = apply_rotary_pos_emb(k, k, cos, sin)
    cos, sin = rotary(k, at + 37)
    _, k_moved = apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(rotate(k_at, torch.full((5,), 37), rotary.inv_freq), k_moved, atol=1e-5, rtol=1e-5)
    # and inside the model: layer 0's keys of a passage placed second equal those computed there directly
    head, body = [5, 6, 7, 8], [11, 12, 13]
    cache = FrozenKVCache.from_segments(model, head, {"<marker 1>": [9], "b": body}).attach(model)
    past, _ = cache.assemble([["<head>", "<marker 1>", "b", "<marker 1>", "b"]], "cpu")
    layer = past.layers[0] if hasattr(past, "layers") else None
    keys = layer.keys if layer is not None else past.key_cache[0]
    with torch.inference_mode():
        from transformers import DynamicCache

        direct = DynamicCache()
        model(input_ids=torch.tensor([head + [9] + body + [9] + body]), **{cache_kwarg(model): direct})
        direct_keys = direct.layers[0].keys if hasattr(direct, "layers") else direct.key_cache[0]
    torch.testing.assert_close(keys[..., -3:, :], direct_keys[..., -3:, :], atol=1e-5, rtol=1e-5)


def test_batched_answers_equal_one_at_a_time_with_the_frozen_cache(model, tokenizer, index):
    retrieval = RetrievalConfig(k=3, context_tokens=400)
    cache = FrozenKVCache.build(model, tokenizer, index, retrieval)
    questions = QUESTIONS + ["Tell me about rivers"]
    own = [Passage("x#1", "x", "Passages the caller brings are not in the cache.", "Own")]
    batched = Generator(model, tokenizer, index=index, retrieval=retrieval, max_new_tokens=10, batch_size=8,
                        kv_cache=cache)
    single = Generator(model, tokenizer, index=index, retrieval=retrieval, max_new_tokens=10, batch_size=1,
                       kv_cache=cache)
    passages = batched.retrieve(questions)
    passages[-1] = own  # one row in the batch is prefilled in full (its passage has no stored states)
    got = batched.answer_many(questions, passages=passages)
    assert [a.text for a in got] == [a.text for a in single.answer_many(questions, passages=passages)]
    assert all(len(a.passages) == 3 for a in got[:-1]) and got[-1].passages == own
    plain = Generator(model, tokenizer, index=index, retrieval=retrieval, max_new_tokens=10)
    assert got[-1].text == plain.answer(questions[-1], passages=own).text
    # a batch in which no row has stored passages is an ordinary one
    assert [a.text for a in batched.answer_many(questions[:2], passages=[own, []])] == \
        [a.text for a in plain.answer_many(questions[:2], passages=[own, []])]
    # the fixed-shape decode path (what compile_decode replays as CUDA graphs, run eagerly here) takes the
    # stored context too: it is written into the static cache's first slots
    batched.static = StaticDecode(model, compile=False)
    assert [a.text for a in batched.answer_many(questions, passages=passages)] == [a.text for a in got]
    # the same shape again reuses that static cache (emptied) for other rows
    assert len(batched.static._caches) == 1
    assert [a.text for a in batched.answer_many(questions[::-1], passages=passages[::-1])] == \
        [a.text for a in got[::-1]]
    assert len(batched.static._caches) == 1


def test_passages_are_kept_whole_within_the_budget(model, tokenizer, index):
    roomy = RetrievalConfig(k=3, context_tokens=1000)
    cache = FrozenKVCache.build(model, tokenizer, index, roomy)
    retrieved = Generator(model, tokenizer, index=index, retrieval=roomy, kv_cache=cache).retrieve(QUESTIONS)
    whole = cache.prompts(tokenizer, QUESTIONS, retrieved, roomy)
    assert all(len(row.prompt.passages) == 3 for row in whole)
    budget = min(len(row.prompt.input_ids) for row in whole) - 1
    tight = RetrievalConfig(k=3, context_tokens=budget)
    chunks = {c.id: c.text for c in index.chunks()}
    for row, full in zip(cache.prompts(tokenizer, QUESTIONS, retrieved, tight), whole):
        assert len(row.prompt.input_ids) <= budget and 0 < len(row.prompt.passages) < 3
        assert row.prompt.passages == full.prompt.passages[:len(row.prompt.passages)]  # the lowest-ranked go
        assert all(p.text == chunks[p.chunk_id] for p in row.prompt.passages)  # never cut


@pytest.mark.parametrize("soft_tokens", [0, 3])
def test_block_attention_training_runs_prompts_exactly_as_the_frozen_cache_serves_them(model, tokenizer, index,
                                                                                       soft_tokens):
    """...with soft tokens after every passage too (`kvcache.soft`): stored with it, read by the question."""
    from retro_peft.kvcache.soft import SoftTokens, separator_ids
    from retro_peft.qa import QAItem
    from retro_peft.training import build_examples
    from retro_peft.training.data import IGNORE
    from retro_peft.training.trainer import block_attention_forward

    retrieval = RetrievalConfig(k=2, distractors=1, oracle_fraction=0.5, context_tokens=230, block_attention=True)
    items = [QAItem(f"q{i}", q, ("x",) if i % 2 else (), is_impossible=not i % 2) for i, q in enumerate(QUESTIONS)]
    examples = build_examples(items, index, tokenizer, retrieval)
    soft = SoftTokens.initial(model, soft_tokens, separator_ids(tokenizer, retrieval)) if soft_tokens else None
    cache = FrozenKVCache.build(model, tokenizer, index, retrieval, soft=soft)
    for key, (_, length, _) in cache.spans.items():  # each passage's span holds its soft tokens' states too
        assert length == len(cache.token_ids[key]) + (soft_tokens if key.startswith("chunk:") else 0)
    serving = Generator(model, tokenizer, index=index, retrieval=retrieval, kv_cache=cache)
    chunks = {c.id: c for c in index.chunks()}
    with torch.inference_mode():
        trained, _ = block_attention_forward(model, examples, tokenizer.pad_token_id, torch.device("cpu"), soft=soft)
    # the batch's logits are kept at the tail positions that predict an answer token in some row
    tails = [ex.labels[sum(n for _, n in ex.segments):] for ex in examples]
    kept = sorted({i - 1 for labels in tails for i, t in enumerate(labels) if t != IGNORE})
    for row, (item, ex) in enumerate(zip(items, examples)):
        passages = [Passage(c, chunks[c].doc_id, chunks[c].text, chunks[c].metadata.get("title", "")) for c in ex.chunk_ids]
        assert len(passages) >= 2 and all(p.text == chunks[p.chunk_id].text for p in passages)  # whole passages
        prompt_tokens = ex.labels.index(next(t for t in ex.labels if t != IGNORE))
        assert prompt_tokens <= retrieval.context_tokens
        served = cache.prompts(tokenizer, [item.question], [passages], retrieval)[0]
        assert served.prompt.input_ids == ex.input_ids[:prompt_tokens]  # same tokens, cut the same way
        assert [k for k, _ in ex.segments] == served.keys
        want, _ = first_logits(model, tokenizer, serving, item.question, passages)
        last = kept.index(prompt_tokens - sum(n for _, n in ex.segments) - 1)  # the prompt's last position
        torch.testing.assert_close(trained.logits[row, last], want, atol=1e-4, rtol=1e-4)


def test_saved_cache_reloads_and_refuses_other_models_indexes_and_templates(model, tokenizer, index, tmp_path,
                                                                             tmp_path_factory):
    retrieval = RetrievalConfig(k=2)
    cache = FrozenKVCache.build(model, tokenizer, index, retrieval)
    path = cache.save(tmp_path / "kv.safetensors")
    loaded = FrozenKVCache.load(path, model, tokenizer=tokenizer, index=index, retrieval=retrieval)
    assert torch.equal(loaded.keys, cache.keys) and torch.equal(loaded.values, cache.values)
    assert loaded.spans == cache.spans and loaded.digests == cache.digests
    with pytest.raises(InputError, match="other model weights"):
        FrozenKVCache.load(path, tiny(tmp_path_factory, tokenizer, seed=4))
    with pytest.raises(InputError, match="another prompt template"):
        FrozenKVCache.load(path, tokenizer=tokenizer, retrieval=RetrievalConfig(k=2, template="plain"))
    other = tiny_index(tmp_path / "other", DOCS[:2])
    with pytest.raises(InputError, match="another version of index"):
        Generator(model, tokenizer, index=other, retrieval=retrieval, kv_cache=loaded)
    with pytest.raises(InputError, match="is a folder"):
        cache.save(tmp_path)
    (tmp_path / "broken.safetensors").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(InputError, match="not a readable frozen KV cache"):
        FrozenKVCache.load(tmp_path / "broken.safetensors")
    with pytest.raises(InputError, match="not found"):
        FrozenKVCache.load(tmp_path / "missing.safetensors")


def test_load_or_build_serves_the_states_mapped_from_the_file(model, tokenizer, index, tmp_path):
    """Built or read, the cache comes back memory-mapped from its file (pages read on use, shared between
    processes), not as private memory the size of the file."""
    from retro_peft.kvcache import load_or_build

    retrieval = RetrievalConfig(k=2)
    path = tmp_path / "kv" / "built.safetensors"
    built = load_or_build(path, model, tokenizer, index, retrieval, progress=False)
    assert str(path.resolve()) in open("/proc/self/maps").read()
    reference = FrozenKVCache.build(model, tokenizer, index, retrieval)
    assert torch.equal(built.keys, reference.keys) and built.spans == reference.spans
    again = load_or_build(path, model, tokenizer, index, retrieval)
    assert torch.equal(again.values, reference.values)


def test_a_failed_save_leaves_the_previous_file_whole(model, tokenizer, index, tmp_path, monkeypatch):
    cache = FrozenKVCache.build(model, tokenizer, index, RetrievalConfig(k=1))
    path = cache.save(tmp_path / "kv.safetensors")
    before = path.read_bytes()
    import safetensors.torch

    def crash(tensors, filename, metadata=None):  # the process dies half-way through writing
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["kv.safetensors"]


def test_models_the_cache_cannot_move_keys_for_are_refused(tokenizer, index):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).eval()
    with pytest.raises(InputError, match="supports llama"):
        FrozenKVCache.build(gpt2, tokenizer, index, RetrievalConfig(k=1))


def test_refilling_a_static_cache_at_once_matches_transformers_own_reset_and_update():
    """`refill_static` empties every layer and writes a context in three calls; what it leaves is what
    transformers' own reset and per-layer updates leave, stale slots of a longer context included."""
    from transformers import LlamaConfig

    from retro_peft.hf_compat import StackedStates, _plain_static_layers, refill_static, static_cache

    config = LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=50)
    g = torch.Generator().manual_seed(0)

    def states(width: int) -> StackedStates:
        return StackedStates(*(torch.randn(3, 2, 2, width, 8, generator=g) for _ in range(2)))

    ours, theirs = (static_cache(config, batch=2, length=16, device="cpu", dtype=torch.float32) for _ in range(2))
    for context in (states(10), states(4), None, states(16)):
        refill_static(ours, context)
        theirs.reset()
        for layer in range(3 if context is not None else 0):
            theirs.update(context.keys[layer], context.values[layer], layer)
        assert _plain_static_layers(ours) is not None  # initialized by the first fill: the fast path after it
        for mine, reference in zip(ours.layers, theirs.layers):
            assert torch.equal(mine.keys, reference.keys) and torch.equal(mine.values, reference.values)
            assert int(mine.cumulative_length) == int(reference.cumulative_length)
