"""LM-supervised retriever training (REPLUG's LSR, RA-DIT's retriever half): teach the encoder which
chunks the generator finds useful.

For each training question the index's top-k chunks are scored twice: by the retriever (the cosine of
question and chunk embeddings over a temperature) and by the generator (the log-likelihood it gives the
gold answer with only that chunk in the prompt, over a temperature). The encoder is trained so that its
distribution over the k chunks matches the generator's (KL(P_retriever || Q_lm), as REPLUG writes it);
the generator is frozen. The output is a sentence-transformers folder, as `train_retriever` writes it.
"""

from __future__ import annotations

import copy
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from retro_peft.errors import InputError
from retro_peft.generation.constrained import choice_logprobs
from retro_peft.generation.prompt import build_prompt, encode, end_of_turn_ids
from retro_peft.index.retriever import check_output_folder, embed_with_grad
from retro_peft.qa import QAItem
from retro_peft.storage import replace_folder


@dataclass
class LSRConfig:
    k: int = 4  # chunks per question the two distributions are over
    retriever_temperature: float = 0.05  # cosine similarities are in [-1, 1]: sharpen them
    lm_temperature: float = 1.0
    epochs: int = 1
    batch_size: int = 8
    lr: float = 2e-5
    seed: int = 0

    def validate(self) -> None:
        if not isinstance(self.k, int) or self.k < 2:
            raise InputError(f"LSR needs k >= 2 chunks per question, got {self.k!r}")
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("retriever_temperature", "lm_temperature", "lr"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)!r}")


def scoring_inputs(tokenizer, retrieval, items: list[QAItem], chunks: list[list]):
    """One prompt per (question, chunk) with that chunk alone, the gold answer as its one option, and the
    question each prompt belongs to."""
    prompts, targets, at = [], [], []
    for q, (item, row) in enumerate(zip(items, chunks)):
        answer = encode(tokenizer, item.answers[0].strip()) + end_of_turn_ids(tokenizer, retrieval)
        for passage in row:
            prompts.append(build_prompt(tokenizer, item.question, [passage], retrieval).input_ids)
            targets.append([answer])
            at.append(q)
    return prompts, targets, at


@torch.inference_mode()
def lm_scores(generator, items: list[QAItem], chunks: list[list]) -> list[list[float]]:
    """[question][chunk]: log p(gold answer | the prompt with that chunk alone), batched over all pairs."""
    prompts, targets, at = scoring_inputs(generator.tokenizer, generator.retrieval, items, chunks)
    out: list[list[float]] = [[] for _ in items]
    model, pad_id = generator.model, generator.runner.pad_id
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), generator.batch_size):
            end = start + generator.batch_size
            for q, (score,) in zip(at[start:end], choice_logprobs(model, prompts[start:end], targets[start:end], pad_id)):
                out[q].append(score)
    finally:
        model.train(was_training)
    return out


def lsr_loss(questions: torch.Tensor, chunks: torch.Tensor, lm: torch.Tensor, config: LSRConfig) -> torch.Tensor:
    """KL(P_retriever || Q_lm) over each question's k chunks: questions [b, d], chunks [b, k, d] (unit vectors),
    lm [b, k] the generator's log-likelihoods."""
    log_p = torch.log_softmax((questions[:, None, :] * chunks).sum(-1) / config.retriever_temperature, dim=-1)
    log_q = torch.log_softmax(lm.to(log_p.device, log_p.dtype) / config.lm_temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def train_retriever_lsr(generator, index, items: list[QAItem], out_dir, config: LSRConfig | None = None, *,
                        overwrite: bool = False) -> dict:
    """Fine-tune `index`'s encoder so its choice among each question's top-k chunks follows `generator`'s."""
    from retro_peft.generation import Passage

    config = config or LSRConfig()
    config.validate()
    out = Path(out_dir).absolute()
    check_output_folder(out, overwrite)
    items = [it for it in items if it.answerable]
    if not items:
        raise InputError("LM-supervised training needs questions with answers (the generator scores the answer)")
    start = time.perf_counter()
    hits = index.search_many([it.question for it in items], k=config.k, mode="dense")
    chunks = [[Passage.from_hit(h) for h in row] for row in hits]
    keep = [i for i, row in enumerate(chunks) if len(row) == config.k]
    items, chunks = [items[i] for i in keep], [chunks[i] for i in keep]
    lm = torch.tensor(lm_scores(generator, items, chunks))  # [questions, k]
    scoring_seconds = time.perf_counter() - start

    model = copy.deepcopy(index.encoder.model)  # the index's own encoder stays as it is
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    order = list(range(len(items)))
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    losses = []
    for _ in range(config.epochs):
        rng.shuffle(order)
        for b in range(0, len(order), config.batch_size):
            batch = order[b:b + config.batch_size]
            q = embed_with_grad(model, [items[i].question for i in batch])
            c = embed_with_grad(model, [p.text for i in batch for p in chunks[i]]).view(len(batch), config.k, -1)
            loss = lsr_loss(q, c, lm[batch], config)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.save(str(tmp))
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tail = max(1, len(losses) // 10)
    agree = float((lm.argmax(-1) == 0).float().mean())  # how often the generator's favourite was ranked first
    return {"questions": len(items), "k": config.k, "steps": len(losses),
            "scoring_seconds": round(scoring_seconds, 2), "seconds": round(time.perf_counter() - start, 2),
            "loss": {"first": round(sum(losses[:tail]) / tail, 4), "last": round(sum(losses[-tail:]) / tail, 4)},
            "lm_best_is_retrievers_first": round(agree, 4), "config": asdict(config), "out": str(out)}

