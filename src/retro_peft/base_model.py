"""The base model: loading, device and dtype, and the fingerprints that tie files to its weights.

Fingerprints are what an adapter, a frozen KV cache or a domain's cache keys record of the
model they belong to (`base_fingerprint`: the base model; `weights_fingerprint`: what a
forward pass computes with, adapter included); `check_fingerprint` is the one check that
refuses a mismatch. Model names resolve in `retro_peft.models`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from retro_peft.choices import DTYPE_NAMES, check_quantize, check_quantize_skip
from retro_peft.errors import AdapterMismatchError, InputError
from retro_peft.hf_compat import unwrapped
from retro_peft.models import resolve_generator

log = logging.getLogger(__name__)
ROUNDING_RECORD = "retro_gptq.json"  # in a base folder written by `retro-peft gptq` (gptq.py): how it was rounded

# -- loading -------------------------------------------------------------------------------------

def load_base_model(name: str, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                    quantize: str | None = None, quantize_skip: Sequence[str] = ()):
    """(model, tokenizer, resolved path) for a packaged short name, a local folder or a Hugging Face id.

    quantize: "4bit" or "8bit" loads the linear layers quantized by bitsandbytes (`quantization_config`), on
    `device` (a quantized model is placed when loaded, not moved afterwards); the other weights in `dtype`.
    quantize_skip: with quantize, the linear layers to keep unquantized, in `dtype`: those whose qualified name
    ends with one of these dotted suffixes (e.g. ("down_proj", "v_proj")); checked against the model's
    architecture before its weights are read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_quantize(quantize)
    skip = check_quantize_skip(quantize, quantize_skip)
    path = resolve_generator(name)
    _check_rounding(name, path, quantize, skip)
    extra = {}
    if quantize:
        device = check_device(None if device is None else str(device))
        config = _check_quantizable(name, path)
        extra = {"quantization_config": quantization_config(quantize, skip, config=config, name=name),
                 "device_map": {"": device}}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **extra)
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(f"cannot load base model {name!r} ({path}){f' quantized to {quantize}' if quantize else ''}"
                         f": {e}") from None
    if quantize and not any(type(m).__module__.startswith("bitsandbytes") for m in model.modules()):
        raise InputError(f"--quantize {quantize}: bitsandbytes found no linear layer to quantize in {name!r} "
                         f"({type(model).__name__})")
    if quantize:  # what `quantize_skipped` reports (the model's config holds only the qualified names)
        model.retro_peft_quantize_skip = skip
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None and not quantize:
        model.to(device)
    return model, tokenizer, path


def save_model_folder(folder: Path, model, tokenizer, record_name: str, record: dict) -> None:
    """A Hugging Face model folder (safetensors weights, tokenizer) with retro-peft's `record` of how it was made."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (Path(folder) / record_name).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _check_rounding(name: str, path: str, quantize: str | None, skip: tuple[str, ...]) -> None:
    """A warning when a base rounded for `--quantize 4bit` (`retro-peft gptq`) is loaded otherwise: its weights
    carry the rounding's error, which only the 4-bit setting it was rounded for pays back in memory."""
    record = Path(path) / ROUNDING_RECORD
    if not record.is_file():
        return
    try:
        rounded_skip = tuple(json.loads(record.read_text()).get("quantize_skip", ()))
    except (OSError, ValueError, AttributeError):
        rounded_skip = None
    if quantize != "4bit":
        log.warning("base model %r was rounded to NF4 by `retro-peft gptq` for --quantize 4bit; loaded %s, it keeps "
                    "that rounding's error", name, f"as {quantize}" if quantize else "in full precision")
    elif rounded_skip is not None and set(rounded_skip) != set(skip):
        log.warning("base model %r was rounded by `retro-peft gptq` with --quantize-skip %s, loaded with %s: the "
                    "layers it did not round are quantized by plain rounding", name,
                    ",".join(rounded_skip) or "(none)", ",".join(skip) or "(none)")


# -- quantization (bitsandbytes) -----------------------------------------------------------------

def quantization_config(quantize: str, skip: Sequence[str] = (), *, config=None, name: str | None = None):
    """The one BitsAndBytesConfig per mode. 4bit is QLoRA's: NF4 (the normal-float grid of normally distributed
    weights), double quantization (the block scales quantized too: ~0.4 bits a weight saved), bfloat16 compute.

    bfloat16 compute on the CPU as well: bitsandbytes 0.50's CPU path supports it, and on this project's CPU
    (Xeon, AMX-BF16) a 4-bit 2800x576 @ 576x1536 projection took 123 ms in bf16 against 183 ms in float32
    (forward and backward: 331 vs 406 ms), its error against the float32 weights the same (0.042 mean |diff|:
    the 4-bit rounding dwarfs bf16's).

    skip: suffixes of the linear layers to keep unquantized (--quantize-skip; "v_proj" matches
    "model.layers.0.self_attn.v_proj", not "xv_proj"), which needs the model's `config` (a transformers config,
    or a model name or folder; `name` only names it in errors). Given, bitsandbytes' `llm_int8_skip_modules` (4-bit
    too) lists the modules transformers keeps unquantized by default (the output head), which it drops when the
    list is given, and the qualified name of every linear layer `skip` matches; a name that matches none is
    refused, before any weight is read. On SmolLM2-135M (8 Wikipedia leads), 4-bit moved the next-token
    distribution by a KL of 0.37 nats from float32's, 0.25 with down_proj kept (of the seven projections, keeping
    it helps most), 0.16 with down_proj, k_proj and v_proj (docs/scale-out.md)."""
    from transformers import BitsAndBytesConfig

    modules = {}
    if skip:
        if config is None:
            raise InputError("quantization_config: quantize_skip needs the model's config (or name) to find the "
                             "layers it names")
        modules = {"llm_int8_skip_modules": _skip_modules(config, check_quantize_skip(quantize, skip), name)}
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, **modules)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, **modules)


