"""RAFT training data, the trainer (real short runs on a tiny Llama), resume, evaluation, train/eval CLI."""

import dataclasses
import json

import pytest
import torch
from conftest import run_cli
from helpers_adapters import (DOCS, ONE_THREAD, QA, Crash, crash_at, single_thread, tiny_index, tiny_llama_folder,
                              resume_equals_straight, train_killed_at_first_checkpoint, write_jsonl)
from safetensors.torch import load_file

from retro_peft.adapters import RetrievalConfig, RetroPeftModel, config_for_method
from retro_peft.cli import main
from retro_peft.errors import EncoderMismatchError, InputError
from retro_peft.qa import QAItem, load_qa
from retro_peft.training import (TrainConfig, build_examples, evaluate, exact_match, latest_checkpoint, score,
                                 token_f1, train)
from retro_peft.training.data import IGNORE
from retro_peft.training.trainer import epoch_batches

single_thread()


@pytest.fixture(scope="module")
def items(qa_file):
    return load_qa(qa_file)


RETRIEVAL = RetrievalConfig(k=2, distractors=1, oracle_fraction=0.5, context_tokens=220)


class CountingIndex:
    """The real index, counting how often it is searched."""

    def __init__(self, index):
        self.index, self.calls = index, 0

    def search_many(self, *args, **kwargs):
        self.calls += 1
        return self.index.search_many(*args, **kwargs)

    def chunks(self):
        return self.index.chunks()


def _doc_text(doc_id):
    return next(d["text"] for d in DOCS if d["id"] == doc_id)


# -- training data -----------------------------------------------------------------------------------

def test_examples_follow_raft_and_put_loss_on_the_answer_only(items, index, tokenizer):
    counting = CountingIndex(index)
    examples = build_examples(items, counting, tokenizer, RETRIEVAL, seed=0)
    assert counting.calls == 1  # all retrieval in one batched call
    assert len(examples) == len(items)
    chunk_doc = {c.id: c.doc_id for c in index.chunks()}
    for item, ex in zip(items, examples):
        answer_tokens = [t for t in ex.labels if t != IGNORE]
        assert tokenizer.decode(answer_tokens) == ex.target + "<|im_end|>"
        first = ex.labels.index(answer_tokens[0])
        assert all(t == IGNORE for t in ex.labels[:first]) and ex.labels[first:] == ex.input_ids[first:]
        assert len(ex.input_ids) - len(answer_tokens) <= RETRIEVAL.context_tokens
        docs = [chunk_doc[c] for c in ex.chunk_ids]
        assert len(docs) == len(set(ex.chunk_ids)) <= RETRIEVAL.k + RETRIEVAL.distractors
        if item.is_impossible:
            assert ex.target == "I don't know." and not ex.has_gold
        elif ex.has_gold:
            # The target is the first answer the prompt's passages hold (here every item's answers[0]), then
            # (citations on, the default) the markers of the gold document's passages, in prompt order.
            markers = "".join(f"[{i}]" for i, d in enumerate(docs, 1) if d in item.gold_doc_ids)
            assert markers and ex.target == f"{item.answers[0]} {markers}" and item.gold_doc_ids[0] in docs
        else:
            assert ex.target == "I don't know." and item.gold_doc_ids[0] not in docs
            prompt = tokenizer.decode(ex.input_ids[:first])
            assert item.answers[0] not in prompt.split("Question:")[0]  # no chunk gives the answer away
    assert {ex.has_gold for ex, it in zip(examples, items) if not it.is_impossible} == {True, False}


def test_examples_are_deterministic_given_the_seed(items, index, tokenizer):
    a = build_examples(items, index, tokenizer, RETRIEVAL, seed=0)
    b = build_examples(items, index, tokenizer, RETRIEVAL, seed=0)
    c = build_examples(items, index, tokenizer, RETRIEVAL, seed=1)
    assert [x.input_ids for x in a] == [x.input_ids for x in b]
    assert [x.input_ids for x in a] != [x.input_ids for x in c]


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_oracle_fraction_extremes(items, index, tokenizer, p):
    retrieval = RetrievalConfig(k=1, distractors=2, oracle_fraction=p, context_tokens=400)
    examples = build_examples(items, index, tokenizer, retrieval)
    answerable = [ex for ex, it in zip(examples, items) if not it.is_impossible]
    # P=1 with k=1: the gold chunk is inserted even where hybrid search ranks another first.
    assert all(ex.has_gold for ex in answerable) if p == 1.0 else not any(ex.has_gold for ex in answerable)


WORD_DOCS = [
    {"id": "usa", "title": "United States", "text": "The United States declared its independence from Britain in 1776."},
    {"id": "ww2", "title": "Second World War", "text": "The Second World War ended in 1945 after six years of fighting."},
    {"id": "moon", "title": "Moon", "text": "The Earth has 1 natural satellite, the Moon, which circles it every 27 days."},
]


@pytest.fixture(scope="module")
def word_index(tmp_path_factory):
    return tiny_index(tmp_path_factory.mktemp("words") / "idx", docs=WORD_DOCS)


