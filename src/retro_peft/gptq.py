"""GPTQ onto bitsandbytes' NF4 grid: a base model rounded once, on calibration texts, for `--quantize 4bit`.

Why: `--quantize 4bit` rounds each weight to the nearest of NF4's 16 levels (bitsandbytes: blocks of 64
consecutive weights of a row sharing one scale, their largest magnitude). A small model loses much to that
(SmolLM2-135M: KL 0.37 nats from float32, BENCHMARKS.md), and a QLoRA adapter trains on and answers from those
weights. GPTQ (Frantar et al., 2022) rounds a matrix's input columns one at a time and moves each column's
rounding error onto the columns not rounded yet, weighted by the inverse of the calibration inputs' second
moments H = X^T X: it keeps the layer's *outputs* on such inputs close rather than each weight.

The levels and blocks are bitsandbytes' own, so the result is something `--quantize 4bit` stores exactly: a
block's scale is fixed when GPTQ reaches the block (after the earlier blocks' errors moved into it) and the
block's largest weight is set to +-scale, so bitsandbytes derives the same scale again when it quantizes the
saved folder, and the same levels (its double quantization then rounds the scales, as it does for plain rounding).

`write_rounded_base` saves a full-precision Hugging Face folder whose rounded layers hold NF4 values only; load it
like any base with `--quantize 4bit` and the same `--quantize-skip`. Adapters trained on it are plain PEFT folders.
Layers are rounded in the order the model runs them, each on inputs computed with everything before it already
rounded (GPTQ's "true sequential" scheme: within a decoder layer q/k/v, then o, then gate/up, then down; on
SmolLM2 it gives a KL 0.01 lower than rounding a whole decoder layer from its unrounded inputs). Layers whose
width is not a multiple of the block stay with bitsandbytes' nearest rounding (listed in the record).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from retro_peft.base_model import (DTYPES, ROUNDING_RECORD, _check_quantizable, _linear_names, _skip_modules,
                                   check_device, check_quantize_skip, load_base_model, quantization_config,
                                   save_model_folder)
from retro_peft.choices import check_quantize
from retro_peft.errors import InputError
from retro_peft.models import resolve_generator
from retro_peft.storage import check_output_folder, write_folder

log = logging.getLogger(__name__)

NF4_BLOCK = 64  # bitsandbytes' 4-bit block (its default; transformers' BitsAndBytesConfig does not change it)
DAMP = 0.01  # added to H's diagonal as this share of its mean (GPTQ's value): keeps H invertible


@dataclass
class RoundingConfig:
    out: str | Path
    quantize_skip: Sequence[str] = ()  # linear layers `--quantize 4bit` will keep unquantized: left as they are
    samples: int = 64  # calibration windows
    tokens: int = 512  # tokens per window
    batch_size: int = 8  # windows per forward pass
    dtype: str = "float32"  # the model's dtype while rounding, and the saved weights'
    device: str | None = None  # None: cpu
    overwrite: bool = False

    def validate(self) -> None:
        check_quantize("4bit")  # bitsandbytes' grid: refused here with the pip command if it is not installed
        for key in ("samples", "tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise InputError(f"gptq: {key} must be at least 1, got {getattr(self, key)}")
        if self.dtype not in DTYPES:
            raise InputError(f"gptq: unknown dtype {self.dtype!r}: use {', '.join(DTYPES)}")
        check_device(self.device or "cpu")
        check_output_folder(self.out, self.overwrite, "rounded base folder")


def nf4_levels(device=None) -> torch.Tensor:
    """bitsandbytes' 16 NF4 levels in [-1, 1], ascending."""
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.get_4bit_type("nf4", device="cpu").float().sort().values.to(device)


