"""`retro-peft export --merge` (the adapter merged into the base, a plain Hugging Face folder) and saved adapter
folders against the constraints vLLM documents for LoRA adapters (multi-LoRA serving, docs/scale-out.md)."""

import json
from pathlib import Path

import pytest
import torch
from helpers_adapters import QA, single_thread
from safetensors import safe_open

from retro_peft.adapters import RetrievalConfig, RetroPeftModel, config_for_method
from retro_peft.adapters.export import EXPORT_RECORD, ExportConfig, export_merged
from retro_peft.cli import main
from retro_peft.errors import InputError
from retro_peft.generation import Generator

single_thread()

RETRIEVAL = RetrievalConfig(k=2, distractors=0, context_tokens=220)


def _adapter(tiny, index, folder: Path, method: str = "lora") -> Path:
    """A saved adapter whose weights move the outputs (peft's random init of both LoRA matrices, not B = 0)."""
    config = config_for_method(method, retrieval=RETRIEVAL)
    if method == "lora":
        config.peft.init_lora_weights = False
    return RetroPeftModel.create(tiny, config, seed=0).save(folder, index=index)


def test_merged_model_answers_exactly_as_base_plus_adapter(tiny, index, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = _adapter(tiny, index, tmp_path / "adapter")
    record = export_merged(adapter, ExportConfig(out=tmp_path / "merged"))
    merged_dir = Path(record["out"])
    assert {p.name for p in merged_dir.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                      EXPORT_RECORD}
    assert not (merged_dir / "adapter_config.json").exists()  # a model, not an adapter
    assert json.loads((merged_dir / EXPORT_RECORD).read_text())["retrieval"]["k"] == 2

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)  # plain transformers
    with_adapter = RetroPeftModel.load(adapter, dtype=torch.float32, device="cpu")
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    batch = tokenizer(["Who invented the piano? Answer:", "Into which sea does the Rhine flow?"], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        expected = with_adapter.model(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-4, atol=1e-4)
        assert (base(**batch).logits - expected).abs().max() > 0.1  # the adapter matters: merging it is tested
    questions = [q["question"] for q in QA]
    mine = Generator(merged, tokenizer, index=index, retrieval=RETRIEVAL, max_new_tokens=12).answer_many(questions)
    theirs = with_adapter.generator(index, max_new_tokens=12).answer_many(questions)
    assert [a.text for a in mine] == [a.text for a in theirs]
    assert any(a.text.strip() for a in mine)


def test_export_cli_never_overwrites_without_overwrite_and_replaces_atomically(tiny, index, tmp_path, capsys):
    adapter = _adapter(tiny, index, tmp_path / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(adapter), "--merge", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["export", str(adapter), "--out", str(tmp_path / "other")]) == 2  # --merge is the one export
    assert "pass --merge" in capsys.readouterr().err and not (tmp_path / "other").exists()
    assert main(["export", str(tmp_path / "no-adapter"), "--merge", "--out", str(tmp_path / "x")]) == 2
    assert "adapter folder not found" in capsys.readouterr().err

    assert main(["export", str(adapter), "--merge", "--out", str(out), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "bfloat16"
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]  # no temporary folder left behind
    with pytest.raises(InputError, match="unknown export dtype"):
        ExportConfig(out=tmp_path / "y", dtype="int8").validate()


# -- vLLM's LoRA constraints ------------------------------------------------------------------------------------
# From vLLM's source (github.com/vllm-project/vllm):
#   vllm/lora/peft_helper.py  PEFTHelper: adapter_config.json needs r, lora_alpha, target_modules;
#                             "vLLM only supports modules_to_save being None."; "vLLM does not yet support DoRA.";
#                             validate_legal: r <= max_lora_rank, bias != "none" refused unless bias is enabled
#   vllm/config/lora.py       MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] (--max-lora-rank)
#   vllm/lora/lora_model.py   LoRAModel.from_local_checkpoint reads adapter_model.safetensors (else .bin/.pt) and
#                             refuses a tensor whose module's last name is not one of the model's LoRA modules
#                             (for Llama its linear projections, q/k/v/o_proj and gate/up/down_proj)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def vllm_lora_problems(folder: Path, base_model) -> list[str]:
    """What would keep vLLM from serving the adapter in `folder` with --enable-lora (empty: nothing)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')} (vLLM serves LoRA adapters only)")
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in config]
    if missing:
        problems.append(f"adapter_config.json lacks {missing}")
    if not 1 <= config.get("r", 0) <= max(VLLM_MAX_LORA_RANKS):
        problems.append(f"rank {config.get('r')} outside vLLM's --max-lora-rank choices")
    if config.get("modules_to_save"):
        problems.append("modules_to_save is set")
    if config.get("use_dora"):
        problems.append("DoRA")
    if config.get("bias", "none") != "none":
        problems.append(f"bias {config['bias']!r}")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return [*problems, "no adapter_model.safetensors"]
    linear = {name for name, module in base_model.named_modules() if isinstance(module, torch.nn.Linear)}
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            if module.rsplit(".", 1)[-1] not in LLAMA_LORA_MODULES or module not in linear:
                problems.append(f"tensor {key} is not on one of the decoder's linear projections")
    return problems


def test_saved_lora_adapters_meet_vllms_constraints(tiny, index, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny)
    lora = _adapter(tiny, index, tmp_path / "lora")
    assert vllm_lora_problems(lora, base) == []
    rank = json.loads((lora / "adapter_config.json").read_text())["r"]
    assert min(r for r in VLLM_MAX_LORA_RANKS if r >= rank) == 16  # serve with --max-lora-rank 16
    # the check can fail: IA3 is not LoRA, and an adapter that saves whole modules is refused by vLLM
    ia3 = _adapter(tiny, index, tmp_path / "ia3", method="ia3")
    assert any("peft_type IA3" in p for p in vllm_lora_problems(ia3, base))
    config = config_for_method("lora", retrieval=RETRIEVAL)
    config.peft.modules_to_save = ["lm_head"]
    saving = RetroPeftModel.create(tiny, config).save(tmp_path / "saving", index=index)
    problems = vllm_lora_problems(saving, base)
    assert "modules_to_save is set" in problems and any("lm_head" in p for p in problems)