@pytest.mark.parametrize("grounding", ["span", "doc", "auto"])
def test_target_is_the_answer_the_kept_passages_hold(word_index, tokenizer, grounding):
    item = QAItem("us", "Which country declared independence in 1776?", ("USA", "United States"), ("usa",))
    retrieval = RetrievalConfig(k=1, distractors=0, oracle_fraction=1.0, context_tokens=300, grounding=grounding,
                                citations=False)
    (ex,) = build_examples([item], word_index, tokenizer, retrieval)
    # The gold passage says "United States", never "USA": training on "USA" would teach an unsupported answer.
    assert ex.has_gold and ex.target == "United States"
    # With citations (the default) the target ends with the gold passage's marker.
    (cited,) = build_examples([item], word_index, tokenizer, dataclasses.replace(retrieval, citations=True))
    assert cited.target == "United States [1]" and cited.input_ids[:-5] == ex.input_ids[:-2]


def test_grounding_by_document_keeps_an_answer_no_passage_spells(word_index, tokenizer):
    # No passage says "USA": under the span rule the gold document holds no gold passage (the example targets
    # abstention); grounded by document, its chunk is the gold passage and the target is the answer as given.
    item = QAItem("us", "Which country declared independence in 1776?", ("USA",), ("usa",))
    retrieval = RetrievalConfig(k=1, distractors=0, oracle_fraction=1.0, context_tokens=300)
    docs = {c.id: c.doc_id for c in word_index.chunks()}
    (span,) = build_examples([item], word_index, tokenizer, dataclasses.replace(retrieval, grounding="span"))
    assert not span.has_gold and span.target == "I don't know."
    for grounding in ("doc", "auto"):
        (ex,) = build_examples([item], word_index, tokenizer, dataclasses.replace(retrieval, grounding=grounding))
        assert ex.has_gold and ex.target == "USA [1]" and [docs[c] for c in ex.chunk_ids] == ["usa"]


def test_an_answer_counts_as_mentioned_only_as_whole_words(word_index, tokenizer):
    item = QAItem("moons", "How many moons does the Earth have?", ("1",), ("moon",))
    retrieval = RetrievalConfig(k=3, distractors=0, oracle_fraction=0.0, context_tokens=400)
    (ex,) = build_examples([item], word_index, tokenizer, retrieval)
    docs = {c.id: c.doc_id for c in word_index.chunks()}
    # The no-gold share drops every chunk that gives the answer away; "1945" and "1776" do not say "1".
    assert not ex.has_gold and ex.target == "I don't know."
    assert {docs[c] for c in ex.chunk_ids} == {"usa", "ww2"}


def test_training_data_without_any_answer_is_refused(index, tokenizer):
    unanswerable = [QAItem("x", "Who?", (), ("tea",), True)]
    with pytest.raises(InputError, match="none of the training questions has an answer"):
        build_examples(unanswerable, index, tokenizer, RETRIEVAL)


def test_length_grouped_batches_cover_each_example_once_per_epoch():
    lengths = [5, 100, 7, 98, 6, 99, 8, 97, 50, 51]
    batches = epoch_batches(lengths, batch_size=2, seed=0, epoch=0, window=8)
    assert sorted(i for b in batches for i in b) == list(range(10))
    pad_waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert pad_waste < 20  # vs ~180 expected for random pairs
    assert batches == epoch_batches(lengths, 2, 0, 0, 8) and batches != epoch_batches(lengths, 2, 0, 1, 8)


# -- trainer -----------------------------------------------------------------------------------------

def _fresh(tiny, method="lora", steps=6):
    return RetroPeftModel.create(tiny, config_for_method(method, retrieval=RETRIEVAL, steps=steps), seed=0)


def test_a_short_real_training_lowers_the_loss(tiny, items, index, tokenizer):
    from retro_peft.training.trainer import evaluate_loss

    examples = build_examples(items, index, tokenizer, RETRIEVAL)
    model = _fresh(tiny)
    before = evaluate_loss(model.model, examples, 4, tokenizer.pad_token_id, torch.device("cpu"))
    result = train(model, examples, TrainConfig(steps=8, batch_size=4, lr=2e-2, log_every=2, eval_every=4),
                   eval_examples=examples, progress=False)
    after = evaluate_loss(model.model, examples, 4, tokenizer.pad_token_id, torch.device("cpu"))
    assert after < before - 1.0, (before, after)
    assert result.steps == 8 and [s for s, _ in result.losses] == [2, 4, 6, 8]
    assert [s for s, _ in result.eval_losses] == [4, 8] and result.tokens > 0 and result.tokens_per_s > 0


def test_block_attention_training_learns_the_frozen_cache_layout(items, index, tokenizer, tmp_path):
    from retro_peft.training.trainer import evaluate_loss

    # larger random weights than `tiny`: attention patterns that depend on what a passage can see
    tiny = tiny_llama_folder(tmp_path / "llama", tokenizer, initializer_range=0.5)
    block = dataclasses.replace(RETRIEVAL, k=3, context_tokens=300, block_attention=True)
    examples = build_examples(items, index, tokenizer, block)
    assert all(ex.segments for ex in examples)
    as_full_prompts = [dataclasses.replace(ex, segments=()) for ex in examples]  # same tokens, one forward pass
    losses = {}
    for layout, train_on in (("block", examples), ("full", as_full_prompts)):
        model = RetroPeftModel.create(tiny, config_for_method("lora", retrieval=block, steps=30), seed=0)
        before = evaluate_loss(model.model, train_on, 4, tokenizer.pad_token_id, torch.device("cpu"))
        train(model, train_on, TrainConfig(steps=30, batch_size=4, lr=1e-2, log_every=10), progress=False)
        losses[layout] = {name: evaluate_loss(model.model, exs, 4, tokenizer.pad_token_id, torch.device("cpu"))
                          for name, exs in (("block", examples), ("full", as_full_prompts))}
        assert losses[layout][layout] < before - 1.0, (layout, before, losses)
    # each adapter reads best the layout it was trained on: block training really is another computation
    assert losses["block"]["block"] < losses["block"]["full"] and losses["full"]["full"] < losses["full"]["block"], losses