def _matches(module_name: str, suffix: str) -> bool:
    """Whether `suffix` ends `module_name` in whole dotted components."""
    return module_name == suffix or module_name.endswith("." + suffix)


def _skip_modules(config, skip: tuple[str, ...], name: str | None = None) -> list[str]:
    """llm_int8_skip_modules for `skip`: transformers' default skips, then the qualified names of the linear
    layers `skip` matches (exact names: transformers also matches a bare suffix inside a component, and regexes).

    Found on the model built on the meta device from its config (no weights read, no memory taken)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, (str, os.PathLike)):
        name = name or os.fspath(config)
        try:
            config = AutoConfig.from_pretrained(resolve_generator(os.fspath(config)))
        except (OSError, ValueError) as e:
            raise InputError(f"cannot load base model {name!r}: {e}") from None
    name = name or getattr(config, "_name_or_path", "") or type(config).__name__
    try:
        with init_empty_weights():
            meta = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise InputError(f"--quantize-skip: cannot build base model {name!r} to find its layers: {e}") from None
    defaults = _default_skips(meta)
    linears = _linear_names(meta)
    unknown = [s for s in skip if not any(_matches(n, s) for n in linears)]
    if unknown:
        quantizable = dict.fromkeys(n.rsplit(".", 1)[-1] for n in linears
                                    if not any(_matches(n, d) for d in defaults))
        raise InputError(f"--quantize-skip: {', '.join(map(repr, unknown))} name{'' if len(unknown) > 1 else 's'} "
                         f"no linear layer of base model {name!r} ({type(meta).__name__}); its quantized linear "
                         f"layers end with: {', '.join(quantizable) or 'none'}")
    kept = [n for n in linears if any(_matches(n, s) for s in skip)]
    return list(dict.fromkeys([*defaults, *kept]))


def _linear_names(model) -> list[str]:
    """The qualified names of the layers bitsandbytes replaces (transformers' replace_with_bnb_linear: exactly
    torch.nn.Linear, or GPT-2's Conv1D), in model order."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every transformers this supports has it
        Conv1D = ()  # noqa: N806
    return [n for n, m in model.named_modules() if n and (type(m) is torch.nn.Linear or isinstance(m, Conv1D))]


def _default_skips(meta_model) -> list[str]:
    """The modules transformers keeps unquantized when no llm_int8_skip_modules is given (the output head, tied
    weights), as transformers finds them; the output embedding's name where that function has moved."""
    find = None
    try:  # transformers 5
        from transformers.quantizers.base import get_keys_to_not_convert as find
    except ImportError:
        try:  # transformers 4
            from transformers.integrations import get_keys_to_not_convert as find
        except ImportError:
            pass
    if find is not None:
        try:
            return sorted(find(meta_model))
        except (AttributeError, TypeError, IndexError):  # another signature: the output head below
            pass
    head = meta_model.get_output_embeddings()
    return [n for n, m in meta_model.named_modules() if head is not None and m is head]


def _check_quantizable(name: str, path: str):
    """The model's config; refused, before the weights are read, if the model is already quantized."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load base model {name!r} ({path}): {e}") from None
    existing = getattr(config, "quantization_config", None)
    if existing:
        method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", "?")
        raise InputError(f"--quantize: base model {name!r} is already quantized ({method}); bitsandbytes quantizes "
                         "only full-precision weights: drop --quantize or use the unquantized model")
    return config


def quantized(model) -> str | None:
    """How bitsandbytes quantized `model` (or the base of a PEFT model) when loading it: "4bit", "8bit" or None."""
    if _quantization_setting(model, "quant_method") != "bitsandbytes":
        return None
    return ("4bit" if _quantization_setting(model, "load_in_4bit") else
            "8bit" if _quantization_setting(model, "load_in_8bit") else None)


def _quantization_setting(model, key: str):
    """`key` of the quantization config `model` (or the base of a PEFT model) was loaded with; None if none."""
    config = getattr(getattr(unwrapped(model), "config", None), "quantization_config", None)
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def quantize_skipped(model) -> tuple[str, ...] | None:
    """The quantize_skip names `load_base_model` kept unquantized in `model` (or the base of a PEFT model): () for
    none; None where it cannot tell (not quantized, or quantized by transformers itself with skips of its own)."""
    if not quantized(model):
        return None
    recorded = getattr(unwrapped(model), "retro_peft_quantize_skip", None)
    if recorded is not None:
        return tuple(recorded)
    return () if _quantization_setting(model, "llm_int8_skip_modules") is None else None


def quantize_skipped_linears(model) -> dict[str, torch.nn.Module]:
    """The plain linear layers of `model`'s base that its quantize_skip kept unquantized, by qualified name (an
    adapter's wrapped layer by its base layer's)."""
    skip = quantize_skipped(model) or ()
    return {n: m for n, m in unwrapped(model).named_modules()
            if type(m) is torch.nn.Linear and any(_matches(n.removesuffix(".base_layer"), s) for s in skip)}


def check_device(name: str | None) -> torch.device:
    """The torch device `name` names (None: cuda if available, else cpu); refused here if torch cannot use it.

    Otherwise a typo or a CPU-only torch surfaces as torch's own error once the model is loaded.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # the loops only know these two (autocast, fused AdamW)
        raise InputError(f"unsupported device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r}: CUDA is not available to this torch ({torch.__version__}); drop "
                             f"--device {name} (serve: the device setting) to run on the CPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {name!r}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the work already queued there.

    A plain copy from pageable host memory to a GPU first waits for everything queued on the stream: built after a
    request's first kernels (the frozen KV cache's assembly), its token ids would hold the host until they ran,
    and the GPU then idles while the host prepares the rest. From pinned memory the copy is queued like a kernel
    (torch's pinned-memory cache keeps the block until the copy is done)."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES if name != "auto"}


def inference_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """The dtype to answer in: `dtype` by name ("auto" or None: bfloat16 on CUDA, float32 elsewhere).

    bfloat16 on a CPU is a choice, not the default: on CPUs with native bf16 matrix
    units (AVX512-BF16, AMX) it halves the prefill time, elsewhere it is slower than
    float32, and it rounds differently with the batch's shape, so greedy answers can
    differ from float32's and, in a batch, from the same request alone.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device is not None and str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}: use {', '.join(DTYPE_NAMES)}")
    return DTYPES[dtype]


def model_dtype(model) -> torch.dtype:
    """The dtype the model computes in (its first floating-point parameter's)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


# -- fingerprints --------------------------------------------------------------------------------

# Keys of a model config that do not change what the weights compute.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype",
                         "_commit_hash", "use_cache", "architectures", "_model_name_or_path", "output_attentions",
                         "output_hidden_states", "return_dict", "attn_implementation", "_attn_implementation",
                         # how the weights are held in memory, not what they are: an adapter trained on a 4-bit
                         # base loads on the full-precision one and back
                         "quantization_config"}


def base_fingerprint(model) -> dict:
    """What identifies a base model: its config (minus bookkeeping keys) and a sample of its embedding."""
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    config_sha = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    emb = model.get_input_embeddings().weight.detach()
    # Rounded to bf16 so the fingerprint does not depend on the dtype the model was loaded in.
    sample = emb.reshape(-1)[:4096].to(torch.bfloat16).float().cpu().numpy().tobytes()
    return {"config_sha256": config_sha, "weights_sha256": hashlib.sha256(sample).hexdigest()}


def weights_fingerprint(model) -> str:
    """The weights a forward pass uses, what computed states depend on: the base model's and, for a PEFT
    model with its adapters enabled, the active adapter's (inside `disable_adapter()`, the base model's only)."""
    from peft import get_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    h = hashlib.sha256(json.dumps(base_fingerprint(unwrapped(model)), sort_keys=True).encode())
    if any(isinstance(m, BaseTunerLayer) and not m.disable_adapters for m in model.modules()):
        # the adapter's weights, not its name: a bank may load it under another name
        for name, tensor in sorted(get_peft_model_state_dict(model, adapter_name=model.active_adapter).items()):
            h.update(name.encode())
            h.update(tensor.detach().to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()


# What a mismatch of each recorded fingerprint means ({made_for}: the model recorded, {found}: the one loaded).
_MISMATCH = {
    "config_sha256": "was trained on base model {made_for}, whose architecture differs from {found}",
    "weights_sha256": "was trained on base model {made_for}; {found} has the same architecture but different weights",
    "weights": "was built for other model weights (base model or adapter) than {found}'s; rebuild it",
}


def check_fingerprint(recorded: dict, found: dict, *, what: str, found_name: str) -> None:
    """Refuse `what` (an adapter folder, a frozen KV cache file) when a fingerprint it `recorded` differs from
    the loaded model's (`found`: `base_fingerprint` keys, or {"weights": `weights_fingerprint`})."""
    for key, value in found.items():
        if recorded.get(key) != value:
            reason = _MISMATCH[key].format(made_for=repr(recorded.get("name")), found=repr(found_name))
            raise AdapterMismatchError(f"{what} {reason} ({key} {str(recorded.get(key))[:12]} vs {str(value)[:12]})")
