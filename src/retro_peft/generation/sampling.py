"""How the next token is chosen: greedy, or sampled with temperature and nucleus (top-p)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from retro_peft.errors import InputError


MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen. temperature 0 is greedy decoding (deterministic)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    seed: int = 0
    # Log-probabilities of each generated token (None: not recorded), with this many most likely alternatives
    # per position; from the model's own distribution (before temperature and top-p), as OpenAI reports them.
    logprobs: int | None = None

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not 0.0 <= float(self.temperature) <= 5.0:
            raise InputError(f"temperature must be between 0 and 5, got {self.temperature!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(x, str) or not x for x in self.stop):
            raise InputError("stop strings must be non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise InputError(f"logprobs (alternatives per token) must be an integer from 0 to {MAX_TOP_LOGPROBS}, "
                             f"got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def choose_tokens(logits: torch.Tensor, sampling: SamplingConfig,
                  rng: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """One token per row. rng: one generator per row, so a row's draws never depend on the rows beside it
    (a single generator would be advanced by each row in turn); a single one is shared by all rows."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if isinstance(rng, (list, tuple)):
        if len(rng) != probs.shape[0]:
            raise InputError(f"sampling needs one generator per row: {len(rng)} for {probs.shape[0]} rows")
        return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, rng)])
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)