def layout_gap(model, examples, pad_id) -> float:
    """Mean KL(full prefill || frozen-cache layout) over the answer tokens, each example's full prefill run
    on its own (no padding, no collate): what distillation should shrink, measured apart from its code."""
    from retro_peft.training.trainer import block_attention_forward

    with torch.no_grad():
        cached, targets = block_attention_forward(model.model, examples, pad_id, torch.device("cpu"))
        student = cached.logits[targets != IGNORE]
        teacher = []
        for ex in examples:
            logits = model.model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            teacher += [logits[i - 1] for i, label in enumerate(ex.labels) if i and label != IGNORE]
        teacher = torch.stack(teacher)
    assert teacher.shape == student.shape
    return torch.nn.functional.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                                      reduction="batchmean").item()


def test_distillation_pulls_the_cached_layout_toward_the_full_prefill(items, index, tokenizer, tmp_path):
    from retro_peft.training.trainer import evaluate_loss

    tiny = tiny_llama_folder(tmp_path / "llama", tokenizer, initializer_range=0.5)
    block = dataclasses.replace(RETRIEVAL, k=3, context_tokens=300, block_attention=True)
    examples = build_examples(items, index, tokenizer, block)
    full_prompts = [dataclasses.replace(ex, segments=()) for ex in examples]
    pad = tokenizer.pad_token_id
    # the recipe's start: an adapter trained with every passage in view, saved and continued twice
    start = RetroPeftModel.create(tiny, config_for_method("lora", retrieval=block, steps=20), seed=0)
    train(start, full_prompts, TrainConfig(steps=20, batch_size=4, lr=1e-2), progress=False)
    start.save(tmp_path / "full")
    before = layout_gap(start, examples, pad)
    gaps, full_losses = {}, {}
    for distill in (0.0, 1.0):
        model = RetroPeftModel.load(tmp_path / "full", is_trainable=True)
        train(model, examples, TrainConfig(steps=20, batch_size=4, lr=1e-2, distill=distill), progress=False)
        gaps[distill] = layout_gap(model, examples, pad)
        full_losses[distill] = evaluate_loss(model.model, full_prompts, 4, pad, torch.device("cpu"))
    # the cached layout answers closer to the full prefill than block training alone leaves it (measured:
    # 0.59 -> 0.39 alone, 0.22 distilled), and the full copy goes on learning too
    assert gaps[1.0] < 0.75 * gaps[0.0] and gaps[1.0] < before, (before, gaps)
    assert full_losses[1.0] < evaluate_loss(start.model, full_prompts, 4, pad, torch.device("cpu")), full_losses
    with pytest.raises(InputError, match="needs block-attention examples"):
        train(start, full_prompts, TrainConfig(steps=1, distill=1.0), progress=False)


def test_the_answerability_head_is_calibrated_in_the_layout_it_answers_in(items, index, tokenizer, tmp_path, caplog):
    """Calibration reads each held-out prompt's features where answering reads them: through the frozen KV cache
    (its layout), or a full prefill. The score an answer reports is the one calibration saw, and a head used in
    the other layout is warned about (there the same prompts score differently)."""
    import logging

    from retro_peft.generation import Generator
    from retro_peft.generation.answerability import AnswerabilityHead
    from retro_peft.kvcache import FrozenKVCache
    from retro_peft.training.calibrate import answerability_features, calibrate

    tiny = tiny_llama_folder(tmp_path / "llama", tokenizer, initializer_range=0.5)
    block = dataclasses.replace(RETRIEVAL, k=3, context_tokens=300, block_attention=True)
    model = RetroPeftModel.create(tiny, config_for_method("lora", retrieval=block), seed=0)
    tokenizer = model.tokenizer  # (the cache's template fingerprint names the tokenizer)
    full = model.generator(index)
    chunks = {p.chunk_id for ps in full.retrieve([it.question for it in items]) for p in ps}
    cache = FrozenKVCache.build(model.model, tokenizer, index, block, chunk_ids=chunks)
    assert len(cache.digests) == len(chunks)
    one = sorted(chunks)[0]  # only the chunks asked for
    assert list(FrozenKVCache.build(model.model, tokenizer, index, block, chunk_ids={one}).digests) == [f"chunk:{one}"]
    cached = model.generator(index, kv_cache=cache)
    features = {g.layout: answerability_features(g, items) for g in (full, cached)}
    assert not torch.allclose(features["full"], features["block"], atol=1e-3)  # the layouts' states differ

    head = calibrate(cached, items, answer_rate=0.5)
    assert head.layout == "block"
    head.save(tmp_path)
    assert AnswerabilityHead.load(tmp_path).layout == "block"
    answers = Generator(model.model, tokenizer, index=index, retrieval=block, kv_cache=cache,
                        answerability=head).answer_many([it.question for it in items])
    want = head.scores(features["block"]).tolist()
    assert [a.answerability for a in answers] == pytest.approx(want, abs=1e-4)
    assert {a.abstained for a in answers} == {True, False}  # the threshold splits these questions
    with caplog.at_level(logging.WARNING, logger="retro_peft.generation.generator"):
        Generator(model.model, tokenizer, index=index, retrieval=block, answerability=head)
    assert "calibrated on prompts in the block layout and answers in the full layout" in caplog.text


