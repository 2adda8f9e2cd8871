"""Soft tokens: a few trainable embeddings stored after each passage of the frozen KV cache.

KV Packet's trailer (and KVLink's link tokens, here cached rather than recomputed): a passage of the block
layout is computed alone, after the head and "[1]", so its states lack what attending to the passages before
it would have given them, and the question's attention over several such blocks is not the attention it learned.
`count` embeddings appended to every passage when its states are computed (`store.segment_states`) give the
question a few extra positions per passage to read, trained (`TrainConfig.soft_tokens`, the adapter frozen) so
that the cached layout's answer distribution matches the same adapter's full prefill (KL over the answer
tokens). They cost `count` stored tokens per passage and nothing per query beyond attending to them.
Measured on SQuAD with SmolLM2 (BENCHMARKS.md, three seeds): 8 of them, 100 steps, answer worse than the plain
block layout (44.0 against 46.5 F1), though their training KL falls; built for other models and domains to try.

Saved with the domain's adapter (`soft_tokens.safetensors`, its checksum in retro_config.json); the cache
records their fingerprint and refuses states computed with other soft tokens (or none).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from retro_peft.errors import InputError
from retro_peft.generation.prompt import encode
from retro_peft.kvcache.layout import template_segments
from retro_peft.storage import atomic_write_with

SOFT_TOKENS_FILE = "soft_tokens.safetensors"
MAX_SOFT_TOKENS = 64  # per passage; more is a second passage's worth of stored states
# Adam's step on embeddings: the adapter's 5e-4 barely moves them in a few hundred steps (measured on SmolLM2:
# 1e-2 cuts the block layout's KL to the full prefill from 0.28 to 0.09 in 20 steps on 8 examples)
SOFT_TOKENS_LR = 1e-2


def separator_ids(tokenizer, retrieval) -> list[int]:
    """The template's text between one passage and the next ("\\n[2]"), as token ids: what soft tokens start as."""
    return encode(tokenizer, template_segments(tokenizer, retrieval)[1][1])


def check_soft_count(count) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_SOFT_TOKENS:
        raise InputError(f"soft_tokens is the number of trainable tokens after each stored passage "
                         f"(0 to {MAX_SOFT_TOKENS}), got {count!r}")
    return count


class SoftTokens(torch.nn.Module):
    """`count` embeddings of the model's width, appended after every stored passage."""

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        if embeddings.dim() != 2 or not 1 <= embeddings.shape[0] <= MAX_SOFT_TOKENS:
            raise InputError(f"soft tokens are a [count, hidden] tensor with 1 to {MAX_SOFT_TOKENS} rows, "
                             f"got shape {tuple(embeddings.shape)}")
        if not torch.isfinite(embeddings).all():
            raise InputError("soft tokens hold non-finite values")
        self.embeddings = torch.nn.Parameter(embeddings.detach().clone().float())

    @property
    def count(self) -> int:
        return self.embeddings.shape[0]

    @classmethod
    def initial(cls, model, count: int, token_ids: list[int]) -> SoftTokens:
        """Started as the embeddings of `token_ids` (cycled to `count`): `separator_ids`, the tokens a full
        prompt has after a passage, so the question starts from states it knows. (Measured on SmolLM2, KL of
        the block layout's answers to the full prefill's: 0.29 without soft tokens, 0.28 with these at the
        start, 0.54 with vocabulary tokens drawn at random as in prompt tuning; 0.09 and 0.17 once trained.)"""
        if not token_ids:
            raise InputError("soft tokens start from the embeddings of at least one token")
        table = model.get_input_embeddings().weight
        ids = torch.tensor([token_ids[i % len(token_ids)] for i in range(check_soft_count(count))], device=table.device)
        return cls(table.detach()[ids].float().cpu())

    def inputs(self, dtype: torch.dtype, device) -> torch.Tensor:
        """[count, hidden] in the model's dtype on its device (gradients flow back to the float32 weights)."""
        return self.embeddings.to(device=device, dtype=dtype)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.embeddings.detach().float().cpu().numpy().tobytes()).hexdigest()

    def save(self, folder) -> Path:
        """`folder`/soft_tokens.safetensors, written whole or not at all."""
        from safetensors.torch import save_file

        path = Path(folder) / SOFT_TOKENS_FILE
        tensors = {"embeddings": self.embeddings.detach().float().cpu().contiguous()}
        atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "retro-peft-soft-tokens"}))
        return path

    @classmethod
    def load(cls, folder) -> SoftTokens | None:
        """The soft tokens saved in `folder`, or None if it has none."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(folder) / SOFT_TOKENS_FILE
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise InputError(f"{path} is not a readable soft-token file ({e})") from None
        if set(tensors) != {"embeddings"}:
            raise InputError(f"{path} holds {sorted(tensors)}, not the soft tokens' 'embeddings'")
        return cls(tensors["embeddings"])

    def check_model(self, model) -> None:
        hidden = model.get_input_embeddings().weight.shape[1]
        if self.embeddings.shape[1] != hidden:
            raise InputError(f"the soft tokens are {self.embeddings.shape[1]} wide; this model's embeddings are "
                             f"{hidden}: they were trained for another model")
