"""Moving stored keys to new positions: RoPE rotations compose, R(p + d) = R(d) R(p).

A stored segment's keys were rotated for the position it was computed at; at query
time they are rotated by the shift to where the segment sits in the row. Values carry
no position. Supported: rotary (rotate-half) models with full attention, Llama-style
(the packaged SmolLM2 is a Llama).
"""

from __future__ import annotations

import torch

from retro_peft.errors import InputError

SUPPORTED_MODELS = ("llama", "mistral", "qwen2")


def rotary_embedding(model):
    """The model's rotary embedding (its `inv_freq`), after checking the model is one this cache supports."""
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED_MODELS:
        raise InputError(f"the frozen KV cache supports {', '.join(SUPPORTED_MODELS)} models (rotary, full "
                         f"attention); this model is {getattr(config, 'model_type', None)!r}")
    if getattr(config, "use_sliding_window", True) and getattr(config, "sliding_window", None):
        raise InputError("the frozen KV cache needs full attention; this model uses a sliding window")
    rotary = next((m for name, m in model.named_modules() if name.endswith("rotary_emb")), None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise InputError("the frozen KV cache needs a rotary embedding (`rotary_emb.inv_freq`); the model has none")
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise InputError("the frozen KV cache cannot move keys under a scaled rotary embedding "
                         f"(attention_scaling {rotary.attention_scaling})")
    return rotary


def rotate(keys: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move rotary-encoded keys [..., tokens, head_dim] by `shift` [tokens] positions (HF's rotate-half layout)."""
    angle = shift.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    angle = torch.cat([angle, angle], dim=-1)
    k = keys.to(torch.float32)
    half = k.shape[-1] // 2
    rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return (k * angle.cos() + rotated * angle.sin()).to(keys.dtype)