def test_compiled_layers_train_like_eager_ones_and_are_eager_again_afterwards(tiny, items, index, tokenizer):
    examples = build_examples(items, index, tokenizer, RETRIEVAL)
    config = TrainConfig(steps=3, batch_size=3, lr=1e-2, log_every=1)

    def fresh():  # no dropout: compiled kernels draw their own random numbers
        adapter = config_for_method("lora", retrieval=RETRIEVAL, steps=3)
        adapter.peft.lora_dropout = 0.0
        return RetroPeftModel.create(tiny, adapter, seed=0)

    eager = train(fresh(), examples, config, progress=False)
    model = fresh()
    compiled = train(model, examples, dataclasses.replace(config, compile=True), progress=False)
    # Same data order, same math: the losses agree to float tolerance (fused kernels round differently).
    assert [s for s, _ in compiled.losses] == [1, 2, 3]
    assert all(abs(a - b) < 1e-3 * max(1.0, abs(a)) for (_, a), (_, b) in zip(eager.losses, compiled.losses)), \
        (eager.losses, compiled.losses)
    layers = model.model.get_base_model().model.layers
    assert all(layer._compiled_call_impl is None for layer in layers)  # generation runs the plain modules


def layers_of(model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.model.get_base_model().modules() if isinstance(m, GradientCheckpointingLayer)]


