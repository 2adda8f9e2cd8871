"""Adapters: configs, save/load as a standard PEFT folder, base-model and target-module checks."""

import json

import pytest
import torch
from helpers_adapters import single_thread, smollm2_tokenizer, tiny_llama_folder

from retro_peft.adapters import (
    AdapterMismatchError,
    RetrievalConfig,
    RetroAdaLoraConfig,
    RetroAdapterConfig,
    RetroIA3Config,
    RetroLoraConfig,
    RetroPeftModel,
    adalora_schedule,
    config_for_method,
)
from retro_peft.errors import InputError

single_thread()


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny") / "llama", tokenizer)


def _probe(tokenizer):
    ids = tokenizer("Passages: [1] The Rhine flows into the North Sea.\nQuestion: Where does the Rhine flow?",
                    return_tensors="pt")
    return ids["input_ids"], ids["attention_mask"]


def _train_a_little(model, steps=3):
    """Move the adapter off its initial values (LoRA's B starts at zero) so reloads are a real check."""
    ids, mask = _probe(model.tokenizer)
    opt = torch.optim.AdamW([p for p in model.model.parameters() if p.requires_grad], lr=5e-2)
    model.model.train()
    for _ in range(steps):
        model.model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.model.eval()


@pytest.mark.parametrize("cls", [RetroLoraConfig, RetroAdaLoraConfig, RetroIA3Config])
def test_config_json_round_trip(cls):
    cfg = cls(retrieval=RetrievalConfig(k=4, distractors=2, oracle_fraction=0.6, context_tokens=512))
    back = RetroAdapterConfig.from_dict(json.loads(cfg.to_json()))
    assert type(back) is cls
    assert back.retrieval == cfg.retrieval
    assert back.target_modules() == cfg.target_modules()
    assert type(back.peft) is type(cfg.peft)


@pytest.mark.parametrize("bad", [dict(k=-1), dict(oracle_fraction=1.5), dict(template="jinja"),
                                 dict(context_tokens=8), dict(abstention="  "), dict(mode="fuzzy")])
def test_bad_retrieval_settings_are_input_errors(bad):
    with pytest.raises(InputError):
        RetrievalConfig(**bad)


def test_unknown_method_is_an_input_error():
    with pytest.raises(InputError, match="unknown adapter method"):
        config_for_method("prefix")


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 1000])
def test_adalora_schedule_is_valid_for_any_length(steps):
    cfg = config_for_method("adalora", steps=steps)  # peft itself validates tinit < total_step - tfinal
    assert cfg.peft.total_step == steps == adalora_schedule(steps)["total_step"]


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3"])
def test_saved_adapter_is_a_standard_peft_folder_and_reloads_exactly(tiny, tokenizer, tmp_path, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = RetroPeftModel.create(tiny, config_for_method(method, steps=10))
    _train_a_little(model)
    ids, mask = _probe(tokenizer)
    with torch.inference_mode():
        expected = model.model(input_ids=ids, attention_mask=mask).logits
        with model.model.disable_adapter():
            base_logits = model.model(input_ids=ids, attention_mask=mask).logits
    out = model.save(tmp_path / "adapter", training_data_sha256="ab" * 32)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "retro_config.json"]
    info = json.loads((out / "retro_config.json").read_text())
    assert info["method"] == method and info["base_model"]["name"] == str(tiny)
    assert info["training_data_sha256"] == "ab" * 32 and info["template"] == "chat"

    reloaded = RetroPeftModel.load(out)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), out)
    with torch.inference_mode():
        got = reloaded.model(input_ids=ids, attention_mask=mask).logits
        got_plain = plain.eval()(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, expected)
    assert torch.equal(got_plain, expected)
    assert not torch.allclose(expected, base_logits)  # the trained adapter does change the model
    assert reloaded.config.retrieval == model.config.retrieval


def test_missing_target_module_fails_before_training(tiny):
    cfg = RetroLoraConfig()
    cfg.peft.target_modules = ["q_proj", "c_attn"]  # GPT-2's name, not Llama's
    with pytest.raises(InputError, match="c_attn"):
        RetroPeftModel.create(tiny, cfg)


def test_adapter_on_another_base_model_is_refused(tiny, tokenizer, tmp_path):
    out = RetroPeftModel.create(tiny, RetroLoraConfig()).save(tmp_path / "adapter")
    same_arch_other_weights = tiny_llama_folder(tmp_path / "other", tokenizer, seed=1)
    with pytest.raises(AdapterMismatchError, match="different weights"):
        RetroPeftModel.load(out, base_model=str(same_arch_other_weights))
    with pytest.raises(AdapterMismatchError, match="architecture"):
        RetroPeftModel.load(out, base_model="smollm2-135m")


def test_an_overwrite_is_all_or_nothing_and_keeps_the_checkpoints(tiny, tokenizer, tmp_path, monkeypatch):
    import retro_peft.adapters.model as adapter_model

    out = RetroPeftModel.create(tiny, RetroLoraConfig(), seed=1).save(tmp_path / "adapter")
    (out / "checkpoints" / "step-000002").mkdir(parents=True)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    second = RetroPeftModel.create(tiny, RetroLoraConfig(), seed=2)
    _train_a_little(second)

    def die(*_a, **_k):  # the process dies just before the new folder would be swapped in
        raise KeyboardInterrupt
    monkeypatch.setattr(adapter_model, "replace_folder", die)
    with pytest.raises(KeyboardInterrupt):
        second.save(out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no half-written folder left behind

    second.save(out)
    assert (out / "checkpoints" / "step-000002").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    # written whole but not private: readable as any file the process makes (umask 022 here: 755 / 644)
    import os
    umask = os.umask(0o022)
    os.umask(umask)
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~umask)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir() if p.is_file()} == {oct(0o666 & ~umask)}
    ids, mask = _probe(tokenizer)
    with torch.inference_mode():
        assert torch.equal(RetroPeftModel.load(out).model(input_ids=ids, attention_mask=mask).logits,
                           second.model(input_ids=ids, attention_mask=mask).logits)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 999}))  # a config from elsewhere
    with pytest.raises(InputError, match="adapter_config.json does not match"):
        RetroPeftModel.load(out)


def test_damaged_or_foreign_adapter_folders_are_input_errors(tiny, tmp_path):
    out = RetroPeftModel.create(tiny, RetroLoraConfig()).save(tmp_path / "adapter")
    model = RetroPeftModel.create(tiny, RetroLoraConfig(), seed=5)  # other (random) lora_A, same shapes
    model.model.save_pretrained(tmp_path / "other")
    (out / "adapter_model.safetensors").write_bytes((tmp_path / "other" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(InputError, match="does not match"):
        RetroPeftModel.load(out)
    with pytest.raises(InputError, match="without retro_config.json"):
        RetroPeftModel.load(tmp_path / "other")
    with pytest.raises(InputError, match="not found"):
        RetroPeftModel.load(tmp_path / "nowhere")