def round_to_nearest(weight: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """What bitsandbytes stores for `weight` without GPTQ (scale = each block's largest magnitude)."""
    blocks = weight.float().reshape(-1, NF4_BLOCK)
    scale = blocks.abs().amax(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (_nearest(blocks / scale, levels) * scale).reshape(weight.shape)


def _nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return levels[torch.bucketize(x, (levels[1:] + levels[:-1]) / 2)]


def gptq_nf4(weight: torch.Tensor, hessian: torch.Tensor, levels: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """`weight` [out, in] (in a multiple of NF4_BLOCK) rounded to NF4 blocks by GPTQ, given the inputs' summed
    outer products `hessian` [in, in]; float32, on the weight's device."""
    w = weight.float().clone()
    rows, cols = w.shape
    h = hessian.double().clone()
    dead = torch.diag(h) == 0  # inputs never seen: nothing to preserve there
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(damp * torch.diag(h).mean())
    # the upper Cholesky factor of H^-1: row i holds how column i's error spreads over the columns after it
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    rounded = torch.empty_like(w)
    row_ids = torch.arange(rows, device=w.device)
    for start in range(0, cols, NF4_BLOCK):
        end = start + NF4_BLOCK
        block = w[:, start:end].clone()  # with every earlier block's error already moved in
        scale = block.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny)
        largest = block.abs().argmax(1)  # pinned to +-scale, so bitsandbytes finds the same scale again
        largest_value = torch.sign(block[row_ids, largest]) * scale
        errors = torch.empty_like(block)
        ub = u[start:end, start:end]
        for j in range(NF4_BLOCK):
            column = block[:, j]
            q = torch.where(largest == j, largest_value, _nearest(column / scale, levels) * scale)
            rounded[:, start + j] = q
            errors[:, j] = (column - q) / ub[j, j]
            block[:, j + 1:] -= errors[:, j:j + 1] * ub[j, j + 1:]
        w[:, end:] -= errors @ u[start:end, end:]  # the block's errors onto every later column at once
    return rounded


def calibration_windows(tokenizer, texts: Sequence[str], samples: int, tokens: int) -> torch.Tensor:
    """[n, tokens] token ids: the texts joined by the end-of-text token and cut into `samples` windows at most."""
    ids: list[int] = []
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False).input_ids + separator
        if len(ids) >= samples * tokens:
            break
    n = min(samples, len(ids) // tokens)
    if n == 0:
        raise InputError(f"gptq: the calibration texts hold {len(ids)} tokens, fewer than one window of {tokens}; "
                         "give more text or a smaller --tokens")
    return torch.tensor(ids[:n * tokens]).view(n, tokens)


class _Captured(Exception):
    pass


def _accumulate(hessian: torch.Tensor, module, args) -> None:
    """Forward pre-hook: the layer's inputs' outer products added to `hessian` (returns None: inputs unchanged)."""
    x = args[0].reshape(-1, args[0].shape[-1]).float()
    hessian.addmm_(x.T, x)


def _output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum over the calibration inputs x of |delta x|^2 (delta: weight minus its rounding)."""
    return float(((delta @ hessian) * delta).sum())


def _input_groups(layer, linears: dict, first_input, run_layer) -> list[list[str]]:
    """`linears`' names in the order the layer calls them, those reading the same input together (a Llama
    layer: q/k/v, o, gate/up, down)."""
    calls = []  # (name, its input): holding the inputs keeps their memory from being reused by the next one
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: calls.append((n, a[0])) and None)
             for n, m in linears.items()]
    try:
        run_layer(layer, *first_input)
    finally:
        for h in hooks:
            h.remove()
    groups, last = [], None
    for name, tensor in calls:
        if name in {n for g in groups for n in g}:
            continue
        if tensor is not last:
            groups.append([])
            last = tensor
        groups[-1].append(name)
    return groups


def _decoder_layers(model) -> torch.nn.ModuleList:
    n = model.config.num_hidden_layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if not lists:
        raise InputError(f"gptq: no list of {n} decoder layers found in {type(model).__name__}")
    return lists[0]


@torch.no_grad()
def round_model(model, windows: torch.Tensor, skip: Sequence[str] = (), batch_size: int = 8) -> dict:
    """Round, in place, every linear layer of `model`'s decoder that `--quantize 4bit` would quantize (not the
    output head, not those `skip` names) with GPTQ on `windows`. Returns per layer the calibration error
    sum((W - Q) H (W - Q)^T) of GPTQ's rounding as a share of plain rounding's, and the layers left unrounded."""
    device = next(model.parameters()).device
    levels = nf4_levels(device)
    layers = _decoder_layers(model)
    names = {m: n for n, m in model.named_modules()}
    # what `--quantize 4bit` quantizes: the same names as bitsandbytes is told to skip (quantization_config)
    quantized = set(_linear_names(model)) - set(_skip_modules(model.config, tuple(skip)))
    # the first decoder layer's (args, kwargs) per batch: hidden states first, then positions and masks. Every
    # layer is run with these keyword arguments, as GPTQ's implementations do: a model that gives its layers
    # different masks (sliding-window layers) is calibrated with the first layer's.
    inputs = []

    def capture(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = [kwargs.pop("hidden_states")] if not args and "hidden_states" in kwargs else []
        inputs.append(([*hidden, *args], kwargs))
        raise _Captured

    hook = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        hook.remove()

    def run_layer(layer, args, kwargs):
        out = layer(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    layer_names = [names[layer] + "." for layer in layers]
    report, unrounded = {}, sorted(n for n in quantized if not any(n.startswith(p) for p in layer_names))
    for layer in layers:
        linears = {names[m]: m for m in layer.modules() if names[m] in quantized}
        for name, m in list(linears.items()):
            if m.weight.shape[1] % NF4_BLOCK:
                unrounded.append(name)
                del linears[name]
        groups = _input_groups(layer, linears, inputs[0], run_layer)
        unrounded += [n for n in linears if not any(n in group for group in groups)]  # not called by the layer
        for group in groups:
            # each group's inputs as the layer computes them with the groups before it already rounded
            hessians = {n: torch.zeros(linears[n].weight.shape[1], linears[n].weight.shape[1], device=device)
                        for n in group}
            hooks = [linears[n].register_forward_pre_hook(partial(_accumulate, hessians[n])) for n in group]
            try:
                for args, kwargs in inputs:
                    run_layer(layer, args, kwargs)
            finally:
                for h in hooks:
                    h.remove()
            for name in group:
                m, h = linears[name], hessians[name]
                w = m.weight.float()
                q = gptq_nf4(w, h, levels)
                report[name] = _output_error(w - q, h) / max(_output_error(w - round_to_nearest(w, levels), h),
                                                             1e-30)
                m.weight.copy_(q.to(m.weight.dtype))
        for args, kwargs in inputs:  # the next layer reads this one's outputs as rounded
            args[0] = run_layer(layer, args, kwargs)
    return {"error_vs_nearest": report, "nearest_rounding": sorted(unrounded)}


def write_rounded_base(base: str, texts: Sequence[str], config: RoundingConfig) -> dict:
    """Load `base`, round it with GPTQ on `texts`, save it at `config.out` (model, tokenizer and a record of how it
    was rounded, `retro_gptq.json`), all or nothing. Returns the record."""
    config.validate()
    skip = check_quantize_skip("4bit", config.quantize_skip)
    # before any weight is read: the skipped names exist, the base is not quantized already
    quantization_config("4bit", skip, config=_check_quantizable(base, resolve_generator(base)), name=base)
    out = Path(config.out)
    started = time.perf_counter()
    model, tokenizer, _ = load_base_model(base, dtype=DTYPES[config.dtype], device=config.device or "cpu")
    model.eval()
    windows = calibration_windows(tokenizer, texts, config.samples, config.tokens)
    result = round_model(model, windows, skip, config.batch_size)
    ratios = result["error_vs_nearest"]
    kinds = {}
    for name, ratio in ratios.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(ratio)
    digest = hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()
    record = {"method": "gptq", "grid": "nf4", "block": NF4_BLOCK, "damp": DAMP, "base_model": base,
              "quantize_skip": list(skip), "dtype": config.dtype,
              "calibration": {"windows": int(windows.shape[0]), "tokens": int(windows.shape[1]), "sha256": digest},
              "rounded_layers": len(ratios), "nearest_rounding": result["nearest_rounding"],
              "error_vs_nearest": {k: sum(v) / len(v) for k, v in sorted(kinds.items())},
              "seconds": round(time.perf_counter() - started, 1)}
    write_folder(out, lambda tmp: save_model_folder(tmp, model, tokenizer, ROUNDING_RECORD, record))
    log.info("gptq: %d layers rounded in %.0f s, calibration error %s of plain rounding's", len(ratios),
             record["seconds"], record["error_vs_nearest"])
    return {"out": str(out), **record}