@pytest.mark.parametrize("block", [False, True])
def test_gradient_checkpointing_trains_exactly_like_keeping_the_activations(tiny, items, index, tokenizer, block,
                                                                           monkeypatch):
    retrieval = dataclasses.replace(RETRIEVAL, block_attention=block)
    examples = build_examples(items, index, tokenizer, retrieval)
    config = TrainConfig(steps=3, batch_size=3, lr=1e-2, log_every=1)

    def fresh():
        return RetroPeftModel.create(tiny, config_for_method("lora", retrieval=retrieval, steps=3), seed=0)

    if block:  # built from the passages' KV caches, which checkpointing turns off: refused before any step
        with pytest.raises(InputError, match="block-attention"):
            train(fresh(), examples, dataclasses.replace(config, gradient_checkpointing=True), progress=False)
        return
    kept = fresh()
    plain = train(kept, examples, config, progress=False)
    model = fresh()
    checkpointed = train(model, examples, dataclasses.replace(config, gradient_checkpointing=True), progress=False)
    # the same math, dropout masks included (the RNG state is replayed in the recomputation)
    assert [s for s, _ in checkpointed.losses] == [1, 2, 3]
    assert all(abs(a - b) < 1e-5 * max(1.0, abs(a)) for (_, a), (_, b) in zip(plain.losses, checkpointed.losses)), \
        (plain.losses, checkpointed.losses)
    a = {n: p for n, p in kept.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in model.model.named_parameters() if p.requires_grad}
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    assert not model.model.get_base_model().is_gradient_checkpointing  # undone after training
    # a fraction: only the first layers recompute (the others keep their activations), the same math again
    half = fresh()
    flags = []
    partial = train(half, examples, dataclasses.replace(config, gradient_checkpointing=0.5), progress=False,
                    on_step=lambda *_: flags.append([m.gradient_checkpointing for m in layers_of(half)]))
    assert flags[0] == [True] * (len(flags[0]) // 2) + [False] * (len(flags[0]) - len(flags[0]) // 2)
    assert all(abs(a - b) < 1e-5 * max(1.0, abs(a)) for (_, a), (_, b) in zip(plain.losses, partial.losses))
    with pytest.raises(InputError, match="fraction"):
        dataclasses.replace(config, gradient_checkpointing=1.5).validate()
    # selective: every layer, the large products' outputs kept (the tiny model's are small: the threshold lowered
    # so that its projections (32-64 inputs) count as large and LoRA's rank-16 up-projection does not), the same math
    from retro_peft.training import trainer as trainer_module

    decisions = []
    policy = trainer_module._keep_expensive

    def spy(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            decisions.append(decision.name)
        return decision
    monkeypatch.setattr(trainer_module, "_keep_expensive", spy)
    monkeypatch.setattr(trainer_module, "SELECTIVE_MIN_REDUCTION", 17)
    selective = train(fresh(), examples, dataclasses.replace(config, gradient_checkpointing="selective"),
                      progress=False)
    assert {"MUST_SAVE", "PREFER_RECOMPUTE"} <= set(decisions)
    assert all(abs(a - b) < 1e-5 * max(1.0, abs(a)) for (_, a), (_, b) in zip(plain.losses, selective.losses))
    with pytest.raises(InputError, match="selective"):
        dataclasses.replace(config, gradient_checkpointing="some").validate()

    def no_dropout():  # compiled kernels draw their own random numbers
        adapter = config_for_method("lora", retrieval=retrieval, steps=3)
        adapter.peft.lora_dropout = 0.0
        return RetroPeftModel.create(tiny, adapter, seed=0)

    eager = train(no_dropout(), examples, config, progress=False)
    both = train(no_dropout(), examples, dataclasses.replace(config, gradient_checkpointing=True, compile=True),
                 progress=False)  # with --compile too (fused kernels round differently)
    assert all(abs(a - b) < 1e-3 * max(1.0, abs(a)) for (_, a), (_, b) in zip(eager.losses, both.losses)), \
        (eager.losses, both.losses)


def test_crash_then_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny, items, index, tokenizer, tmp_path):
    examples = build_examples(items, index, tokenizer, RETRIEVAL)
    # 3 examples per epoch at batch 3 -> the run crosses epochs; dropout (0.05) exercises the RNG restore.
    config = TrainConfig(steps=7, batch_size=3, grad_accum=2, lr=1e-2, checkpoint_every=2, log_every=1)
    train(_fresh(tiny), examples, config, out_dir=tmp_path / "straight", progress=False)

    with pytest.raises(Crash):
        train(_fresh(tiny), examples, config, out_dir=tmp_path / "crashed", on_step=crash_at(5), progress=False)
    assert latest_checkpoint(tmp_path / "crashed").name == "step-000004"
    assert not (tmp_path / "crashed" / "adapter_model.safetensors").exists()
    resumed = train(_fresh(tiny), examples, config, out_dir=tmp_path / "crashed", resume=True, progress=False)
    assert resumed.resumed_from == 4 and resumed.steps == 7
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "crashed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_training_data(tiny, items, index, tokenizer, tmp_path):
    examples = build_examples(items, index, tokenizer, RETRIEVAL)
    config = TrainConfig(steps=3, batch_size=4, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        train(_fresh(tiny), examples, config, out_dir=tmp_path / "run", progress=False,
              on_step=lambda s, _: (_ for _ in ()).throw(KeyboardInterrupt) if s == 2 else None)
    other = build_examples(items, index, tokenizer, RETRIEVAL, seed=7)
    with pytest.raises(InputError, match="training data differs"):
        train(_fresh(tiny), other, config, out_dir=tmp_path / "run", resume=True, progress=False)


@pytest.mark.parametrize("field, value, message", [
    ("seed", -1, "seed must be a non-negative integer"),
    ("length_window", 0, "length_window must be a positive integer"),
    ("weight_decay", -0.1, "weight_decay must be >= 0"),
    ("max_grad_norm", -1.0, "max_grad_norm must be >= 0"),
    ("distill", float("nan"), "distill must be >= 0"),
    ("device", "gpu", "unknown device 'gpu'"),
])
def test_train_config_refuses_bad_values(field, value, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(**{field: value}).validate()


def test_a_fresh_run_refuses_a_folder_with_an_earlier_runs_checkpoints(tiny, items, index, tokenizer, qa_file,
                                                                       tmp_path, capsys):
    examples = build_examples(items, index, tokenizer, RETRIEVAL)
    config = TrainConfig(steps=3, batch_size=4, checkpoint_every=1)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_fresh(tiny), examples, config, out_dir=out, progress=False,
              on_step=lambda s, _: (_ for _ in ()).throw(KeyboardInterrupt) if s == 2 else None)
    # Pruning keeps the highest step numbers of any run: a new run's checkpoints would go, the old run's stay.
    with pytest.raises(InputError, match="holds checkpoints of an earlier run"):
        train(_fresh(tiny), examples, config, out_dir=out, progress=False)
    assert latest_checkpoint(out).name == "step-000002"
    assert main(["train", "--model", str(tiny), "--index", str(index.path), "--qa", str(qa_file),
                 "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_adalora_prunes_ranks_and_reports_them(tiny, items, index, tokenizer, tmp_path):
    examples = build_examples(items, index, tokenizer, RETRIEVAL)
    model = _fresh(tiny, "adalora", steps=10)
    result = train(model, examples, TrainConfig(steps=10, batch_size=4, lr=1e-2), out_dir=tmp_path / "ada",
                   progress=False)
    peft_cfg = model.config.peft
    ranks = result.final_ranks
    assert ranks and len(ranks) == 2 * 7  # 2 layers x 7 linear layers
    assert sum(ranks.values()) == peft_cfg.target_r * len(ranks) < peft_cfg.init_r * len(ranks)
    info = json.loads((tmp_path / "ada" / "retro_config.json").read_text())
    assert info["final_ranks"] == ranks
    # The pruned adapter reloads as a standard PEFT AdaLoRA adapter, through retro-peft and plain peft alike.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reloaded = RetroPeftModel.load(tmp_path / "ada")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), tmp_path / "ada").eval()
    ids = torch.tensor([examples[0].input_ids])
    model.model.eval()
    with torch.inference_mode():
        got, got_plain = reloaded.model(input_ids=ids).logits, plain(input_ids=ids).logits
        trained = model.model(input_ids=ids).logits
    assert torch.equal(got, got_plain)
    # Saving drops the pruned ranks (smaller matrices instead of zeroed ones): same function, but
    # the shorter sums round differently, so in-memory vs reloaded agree to float precision only.
    assert torch.allclose(got, trained, rtol=0, atol=1e-4)


# -- evaluation --------------------------------------------------------------------------------------

def test_squad_metrics():
    assert exact_match("the North Sea.", ["North Sea"]) == 1.0
    assert token_f1("North Sea coast", ["the North Sea"]) == pytest.approx(0.8)
    assert token_f1("Rhine", ["North Sea", "Rhine"]) == 1.0 and token_f1("", ["x"]) == 0.0


def test_evaluate_scores_answers_abstentions_and_recall(tiny, items, index, tokenizer):
    from retro_peft.generation import Generator

    gen = Generator(RetroPeftModel.create(tiny, config_for_method("ia3")).model, tokenizer, index=index,
                    retrieval=RETRIEVAL, max_new_tokens=3)
    result = evaluate(gen, items, limit=6)
    assert result.n == 6 and result.n_answerable == 5 and result.n_unanswerable == 1
    assert 0.0 <= result.f1 <= 1.0 and result.retrieval_recall >= 0.8 and len(result.predictions) == 6
    # score() on hand-made answers: one right, one abstained, one unanswerable abstained.
    from retro_peft.generation import Answer

    answers = [Answer("Normandy"), Answer("I don't know.", abstained=True), Answer("x")]
    picked = [items[0], items[1], items[5]]
    s = score(picked, [answers[0], answers[1], Answer("I don't know.", abstained=True)], retrieval=False)
    assert (s.em, s.answer_answerable, s.abstain_unanswerable, s.retrieval_recall) == (0.5, 0.5, 1.0, None)


# -- CLI ---------------------------------------------------------------------------------------------

def test_train_and_eval_cli(tiny, index, qa_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    common = ["--model", tiny, "--index", index.path, "--qa", qa_file]
    proc = run_cli("train", *common, "--method", "lora", "--out", out, "--steps", "2", "--batch-size", "4",
                   "--k", "2", "--context-tokens", "220", "--checkpoint-every", "1", "--no-progress", check=True,
                   env=ONE_THREAD)
    summary = json.loads(proc.stdout)
    assert summary["steps"] == 2 and summary["trainable_params"] > 0
    info = json.loads((out / "retro_config.json").read_text())
    assert info["index"]["encoder"] == "minilm" and len(info["training_data_sha256"]) == 64
    assert info["adapter"]["retrieval"]["k"] == 2

    # The rest runs the same CLI code in this process (a new process costs ~10 s of imports).
    assert main(["eval", *map(str, common), "--adapter", str(out), "--limit", "3", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    # One JSON shape for every answer kind: a span file's scores, the other kinds' set to null.
    assert {"n", "em", "f1", "abstain_unanswerable", "answer_answerable", "retrieval_recall"} <= set(scores)
    assert scores["kind"] == "span" and scores["accuracy"] is None and scores["rouge_l"] is None
    assert scores["n"] == 3 and scores["retrieval_recall"] == 1.0
    assert main(["eval", "--model", str(tiny), "--qa", str(qa_file), "--no-retrieval", "--limit", "2", "--json"]) == 0
    closed = json.loads(capsys.readouterr().out)
    assert closed["retrieval_recall"] is None and closed["n"] == 2

    # --kv-cache: built into the file by the first run, read back by the second (same answers), refused for
    # another model (the base model without the adapter) and without retrieval.
    kv = tmp_path / "kv" / "adapter.safetensors"
    with_kv = ["eval", *map(str, common), "--adapter", str(out), "--limit", "3", "--kv-cache", str(kv)]
    assert main([*with_kv, "--predictions", str(tmp_path / "p1.jsonl")]) == 0 and kv.is_file()
    assert main([*with_kv, "--predictions", str(tmp_path / "p2.jsonl")]) == 0
    assert (tmp_path / "p1.jsonl").read_text() == (tmp_path / "p2.jsonl").read_text()
    capsys.readouterr()
    assert main(["eval", *map(str, common), "--limit", "1", "--kv-cache", str(kv)]) == 2
    assert "other model weights" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny), "--qa", str(qa_file), "--no-retrieval", "--kv-cache", str(kv)]) == 2
    assert "needs --index" in capsys.readouterr().err
    # --kv-layout prefix: the same file, the answers of a full prefill (the predictions without a cache)
    assert main(["eval", *map(str, common), "--adapter", str(out), "--limit", "3", "--predictions",
                 str(tmp_path / "full.jsonl")]) == 0
    assert main([*with_kv, "--kv-layout", "prefix", "--predictions", str(tmp_path / "prefix.jsonl")]) == 0
    answers = lambda name: [json.loads(line)["prediction"] for line in (tmp_path / name).open()]  # noqa: E731
    assert answers("prefix.jsonl") == answers("full.jsonl")
    assert main(["eval", *map(str, common), "--limit", "1", "--kv-layout", "prefix"]) == 2
    assert "needs --kv-cache" in capsys.readouterr().err

    # --block-attention: recorded with the adapter, and the adapter answers through the frozen cache.
    block = tmp_path / "block"
    assert main(["train", *map(str, common), "--out", str(block), "--steps", "1", "--k", "2", "--context-tokens",
                 "220", "--checkpoint-every", "0", "--block-attention", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 1
    assert json.loads((block / "retro_config.json").read_text())["adapter"]["retrieval"]["block_attention"] is True
    assert main(["eval", *map(str, common), "--adapter", str(block), "--limit", "2", "--json",
                 "--kv-cache", str(tmp_path / "kv" / "block.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2

    # --from-adapter: the full-attention adapter continued in the cache's layout with distillation: it starts
    # from that adapter's weights (a learning rate of ~0 leaves them), keeps its retrieval settings (k 2) and,
    # without --steps, trains as many steps as it did
    continued = tmp_path / "continued"
    assert main(["train", "--index", str(index.path), "--qa", str(qa_file), "--from-adapter", str(out), "--out",
                 str(continued), "--lr", "1e-12", "--block-attention", "--distill", "1",
                 "--context-tokens", "220", "--checkpoint-every", "0", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    started_steps = json.loads((out / "retro_config.json").read_text())["training"]["config"]["steps"]
    assert summary["method"] == "lora" and summary["steps"] == started_steps
    info = json.loads((continued / "retro_config.json").read_text())
    assert info["adapter"]["retrieval"]["k"] == 2 and info["adapter"]["retrieval"]["block_attention"] is True
    assert info["trained_from"] == str(out.absolute()) and info["training"]["config"]["distill"] == 1.0
    weights, started = (load_file(d / "adapter_model.safetensors") for d in (continued, out))
    assert weights.keys() == started.keys()
    assert all(torch.allclose(weights[k], started[k], atol=1e-6) for k in weights)
    assert any(k.endswith("lora_B.weight") and started[k].abs().sum() > 0 for k in started)  # trained, not fresh
    assert main(["train", *map(str, common), "--from-adapter", str(out), "--method", "ia3", "--out",
                 str(tmp_path / "other")]) == 2
    assert "differs from --from-adapter's method (lora)" in capsys.readouterr().err

    # Re-training into a finished folder is refused, not silently overwritten.
    assert main(["train", *map(str, common), "--out", str(out), "--steps", "2"]) == 2
    assert "already holds a trained adapter" in capsys.readouterr().err


def test_cli_bad_input_fails_before_training(tiny, index, qa_file, tmp_path, small_encoder_dir, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    no_answers = write_jsonl(tmp_path / "none.jsonl", [q for q in QA if q.get("is_impossible")])
    cases = [
        (["--qa", empty], "holds no questions"),
        (["--qa", no_answers], "no question with an answer"),
        (["--qa", qa_file, "--encoder", str(small_encoder_dir)], "was built with encoder"),
        (["--qa", qa_file, "--oracle-fraction", "2"], "oracle fraction"),
        (["--qa", qa_file, "--method", "adalora", "--steps", "0"], "at least 1 training step"),
    ]
    for extra, message in cases:
        out = tmp_path / f"out{len(message)}"
        code = main(["train", "--model", str(tiny), "--index", str(index.path), "--out", str(out), *map(str, extra)])
        err = capsys.readouterr().err
        assert code == 2 and "error: " in err and message in err and "Traceback" not in err, err
        assert not out.exists()  # nothing was written: it failed before training


def test_cli_bad_arguments_and_output_paths_fail_before_the_model_is_loaded(index, qa_file, tmp_path, capsys,
                                                                             monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only torch, wherever the test runs
    missing = str(tmp_path / "no-model")  # loading it would fail: the error must come first
    a_file, a_folder = tmp_path / "file.txt", tmp_path / "folder"
    a_file.write_text("keep me\n")
    a_folder.mkdir()
    train_cli = ["train", "--model", missing, "--index", str(index.path), "--qa", str(qa_file)]
    eval_cli = ["eval", "--model", missing, "--qa", str(qa_file), "--no-retrieval"]
    cases = [
        (train_cli + ["--out", str(tmp_path / "o1"), "--seed", "-1"], "seed must be a non-negative integer"),
        (train_cli + ["--out", str(tmp_path / "o2"), "--lr", "0"], "learning rate must be positive"),
        (train_cli + ["--out", str(tmp_path / "o3"), "--device", "gpu"], "unknown device 'gpu'"),
        (train_cli + ["--out", str(tmp_path / "o4"), "--device", "cuda"], "CUDA is not available"),
        (train_cli + ["--out", str(tmp_path / "o5"), "--distill", "1"], "add --block-attention"),
        (train_cli + ["--out", str(tmp_path / "o6"), "--from-adapter", missing], "adapter folder not found"),
        (train_cli + ["--out", str(a_file)], "is an existing file"),
        (train_cli + ["--out", str(a_file / "adapter")], "is a file, not a folder"),
        (eval_cli + ["--device", "gpu"], "unknown device 'gpu'"),
        (eval_cli + ["--predictions", str(a_folder)], "is a folder; give a file name"),
    ]
    for argv, message in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and message in err, (argv, err)
    assert a_file.read_text() == "keep me\n" and not any(tmp_path.glob("o?"))


def test_eval_refuses_an_index_built_with_another_encoder(tiny, index, qa_file, tmp_path, small_encoder_dir, capsys):
    with pytest.raises(EncoderMismatchError):
        from retro_peft.index import open_index
        open_index(index.path, encoder=str(small_encoder_dir))
    adapter = RetroPeftModel.create(tiny, config_for_method("lora")).save(tmp_path / "adapter", index=index)
    other = tiny_index(tmp_path / "other-idx", encoder=str(small_encoder_dir))
    assert main(["eval", "--model", str(tiny), "--adapter", str(adapter), "--index", str(other.path),
                 "--qa", str(qa_file)]) == 2
    assert "rebuild the index" in capsys.readouterr().err


def test_killed_training_process_resumes_to_the_same_adapter(tiny, index, qa_file, tmp_path, capsys):

    common = ["--model", str(tiny), "--index", str(index.path), "--qa", str(qa_file), "--k", "2",
              "--context-tokens", "220", "--steps", "60", "--batch-size", "1", "--lr", "1e-2",
              "--checkpoint-every", "5", "--no-progress"]
    killed = tmp_path / "killed"
    train_killed_at_first_checkpoint(common, killed)

    resume_equals_straight(main, capsys, common, killed, tmp_path / "straight")


def test_train_abstain_at_fits_the_head_saved_with_the_adapter(tiny, index, qa_file, tmp_path, capsys):
    out = tmp_path / "calibrated"
    common = ["--model", str(tiny), "--index", str(index.path), "--qa", str(qa_file)]
    assert main(["train", *common, "--out", str(out), "--steps", "2", "--batch-size", "2", "--k", "2",
                 "--context-tokens", "220", "--checkpoint-every", "0", "--no-progress",
                 "--abstain-at", "answer_rate=0.5", "--held-out", "0.5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    held = summary["answerability"]
    assert held["answer_rate"] == 0.5 and held["held_out"] >= 1 and held["answerable"] >= 1
    assert summary["examples"] == len(QA) - held["held_out"]  # the held-out questions are not trained on
    info = json.loads((out / "retro_config.json").read_text())
    assert info["answerability_sha256"] and (out / "answerability.json").is_file()
    assert info["adapter"]["retrieval"]["grounding"] == "auto" and info["adapter"]["retrieval"]["citations"] is True
    assert json.loads((out / "answerability.json").read_text())["layout"] == "full"
    # an adapter trained for the frozen KV cache is calibrated through it (a cache of the held-out prompts' chunks)
    assert main(["train", *common, "--out", str(tmp_path / "cached"), "--steps", "1", "--batch-size", "2", "--k", "2",
                 "--context-tokens", "220", "--checkpoint-every", "0", "--no-progress", "--block-attention",
                 "--abstain-at", "answer_rate=0.5", "--held-out", "0.5"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "cached" / "answerability.json").read_text())["layout"] == "block"

    # eval abstains by the head; "off" never does by the score; a broken head file is refused
    assert main(["eval", *common, "--adapter", str(out), "--abstain-at", "answer_rate=1.0", "--json",
                 "--predictions", str(tmp_path / "p.jsonl")]) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").open()]
    assert all(isinstance(r["answerability"], float) for r in rows)
    assert main(["eval", *common, "--abstain-at", "answer_rate=0.9"]) == 2
    assert "give --adapter" in capsys.readouterr().err
    (out / "answerability.json").write_text("{}")
    assert main(["eval", *common, "--adapter", str(out), "--limit", "1"]) == 2
    assert "does not match" in capsys.readouterr().err
    assert main(["train", *common, "--out", str(tmp_path / "x"), "--held-out", "0.5"]) == 2
    assert "--abstain-at" in capsys.readouterr().err


def test_calibrate_refits_the_head_in_the_layout_the_adapter_answers_in(tiny, index, qa_file, tmp_path, capsys, caplog):
    """`retro-peft calibrate`: an adapter calibrated for a full prefill gets a head fitted through its frozen KV
    cache, in a copy of its folder whose weights are byte for byte the adapter's; the copy answers through the
    cache without the layout warning."""
    from retro_peft.storage import sha256_file

    adapter, cached = tmp_path / "full", tmp_path / "cached"
    common = ["--index", str(index.path), "--qa", str(qa_file)]
    assert main(["train", "--model", str(tiny), *common, "--out", str(adapter), "--steps", "2", "--batch-size", "2",
                 "--k", "2", "--context-tokens", "220", "--checkpoint-every", "0", "--no-progress",
                 "--abstain-at", "answer_rate=0.5", "--held-out", "0.5"]) == 0
    capsys.readouterr()
    kv = tmp_path / "kv.safetensors"
    calibrate = ["calibrate", str(adapter), *common, "--abstain-at", "answer_rate=0.5", "--kv-cache", str(kv),
                 "--no-progress"]
    assert main([*calibrate, "--out", str(cached)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layout"] == "block" and summary["answer_rate"] == 0.5 and kv.is_file()
    head = json.loads((cached / "answerability.json").read_text())
    info = json.loads((cached / "retro_config.json").read_text())
    assert head["layout"] == "block" and info["calibration"]["questions"] == len(QA)
    assert info["answerability_sha256"] == sha256_file(cached / "answerability.json")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert sha256_file(cached / name) == sha256_file(adapter / name)
    assert json.loads((adapter / "answerability.json").read_text())["layout"] == "full"  # the adapter is untouched
    warned = {}
    for folder in (adapter, cached):
        caplog.clear()
        assert main(["eval", "--model", str(tiny), *common, "--adapter", str(folder), "--kv-cache", str(kv),
                     "--limit", "2", "--json"]) == 0
        capsys.readouterr()
        warned[folder.name] = "calibrated on prompts in the full layout and answers in the block" in caplog.text
    assert warned == {"full": True, "cached": False}
    # refused before the model is loaded: an existing folder, no rate, a layout without a cache
    for extra, message in ((["--out", str(cached)], "exists: choose another --out"),
                           (["--out", str(tmp_path / "x"), "--abstain-at", "off"], "give the answer rate"),
                           (["--out", str(tmp_path / "y"), "--kv-layout", "prefix", "--kv-cache", ""],
                            "needs --kv-cache FILE")):
        assert main([*calibrate, *extra]) == 2
        assert message in capsys.readouterr().err
    # in place, with --overwrite: the same folder, now with the head
    assert main([*calibrate, "--out", str(adapter), "--overwrite"]) == 0
    capsys.readouterr()
    assert json.loads((adapter / "answerability.json").read_text())["layout"] == "block"
