"""Soft tokens after each stored passage (`kvcache.soft`): trained by distillation on a frozen adapter, saved
with it, part of the frozen KV cache's fingerprint."""

import dataclasses
import json

import pytest
import torch
from helpers_adapters import Crash, crash_at, single_thread
from safetensors.torch import load_file

from retro_peft.adapters import RetrievalConfig, RetroPeftModel, config_for_method
from retro_peft.cli import main
from retro_peft.domains.bank import AdapterBank, DomainError
from retro_peft.errors import InputError
from retro_peft.kvcache import FrozenKVCache
from retro_peft.kvcache.soft import SOFT_TOKENS_FILE, SoftTokens, separator_ids
from retro_peft.qa import load_qa
from retro_peft.training import TrainConfig, build_examples, latest_checkpoint, train
from retro_peft.training.data import IGNORE

single_thread()

BLOCK = RetrievalConfig(k=3, distractors=1, oracle_fraction=0.5, context_tokens=300, block_attention=True)


@pytest.fixture(scope="module")
def items(qa_file):
    return load_qa(qa_file)


@pytest.fixture(scope="module")
def full_adapter(tmp_path_factory, tiny, items, index, tokenizer):
    """The recipe's start: a RetroLoRA trained with every passage in view, saved."""
    examples = build_examples(items, index, tokenizer, BLOCK)
    model = RetroPeftModel.create(tiny, config_for_method("lora", retrieval=BLOCK, steps=20), seed=0)
    train(model, [dataclasses.replace(ex, segments=()) for ex in examples],
          TrainConfig(steps=20, batch_size=4, lr=1e-2), progress=False)
    return model.save(tmp_path_factory.mktemp("soft") / "full")


def layout_gap(model, examples, pad_id, soft=None) -> float:
    """Mean KL(full prefill || frozen-cache layout, with `soft`) over the answer tokens, each full prefill run
    alone: what soft-token training should shrink, measured apart from the trainer's code."""
    from retro_peft.training.trainer import block_attention_forward

    with torch.no_grad():
        cached, targets = block_attention_forward(model.model, examples, pad_id, torch.device("cpu"), soft=soft)
        student = cached.logits[targets != IGNORE]
        teacher = []
        for ex in examples:
            logits = model.model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            teacher += [logits[i - 1] for i, label in enumerate(ex.labels) if i and label != IGNORE]
    return torch.nn.functional.kl_div(student.log_softmax(-1), torch.stack(teacher).log_softmax(-1),
                                      log_target=True, reduction="batchmean").item()


def test_soft_tokens_train_toward_the_full_prefill_on_a_frozen_adapter_and_save_with_it(
        full_adapter, items, index, tokenizer, tmp_path):
    examples = build_examples(items, index, tokenizer, BLOCK)
    pad = tokenizer.pad_token_id
    model = RetroPeftModel.load(full_adapter, is_trainable=True)
    model.model.eval()  # (dropout off: the gap is measured as answering runs)
    start = SoftTokens.initial(model.model, 4, separator_ids(tokenizer, BLOCK))
    before = layout_gap(model, examples, pad, start)
    weights = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    result = train(model, examples, TrainConfig(steps=30, batch_size=4, lr=5e-2, soft_tokens=4), out_dir=tmp_path / "a",
                   progress=False)
    assert result.trainable_params == 4 * model.model.get_input_embeddings().weight.shape[1]
    # the adapter is exactly as it was (and trainable again); the soft tokens, trained, bring the cached layout's
    # answers closer to the full prefill's than they started (measured 0.25 -> 0.15; whether they beat no soft
    # tokens at all is a real model's question, measured on SmolLM2 in BENCHMARKS.md: a random tiny Llama
    # attends to any extra token far more than a trained one)
    assert all(torch.equal(p, weights[n]) for n, p in model.model.named_parameters())
    assert any(p.requires_grad for p in model.model.parameters())
    model.model.eval()
    after = layout_gap(model, examples, pad, model.soft_tokens)
    assert after < 0.75 * before, (before, after)

    # saved with the adapter (checksummed) and loaded back bit for bit; a cache computed with the reloaded
    # tokens holds the very states of one computed with the trained ones
    saved = tmp_path / "a"
    info = json.loads((saved / "retro_config.json").read_text())
    assert info["soft_tokens_sha256"] and (saved / SOFT_TOKENS_FILE).is_file()
    again = RetroPeftModel.load(saved)
    assert torch.equal(again.soft_tokens.embeddings, model.soft_tokens.embeddings)
    assert again.soft_tokens.fingerprint() == model.soft_tokens.fingerprint()
    built = FrozenKVCache.build(again.model, tokenizer, index, BLOCK, soft=again.soft_tokens)
    reference = FrozenKVCache.build(model.model, tokenizer, index, BLOCK, soft=model.soft_tokens)
    assert torch.equal(built.keys, reference.keys) and built.spans == reference.spans
    path = built.save(tmp_path / "kv.safetensors")
    reloaded = FrozenKVCache.load(path, again.model, soft=SoftTokens.load(saved))
    assert torch.equal(reloaded.values, built.values)

    # a soft-token file changed after the save is refused; so are bad settings, before any step
    data = load_file(saved / SOFT_TOKENS_FILE)["embeddings"]
    SoftTokens(data + 1).save(saved)
    with pytest.raises(InputError, match="does not match retro_config.json"):
        RetroPeftModel.load(saved)
    with pytest.raises(InputError, match="needs block-attention examples"):
        train(model, [dataclasses.replace(ex, segments=()) for ex in examples], TrainConfig(steps=1, soft_tokens=2),
              progress=False)
    with pytest.raises(InputError, match="has 4 soft tokens per passage"):
        train(model, examples, TrainConfig(steps=1, soft_tokens=2), progress=False)
    for bad, message in ((dict(soft_tokens=-1), "soft_tokens is the number"), (dict(soft_tokens=65), "0 to 64"),
                         (dict(soft_tokens=2, distill=1.0), "one at a time")):
        with pytest.raises(InputError, match=message):
            TrainConfig(**bad).validate()


