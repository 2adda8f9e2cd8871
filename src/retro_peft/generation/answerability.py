"""Abstention by a calibrated score: a small head on the model's state where the answer starts.

The score is a logistic regression over the last prompt position's final hidden state
and one more feature, the margin between the best token's and the abstention phrase's
first token's log-probability there. `fit_head` trains it on held-out training
questions (answerable = 1, unanswerable = 0) and picks the threshold from its
out-of-fold scores of the answerable ones, so that a requested share of answerable
questions is answered (`answer_rate`). At answer time a row below the threshold
abstains (without decoding further); a row above it may not start with the
abstention phrase (its first token is masked), so the score, not the decoder's
habit, decides.

`prompt_end_hook` reads both features from the forward the decoder runs anyway (the
prefill), through a hook on the output embedding (the LM head): no second pass.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from retro_peft.errors import InputError

ANSWERABILITY_FILE = "answerability.json"
FORMAT_VERSION = 1


def check_answer_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < float(rate) <= 1.0:
        raise InputError(f"answer_rate must be a number in (0, 1], got {rate!r}")
    return float(rate)


def parse_abstain_at(text: str | None) -> float | None:
    """`answer_rate=0.9` -> 0.9; `off` -> 0.0 (never abstain by the score); None -> None (the adapter's own)."""
    if text is None:
        return None
    text = text.strip()
    if text in ("off", "none"):
        return 0.0
    name, sep, value = text.partition("=")
    if not sep or name.strip() != "answer_rate":
        raise InputError(f"abstain_at must be 'answer_rate=R' (R in (0, 1]) or 'off', got {text!r}")
    try:
        return check_answer_rate(float(value))
    except ValueError:
        raise InputError(f"abstain_at: answer_rate must be a number, got {value.strip()!r}") from None


def prompt_features(hidden: torch.Tensor, logits: torch.Tensor, abstain_token: int) -> torch.Tensor:
    """[rows, hidden + 1]: the hidden state, and the best token's log-probability minus the abstention token's."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    others = logp.clone()
    others[:, abstain_token] = -math.inf
    margin = others.max(dim=-1).values - logp[:, abstain_token]
    return torch.cat([hidden.float(), margin[:, None]], dim=-1)


@dataclass
class AnswerabilityHead:
    mean: list[float]
    std: list[float]
    weight: list[float]
    bias: float
    abstain_token: int  # the abstention phrase's first token
    answer_rate: float  # what `threshold` was chosen for
    threshold: float
    calibration: list[float] = field(default_factory=list, repr=False)  # held-out answerable scores, sorted
    stats: dict = field(default_factory=dict)
    # the prompt layout its features were read in: "full" (a full prefill) or a frozen KV cache's layout. A
    # cached layout's states differ, so the same prompt scores differently there (heads saved before: "full")
    layout: str = "full"

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        mean, std, weight = (torch.tensor(x, dtype=torch.float32, device=features.device)
                             for x in (self.mean, self.std, self.weight))
        return ((features.float() - mean) / std) @ weight + self.bias

    def at_rate(self, answer_rate: float | None) -> AnswerabilityHead:
        """The head with its threshold re-picked for another answer rate (None: as fitted; 0: never abstains)."""
        if answer_rate is None or answer_rate == self.answer_rate:
            return self
        if answer_rate == 0.0:
            return replace(self, answer_rate=0.0, threshold=-math.inf)
        return replace(self, answer_rate=check_answer_rate(answer_rate),
                       threshold=threshold_for(self.calibration, answer_rate))

    def save(self, folder) -> Path:
        path = Path(folder) / ANSWERABILITY_FILE
        obj = {"format_version": FORMAT_VERSION, **{k: v for k, v in self.__dict__.items()}}
        obj["threshold"] = None if math.isinf(self.threshold) else self.threshold
        path.write_text(json.dumps(obj) + "\n")
        return path

    @classmethod
    def load(cls, folder) -> AnswerabilityHead | None:
        path = Path(folder) / ANSWERABILITY_FILE
        if not path.is_file():
            return None
        try:
            obj = json.loads(path.read_text())
            obj.pop("format_version", None)
            if obj.get("threshold") is None:
                obj["threshold"] = -math.inf
            return cls(**obj)
        except (ValueError, TypeError) as e:
            raise InputError(f"{path} is not a valid answerability head: {e}") from None


def threshold_for(calibration: list[float], answer_rate: float) -> float:
    """The score above which `answer_rate` of the calibration (answerable) scores lie."""
    if not calibration:
        raise InputError("the answerability head has no calibration scores to pick a threshold from")
    ordered = sorted(calibration)
    cut = math.floor(round((1.0 - answer_rate) * len(ordered), 9))  # (1 - 0.9) * 10 is 0.999...: round first
    return ordered[min(cut, len(ordered) - 1)] if cut > 0 else -math.inf


def _logistic(x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w * w).sum() / len(y)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def fit_head(features: torch.Tensor, answerable: list[bool], *, abstain_token: int, answer_rate: float,
             folds: int = 5, l2: float = 10.0, seed: int = 0, hidden: bool = True,
             layout: str = "full") -> AnswerabilityHead:
    """Fit the head on held-out questions' prompt features; the threshold comes from out-of-fold scores.

    With no unanswerable question to learn from, the score is the margin alone (its weight 1) and only
    the threshold is calibrated. `hidden=False` learns from the margin alone (the hidden state's weights 0).
    """
    answer_rate = check_answer_rate(answer_rate)
    x = features.float().cpu()
    y = torch.tensor([float(a) for a in answerable])
    if int(y.sum()) == 0:
        raise InputError("the held-out questions hold no answerable one: nothing to calibrate the threshold on")
    mean = x.mean(0)
    std = x.std(0).clamp(min=1e-6) if len(x) > 1 else torch.ones(x.shape[1])
    z = (x - mean) / std
    if not hidden:  # the hidden state's columns carry no weight: only the margin is learned from
        z = torch.cat([torch.zeros_like(z[:, :-1]), z[:, -1:]], dim=1)
    both = 0 < int(y.sum()) < len(y)
    if not both:
        weight = torch.zeros(x.shape[1])
        weight[-1] = 1.0
        bias = torch.zeros(())
        oof = z @ weight
    else:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        oof = torch.empty(len(y))
        for f in range(min(folds, len(y))):
            held = order[f::min(folds, len(y))]
            keep = torch.ones(len(y), dtype=torch.bool)
            keep[held] = False
            w, b = _logistic(z[keep], y[keep], l2)
            oof[held] = z[held] @ w + b
        weight, bias = _logistic(z, y, l2)
    calibration = sorted(float(s) for s, a in zip(oof, answerable) if a)
    threshold = threshold_for(calibration, answer_rate)
    unanswerable = [float(s) for s, a in zip(oof, answerable) if not a]
    stats = {"held_out": len(y), "answerable": int(y.sum()), "unanswerable": len(unanswerable),
             "abstain_unanswerable_held_out": (sum(s < threshold for s in unanswerable) / len(unanswerable))
             if unanswerable else None}
    return AnswerabilityHead(mean=mean.tolist(), std=std.tolist(), weight=weight.tolist(), bias=float(bias),
                             abstain_token=int(abstain_token), answer_rate=answer_rate, threshold=threshold,
                             calibration=calibration, stats=stats, layout=layout)


@contextlib.contextmanager
def prompt_end_hook(model, on_prefill):
    """Call `on_prefill(hidden [rows, H], logits [rows, V])` on the model's first LM-head call (the prefill's
    last position); what it returns (logits) replaces the last position's logits."""
    head = model.get_output_embeddings()
    if head is None:
        raise InputError(f"{type(model).__name__} has no output embedding to read the answerability features from")
    seen = {"done": False}

    def hook(_module, inputs, output):
        if seen["done"]:
            return None
        seen["done"] = True
        new = on_prefill(inputs[0][:, -1, :], output[:, -1, :])
        if new is not None:
            output[:, -1, :] = new
        return output

    handle = head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
