"""QLoRA and quantized answering (--quantize 4bit|8bit): real bitsandbytes (its CPU path) on a tiny random Llama.

The adapter trained on a quantized base is a plain PEFT folder that loads on the full-precision base and on the
quantized one; a killed quantized run resumes to the same adapter; the refusals come before any loading.
"""

import dataclasses
import json
import sys

import pytest
import torch
from helpers_adapters import resume_equals_straight, single_thread, smollm2_tokenizer, train_killed_at_first_checkpoint
from safetensors.torch import load_file

from retro_peft.adapters import RetrievalConfig, RetroPeftModel, config_for_method
from retro_peft.base_model import load_base_model, quantized
from retro_peft.cli import main
from retro_peft.errors import InputError
from retro_peft.qa import load_qa
from retro_peft.training import TrainConfig, build_examples, train

pytest.importorskip("bitsandbytes", reason="the quantize extra: pip install 'retro-peft[quantize]'")
single_thread()

RETRIEVAL = RetrievalConfig(k=2, distractors=1, oracle_fraction=0.5, context_tokens=220)


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """A 2-layer random Llama 64 wide: bitsandbytes' CPU kernels take 4-bit blocks of 64 inputs (32 is too narrow
    for its inference path). initializer_range 0.2: outputs far enough from uniform that an adapter moves them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, initializer_range=0.2, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=1)
    path = tmp_path_factory.mktemp("tiny") / "llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _inputs(tokenizer):
    return tokenizer(["Who invented the piano?", "Into which sea does the Rhine flow? It flows"], return_tensors="pt",
                     padding=True)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_qlora_adapter_is_a_plain_peft_folder_that_loads_on_either_base(mode, tiny, index, qa_file, tokenizer,
                                                                        tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = RetroPeftModel.create(tiny, config_for_method("lora", retrieval=RETRIEVAL), quantize=mode, device="cpu")
    assert quantized(model.model) == mode
    assert all(not p.requires_grad for n, p in model.model.named_parameters() if "lora_" not in n)
    examples = build_examples(load_qa(qa_file), index, model.tokenizer, RETRIEVAL, seed=0)
    result = train(model, examples, TrainConfig(steps=6, batch_size=2, lr=1e-2, log_every=1, quantize=mode),
                   out_dir=tmp_path / "adapter", index=index, progress=False)
    assert result.losses[-1][1] < result.losses[0][1]
    out = tmp_path / "adapter"
    assert json.loads((out / "retro_config.json").read_text())["training"]["config"]["quantize"] == mode
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())  # the adapter is in full precision
    batch = _inputs(tokenizer)
    trained = _logits(model.model, batch)

    # plain PEFT, on the full-precision base: loads, and the adapter moves the outputs
    full = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    before = _logits(full, batch)
    on_full = PeftModel.from_pretrained(full, out)
    assert (_logits(on_full, batch) - before).abs().max() > 1e-2
    # plain PEFT, on a quantized base loaded by transformers itself: the trained model's outputs
    from retro_peft.base_model import quantization_config

    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32, device_map={"": "cpu"},
                                                quantization_config=quantization_config(mode))
    on_quantized = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(_logits(on_quantized, batch), trained, rtol=1e-3, atol=1e-3)
    # and retro-peft's own loading, quantized, for answering
    assert main(["eval", "--model", str(tiny), "--adapter", str(out), "--index", str(index.path), "--qa",
                 str(qa_file), "--limit", "2", "--quantize", mode, "--max-new-tokens", "4", "--json"]) == 0


def test_answering_from_a_quantized_bank_matches_the_quantized_adapter(tiny, index, tmp_path):
    from retro_peft.domains.bank import AdapterBank

    adapter = RetroPeftModel.create(tiny, config_for_method("lora", retrieval=RETRIEVAL)).save(tmp_path / "a",
                                                                                            index=index)
    bank = AdapterBank(str(tiny), quantize="4bit", device="cpu", max_new_tokens=6)
    assert quantized(bank.model) == "4bit"
    bank.load("d", index, adapter)
    direct = RetroPeftModel.load(adapter, base_model=str(tiny), quantize="4bit", device="cpu")
    question = "Who invented the piano?"
    assert bank.answer(question, "d").text == direct.generator(index, max_new_tokens=6).answer(question).text
    # the answers cache keys tell a quantized bank's answers from a full-precision one's
    assert bank.domains["d"].version != AdapterBank(str(tiny), device="cpu").load("d", index, adapter).version


def test_quantize_is_refused_before_loading_without_bitsandbytes(tiny, index, qa_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed: importing it fails
    common = ["--index", str(index.path), "--qa", str(qa_file), "--quantize", "4bit"]
    missing_model = str(tmp_path / "no-such-model")  # loading it would fail with another message
    for argv in (["train", "--model", missing_model, "--out", str(tmp_path / "o"), *common],
                 ["eval", "--model", missing_model, *common],
                 ["gptq", missing_model, "--calibration", str(qa_file), "--out", str(tmp_path / "g")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "needs the bitsandbytes package" in err and "pip install 'retro-peft[quantize]'" in err, err
    assert main(["ask", "what?", "--index", str(index.path), "--quantize", "8bit"]) == 2
    assert "pip install" in capsys.readouterr().err
    from retro_peft.serving.settings import load_settings

    with pytest.raises(InputError, match="needs the bitsandbytes package"):
        load_settings(quantize="4bit")
    with pytest.raises(InputError, match="needs the bitsandbytes package"):
        TrainConfig(quantize="4bit").validate()


def test_models_bitsandbytes_cannot_quantize_and_mismatched_configs_are_refused(tiny, index, qa_file, tmp_path):
    already = tmp_path / "already-4bit"
    model, tok, _ = load_base_model(str(tiny), quantize="4bit", device="cpu")
    model.save_pretrained(already)  # a bitsandbytes-quantized folder: its config carries the quantization
    tok.save_pretrained(already)
    with pytest.raises(InputError, match=r"already quantized \(bitsandbytes\)"):
        load_base_model(str(already), quantize="8bit")
    with pytest.raises(InputError, match="unknown quantization"):
        load_base_model(str(tiny), quantize="3bit")
    # a loaded full-precision model cannot be quantized afterwards; the trainer checks the config against the model
    full, tokenizer, _ = load_base_model(str(tiny))
    with pytest.raises(InputError, match="applies when the base model is loaded"):
        RetroPeftModel.create(full, config_for_method("lora"), tokenizer=tokenizer, quantize="4bit")
    plain = RetroPeftModel.create(full, config_for_method("lora", retrieval=RETRIEVAL), tokenizer=tokenizer)
    examples = build_examples(load_qa(qa_file), index, tokenizer, RETRIEVAL, seed=0)
    with pytest.raises(InputError, match="not quantized"):
        train(plain, examples, TrainConfig(steps=1, quantize="4bit"), progress=False)
    four = RetroPeftModel.create(tiny, config_for_method("lora", retrieval=RETRIEVAL), quantize="4bit", device="cpu")
    with pytest.raises(InputError, match="quantized to 4bit"):
        train(four, examples, TrainConfig(steps=1), progress=False)


@pytest.mark.parametrize("checkpointing", [[], ["selective"]], ids=["every-layer", "selective"])
def test_killed_quantized_training_process_resumes_to_the_same_adapter(tiny, index, qa_file, tmp_path, capsys,
                                                                       checkpointing):
    common = ["--model", str(tiny), "--index", str(index.path), "--qa", str(qa_file), "--k", "2",
              "--context-tokens", "220", "--steps", "40", "--batch-size", "1", "--lr", "1e-2",
              "--checkpoint-every", "5", "--quantize", "4bit", "--gradient-checkpointing", *checkpointing,
              "--device", "cpu", "--no-progress"]
    killed = tmp_path / "killed"
    train_killed_at_first_checkpoint(common, killed)

    # the checkpoint records the quantization: resuming on a full-precision base is refused
    full = [a for a in common if a not in ("--quantize", "4bit")]
    assert main(["train", *full, "--out", str(killed), "--resume"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    resume_equals_straight(main, capsys, common, killed, tmp_path / "straight")
    with pytest.raises(SystemExit):  # a value that is neither a fraction nor 'selective': argparse says which
        main(["train", *common, "--gradient-checkpointing", "most", "--out", str(tmp_path / "x")])
    assert "'selective'" in capsys.readouterr().err


def test_selective_checkpointing_keeps_the_4bit_products_and_gives_the_same_gradients(tiny, monkeypatch):
    # --gradient-checkpointing selective on a 4-bit base: bitsandbytes' fused 4-bit product is among the outputs
    # kept (the threshold lowered to this model's 64 inputs, above LoRA's rank 16), and the adapter's gradients
    # are those of keeping every activation.
    from retro_peft.training import trainer as trainer_module

    def gradients(selective: bool) -> dict:
        model = RetroPeftModel.create(tiny, config_for_method("lora"), quantize="4bit", device="cpu", seed=0).model
        model.train()
        undo = trainer_module.checkpoint_layers(model, selective=True) if selective else (lambda: None)
        torch.manual_seed(0)  # dropout: the recomputation replays these draws
        ids = torch.randint(100, 1000, (2, 24))
        model(input_ids=ids, labels=ids).loss.backward()
        undo()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    decisions = []
    policy = trainer_module._keep_expensive

    def spy(ctx, op, *args, **kwargs):
        decisions.append((str(op), policy(ctx, op, *args, **kwargs)))
        return decisions[-1][1]
    monkeypatch.setattr(trainer_module, "_keep_expensive", spy)
    monkeypatch.setattr(trainer_module, "SELECTIVE_MIN_REDUCTION", 64)
    plain, selective = gradients(False), gradients(True)
    products = {d.name for op, d in decisions if op.startswith("bitsandbytes.gemm")}
    assert products == {"MUST_SAVE"}
    assert plain.keys() == selective.keys() and all(torch.allclose(plain[n], selective[n], atol=1e-6) for n in plain)


# -- --quantize-skip: linear layers kept unquantized ("QLoRA with mixed precision") --------------------------------

def _linears(model) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if n.endswith(("_proj", "lm_head"))}


def test_quantize_skip_keeps_the_named_layers_in_the_load_dtype(tiny):
    import bitsandbytes as bnb

    from retro_peft.adapters.model import _prepare_quantized
    from retro_peft.base_model import quantize_skipped, quantize_skipped_linears

    model, _, _ = load_base_model(str(tiny), quantize="4bit", quantize_skip=("down_proj",), device="cpu",
                                  dtype=torch.bfloat16)
    layers = _linears(model)
    kept = {n for n in layers if n.endswith(".down_proj")}
    assert len(kept) == 2 and all(layers[n] is torch.nn.Linear for n in kept)
    assert all(model.get_submodule(n).weight.dtype == torch.bfloat16 for n in kept)
    assert all(layers[n] is bnb.nn.Linear4bit for n in layers if n not in kept and n != "lm_head")
    assert layers["lm_head"] is torch.nn.Linear  # the output head stays unquantized, as without a skip list
    assert quantized(model) == "4bit" and quantize_skipped(model) == ("down_proj",)
    assert set(quantize_skipped_linears(model)) == kept
    logits = _logits(model, {"input_ids": torch.tensor([[1, 400, 500, 600]])})
    assert torch.isfinite(logits).all()
    # training's preparation (peft's recipe casts half-precision weights to float32): the kept layers stay in bf16
    # where asked (on CUDA, under bf16 autocast), upcast on the CPU (its loop computes in float32, no autocast)
    _prepare_quantized(model, keep_skipped_dtype=True)
    assert all(model.get_submodule(n).weight.dtype == torch.bfloat16 for n in kept)
    assert all(not p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32  # the rest of the recipe as before
    _prepare_quantized(model)
    assert all(model.get_submodule(n).weight.dtype == torch.float32 for n in kept)
    # 8-bit too, with a dotted suffix; whole components only ("self_attn.v_proj", not "_proj" or "attn.v_proj")
    eight, _, _ = load_base_model(str(tiny), quantize="8bit", quantize_skip=("self_attn.v_proj",), device="cpu")
    assert {n for n, t in _linears(eight).items() if t is torch.nn.Linear} == {
        "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj", "lm_head"}
    for partial in ("_proj", "attn.v_proj"):
        with pytest.raises(InputError, match="no linear layer"):
            load_base_model(str(tiny), quantize="8bit", quantize_skip=(partial,), device="cpu")


def test_quantize_skip_names_are_checked_before_the_weights_are_read(tiny, monkeypatch):
    from transformers import AutoModelForCausalLM

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were read")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(InputError, match=r"'nope_proj' names no linear layer") as e:
        load_base_model(str(tiny), quantize="4bit", quantize_skip=("down_proj", "nope_proj"), device="cpu")
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in str(e.value)
    with pytest.raises(InputError, match="--quantize-skip needs --quantize"):
        load_base_model(str(tiny), quantize_skip=("down_proj",))
    with pytest.raises(InputError, match="needs --quantize"):
        RetroPeftModel.create(tiny, config_for_method("lora"), quantize_skip=("down_proj",))
    with pytest.raises(InputError, match="needs --quantize"):
        TrainConfig(quantize_skip=("down_proj",))
    config = TrainConfig(quantize="4bit", quantize_skip=["down_proj", "v_proj", "down_proj"])
    assert config.quantize_skip == ("down_proj", "v_proj")
    config.quantize = None  # changed after construction: validate() checks again
    with pytest.raises(InputError, match="needs --quantize"):
        config.validate()
    from retro_peft.serving.settings import load_settings

    with pytest.raises(InputError, match="needs --quantize"):
        load_settings(quantize_skip=["down_proj"])
    assert load_settings(quantize="4bit", quantize_skip=["down_proj", " v_proj"]).quantize_skip == ["down_proj",
                                                                                                    "v_proj"]


def test_quantize_skip_on_the_command_line(index, qa_file, capsys):
    from retro_peft.cli import build_parser

    args = build_parser().parse_args(["ask", "what?", "--quantize", "4bit", "--quantize-skip", "down_proj, v_proj"])
    assert args.quantize_skip == ("down_proj", "v_proj")
    assert build_parser().parse_args(["ask", "what?"]).quantize_skip is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ask", "what?", "--quantize-skip", ","])
    assert "down_proj,v_proj" in capsys.readouterr().err
    assert main(["eval", "--index", str(index.path), "--qa", str(qa_file), "--quantize-skip", "down_proj"]) == 2
    assert "--quantize-skip needs --quantize" in capsys.readouterr().err


def test_adapter_trained_on_a_mixed_base_loads_on_the_full_and_the_mixed_base(tiny, index, qa_file, tokenizer,
                                                                               tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from retro_peft.base_model import quantization_config
    from retro_peft.domains.bank import AdapterBank

    skip = ("down_proj",)
    model = RetroPeftModel.create(tiny, config_for_method("lora", retrieval=RETRIEVAL), quantize="4bit",
                                  quantize_skip=skip, device="cpu")
    examples = build_examples(load_qa(qa_file), index, model.tokenizer, RETRIEVAL, seed=0)
    with pytest.raises(InputError, match="quantize_skip"):  # the trainer checks the config against the model
        train(model, examples, TrainConfig(steps=1, quantize="4bit"), progress=False)
    out = tmp_path / "adapter"
    config = TrainConfig(steps=2, batch_size=2, lr=1e-2, checkpoint_every=1, quantize="4bit", quantize_skip=skip)
    train(model, examples, config, out_dir=out, index=index, progress=False)
    assert json.loads((out / "retro_config.json").read_text())["training"]["config"]["quantize_skip"] == ["down_proj"]
    batch = _inputs(tokenizer)
    trained = _logits(model.model, batch)

    full = RetroPeftModel.load(out, base_model=str(tiny))
    assert quantized(full.model) is None
    mixed = RetroPeftModel.load(out, base_model=str(tiny), quantize="4bit", quantize_skip=skip, device="cpu")
    torch.testing.assert_close(_logits(mixed.model, batch), trained, rtol=1e-3, atol=1e-3)
    # plain PEFT on the mixed base loaded by transformers itself, with this library's quantization config
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32, device_map={"": "cpu"},
                                                quantization_config=quantization_config("4bit", skip, config=tiny))
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(base, out), batch), trained, rtol=1e-3, atol=1e-3)

    # the checkpoint records the skips: resuming on a base quantized without them is refused
    four = RetroPeftModel.create(tiny, config_for_method("lora", retrieval=RETRIEVAL), quantize="4bit", device="cpu")
    with pytest.raises(InputError, match=r"cannot resume .*kept unquantized"):
        train(four, examples, dataclasses.replace(config, quantize_skip=()), out_dir=out, resume=True,
              progress=False)
    # a bank's answers cache keys tell a mixed base's answers from a fully quantized one's
    versions = [AdapterBank(str(tiny), quantize="4bit", quantize_skip=s, device="cpu").load("d", index, out).version
                for s in ((), skip)]
    assert versions[0] != versions[1]


# -- retro-peft gptq: a base rounded onto the 4-bit grid by GPTQ, loaded with --quantize 4bit ---------------------

def test_gptq_rounds_onto_the_grid_bitsandbytes_stores_with_less_output_error():
    import bitsandbytes.functional as F

    from retro_peft.gptq import gptq_nf4, nf4_levels, round_to_nearest

    torch.manual_seed(0)
    weight = torch.randn(48, 192)
    inputs = torch.randn(2000, 192) @ torch.randn(192, 192) * 0.3 + torch.randn(192)  # correlated, off-centre
    hessian = inputs.T @ inputs
    levels = nf4_levels()
    rounded = gptq_nf4(weight, hessian, levels)
    packed, state = F.quantize_4bit(rounded, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(F.dequantize_4bit(packed, state), rounded)  # bitsandbytes stores exactly these values
    nearest = round_to_nearest(weight, levels)
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.allclose(F.dequantize_4bit(packed, state), nearest, atol=1e-6)  # plain rounding is bitsandbytes'

    def output_error(rounding):
        return float((((weight - rounding) @ hessian) * (weight - rounding)).sum())
    assert output_error(rounded) < 0.8 * output_error(nearest)  # the outputs on such inputs move less...
    assert (weight - rounded).pow(2).sum() > (weight - nearest).pow(2).sum()  # ...though the weights move more


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gptq_folder_loads_as_4bit_onto_its_rounded_weights(dtype, tiny, tmp_path, capsys, caplog):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from retro_peft.base_model import ROUNDING_RECORD

    calibration = tmp_path / "calibration.txt"
    calibration.write_text(" ".join(f"The Rhine flows {i} kilometres into the North Sea near Rotterdam."
                                    for i in range(40)))
    out = tmp_path / "rounded"
    command = ["gptq", str(tiny), "--calibration", str(calibration), "--samples", "4", "--tokens", "32",
               "--dtype", dtype]
    assert main([*command, "--out", str(out), "--quantize-skip", "v_proj"]) == 0
    record = json.loads((out / ROUNDING_RECORD).read_text())
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    assert record["rounded_layers"] == 2 * 6 and record["quantize_skip"] == ["v_proj"]
    assert record["calibration"]["windows"] == 4 and record["nearest_rounding"] == []
    assert set(record["error_vs_nearest"]) == {"q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(0 < ratio < 1 for ratio in record["error_vs_nearest"].values())

    original = load_base_model(str(tiny))[0].state_dict()
    caplog.clear()
    rounded = load_base_model(str(out))[0].state_dict()
    assert "rounded to NF4" in caplog.text  # loaded without --quantize 4bit: said once
    saved_as = getattr(torch, dtype)
    assert all(torch.equal(rounded[k], original[k].to(saved_as).float()) for k in original
               if not k.endswith("_proj.weight") or ".v_proj." in k)  # only the rounded layers changed
    model = load_base_model(str(out), quantize="4bit", quantize_skip=("v_proj",), device="cpu")[0]
    quantized_layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized_layers) == 12
    for name, module in quantized_layers.items():
        stored = F.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        saved = rounded[f"{name}.weight"]
        # the same values, up to double quantization's rounding of the block scales (plain rounding moves ~10x more)
        assert (stored - saved).abs().max() <= 0.01 * saved.abs().max()

    assert main([*command, "--out", str(out)]) == 2  # refusals, each before a model loads, no folder left behind
    assert "already exists" in capsys.readouterr().err
    assert main([*command, "--out", str(tmp_path / "x"), "--device", "cuda:7"]) == 2
    assert "device 'cuda:7'" in capsys.readouterr().err
    assert main([*command, "--out", str(tmp_path / "x"), "--quantize-skip", "nope_proj"]) == 2
    assert "'nope_proj' names no linear layer" in capsys.readouterr().err
    calibration.write_text("Too short.")
    assert main([*command, "--out", str(tmp_path / "x")]) == 2
    assert "fewer than one window of 32" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_gptq_rounds_a_layer_group_by_group_in_the_order_it_runs(tiny):
    from retro_peft.gptq import _decoder_layers, _input_groups

    model = load_base_model(str(tiny))[0].eval()
    layer = _decoder_layers(model)[0]
    captured = []

    class Captured(Exception):
        pass

    def capture(module, args, kwargs):
        captured.append((list(args), dict(kwargs)))
        raise Captured
    hook = layer.register_forward_pre_hook(capture, with_kwargs=True)
    with pytest.raises(Captured):
        model(input_ids=torch.tensor([[1, 400, 500, 600, 700]]), use_cache=False)
    hook.remove()
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    groups = _input_groups(layer, linears, captured[0], lambda layer, args, kwargs: layer(*args, **kwargs))
    # the layers reading one input are rounded together, after every group that computes that input
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