def test_a_cache_refuses_other_soft_tokens_and_the_layouts_that_cannot_hold_them(full_adapter, index, tokenizer,
                                                                                  tmp_path):
    model = RetroPeftModel.load(full_adapter)
    mine = SoftTokens.initial(model.model, 2, separator_ids(tokenizer, BLOCK))
    other = SoftTokens.initial(model.model, 2, [5, 6])
    path = FrozenKVCache.build(model.model, tokenizer, index, BLOCK, soft=mine).save(tmp_path / "soft.kv")
    plain = FrozenKVCache.build(model.model, tokenizer, index, BLOCK).save(tmp_path / "plain.kv")
    for file, soft, message in ((path, None, "with soft tokens the domain does not have"),
                                (path, other, "with other soft tokens than the domain's"),
                                (plain, mine, "without the domain's soft tokens")):
        with pytest.raises(InputError, match=message):
            FrozenKVCache.load(file, model.model, soft=soft)
    cache = FrozenKVCache.load(path, model.model, soft=mine)
    for layout in ("prefix", "blend", "deviation"):
        with pytest.raises(InputError, match="block layout only"):
            cache.with_layout(layout)
        with pytest.raises(InputError, match="block layout only"):
            FrozenKVCache.load(path, model.model, soft=mine, layout=layout)
    wide = SoftTokens(torch.zeros(2, 7))
    with pytest.raises(InputError, match="trained for another model"):
        FrozenKVCache.build(model.model, tokenizer, index, BLOCK, soft=wide)
    with pytest.raises(InputError, match="non-finite"):
        SoftTokens(torch.full((2, 7), float("nan")))


def test_resumed_soft_token_training_ends_with_the_uninterrupted_runs_tokens(full_adapter, items, index, tokenizer,
                                                                             tmp_path):
    examples = build_examples(items, index, tokenizer, BLOCK)
    config = TrainConfig(steps=5, batch_size=3, lr=5e-2, soft_tokens=2, checkpoint_every=2, log_every=1)
    train(RetroPeftModel.load(full_adapter, is_trainable=True), examples, config, out_dir=tmp_path / "straight",
          progress=False)

    with pytest.raises(Crash):
        train(RetroPeftModel.load(full_adapter, is_trainable=True), examples, config, out_dir=tmp_path / "crashed",
              on_step=crash_at(3), progress=False)
    assert latest_checkpoint(tmp_path / "crashed").name == "step-000002"
    resumed = train(RetroPeftModel.load(full_adapter, is_trainable=True), examples, config,
                    out_dir=tmp_path / "crashed", resume=True, progress=False)
    assert resumed.resumed_from == 2
    a, b = (load_file(tmp_path / run / SOFT_TOKENS_FILE)["embeddings"] for run in ("straight", "crashed"))
    assert torch.equal(a, b)


def test_the_cli_trains_soft_tokens_and_a_domain_answers_through_its_cache_with_them(
        full_adapter, index, qa_file, tokenizer, tmp_path, capsys):
    out = tmp_path / "soft"
    args = ["train", "--index", str(index.path), "--qa", str(qa_file), "--from-adapter", str(full_adapter),
            "--steps", "3", "--batch-size", "2", "--no-progress"]
    for extra, message in ((["--soft-tokens", "2"], "add --block-attention"),
                           (["--soft-tokens", "0", "--block-attention"], "at least 1 soft token"),
                           (["--soft-tokens", "2", "--block-attention", "--from-adapter", ""], "--from-adapter DIR"),
                           (["--soft-tokens", "2", "--block-attention", "--distill", "1"], "one at a time")):
        assert main([*args, *extra, "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main([*args, "--block-attention", "--soft-tokens", "2", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["soft_tokens"] == 2
    trained = RetroPeftModel.load(out)
    assert trained.soft_tokens.count == 2

    bank = AdapterBank(str(RetroPeftModel.load(full_adapter).info["base_model"]["name"]), max_new_tokens=4)
    domain = bank.load("soft", index, out, kv_cache=tmp_path / "soft.kv")  # built with the adapter's soft tokens
    cache = FrozenKVCache.load(tmp_path / "soft.kv", trained.model, soft=trained.soft_tokens)
    assert domain.generator.kv_cache.meta["soft_tokens"] == trained.soft_tokens.fingerprint()
    question = "Where does the Rhine flow?"
    want = trained.generator(index, kv_cache=cache, max_new_tokens=4).answer_many([question])[0]
    assert bank.answer(question, "soft").text == want.text
    # a cache file built without them is refused: that domain fails alone
    FrozenKVCache.build(trained.model, tokenizer, index, trained.config.retrieval).save(tmp_path / "plain.kv")
    with pytest.raises(DomainError, match="domain 'other'.*without the domain's soft tokens"):
        bank.load("other", index, out, kv_cache=tmp_path / "plain.kv")
    assert "other" not in bank.domains and bank.answer(question, "soft").text == want.text
