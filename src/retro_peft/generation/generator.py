"""Retrieve -> prompt -> generate, one request or a batch.

The decode loop is `decode()`: a small explicit loop over `past_key_values`
(prefill the whole left-padded batch once, then one forward per new token for
the whole batch). Keeping it explicit is deliberate: precomputed per-chunk KV
states or a static, compiled decode step can replace pieces of it later.
"""

from __future__ import annotations

import inspect
import re
import string
from dataclasses import dataclass, field

import torch

from retro_peft.adapters.config import RetrievalConfig
from retro_peft.errors import InputError
from retro_peft.generation.prompt import Passage, Prompt, build_prompt, end_of_turn_ids


@dataclass
class Answer:
    text: str
    citations: list[tuple[str, str, str, float]] = field(default_factory=list)  # (chunk_id, doc_id, title, score)
    abstained: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    passages: list[Passage] = field(default_factory=list, repr=False)  # what the prompt held


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def is_abstention(text: str, phrase: str) -> bool:
    """The answer is (or starts with) the abstention phrase, after normalisation."""
    norm, target = normalize_answer(text), normalize_answer(phrase)
    return bool(target) and norm.startswith(target)


def stop_token_ids(tokenizer, model=None) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    im_end = tokenizer.get_vocab().get("<|im_end|>")
    if im_end is not None:
        ids.add(im_end)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return ids


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq):] = 1
    return input_ids.to(device), attention_mask.to(device)


def _cache_kwarg(model) -> str:
    """transformers 5.x names the KV cache argument `cache`; older versions `past_key_values`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


@torch.inference_mode()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           stop_ids: set[int], pad_id: int, do_sample: bool = False, temperature: float = 1.0,
           rng: torch.Generator | None = None) -> list[list[int]]:
    """Greedy (or sampled) decoding of a left-padded batch with a KV cache; returns the new tokens per row."""
    from transformers import DynamicCache

    batch = input_ids.shape[0]
    # Left padding shifts every row; positions must count real tokens only.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    past = DynamicCache()
    cache_kw = _cache_kwarg(model)
    # logits_to_keep=1: the prompt's other positions would cost a full vocabulary projection each.
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=True, logits_to_keep=1, **{cache_kw: past}).logits[:, -1, :]
    stop = torch.tensor(sorted(stop_ids) or [-1], device=input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    out = []
    next_pos = position_ids[:, -1:] + 1
    for _ in range(max_new_tokens):
        if do_sample:
            probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)
            token = torch.multinomial(probs, 1, generator=rng).squeeze(-1)
        else:
            token = logits.argmax(dim=-1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        out.append(token)
        finished |= torch.isin(token, stop)
        # One host sync per token to stop early; cheap next to a forward pass.
        if bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_pos,
                       use_cache=True, **{cache_kw: past}).logits[:, -1, :]
        next_pos = next_pos + 1
    tokens = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(batch)]
    result = []
    for row in tokens:
        kept = []
        for t in row:
            if t in stop_ids:
                break
            kept.append(t)
        result.append(kept)
    return result


class Generator:
    """Answer questions from an index with a (PEFT-wrapped or plain) causal LM."""

    def __init__(self, model, tokenizer, index=None, retrieval: RetrievalConfig | None = None, *,
                 max_new_tokens: int = 24, batch_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.index = index
        self.retrieval = retrieval or RetrievalConfig()
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @property
    def device(self):
        return next(self.model.parameters()).device

    def retrieve(self, questions: list[str]) -> list[list[Passage]]:
        if self.index is None or self.retrieval.k == 0:
            return [[] for _ in questions]
        hits = self.index.search_many(list(questions), k=self.retrieval.k, mode=self.retrieval.mode)
        return [[Passage.from_hit(h) for h in row] for row in hits]

    def prompts(self, questions: list[str], passages: list[list[Passage]] | None = None) -> list[Prompt]:
        passages = self.retrieve(questions) if passages is None else passages
        return [build_prompt(self.tokenizer, q, p, self.retrieval) for q, p in zip(questions, passages)]

    def answer(self, question: str, *, passages: list[Passage] | None = None, do_sample: bool = False) -> Answer:
        return self.answer_many([question], passages=None if passages is None else [passages], do_sample=do_sample)[0]

    def answer_many(self, questions: list[str], *, passages: list[list[Passage]] | None = None,
                    do_sample: bool = False, seed: int = 0) -> list[Answer]:
        if isinstance(questions, str):
            raise InputError("answer_many takes a list of questions")
        prompts = self.prompts(questions, passages)
        rng = torch.Generator(device=self.device).manual_seed(seed) if do_sample else None
        answers: list[Answer] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(prompts), self.batch_size):
                batch = prompts[start:start + self.batch_size]
                input_ids, mask = left_pad([p.input_ids for p in batch], self.pad_id, self.device)
                new_tokens = decode(self.model, input_ids, mask, max_new_tokens=self.max_new_tokens,
                                    stop_ids=self.stop_ids, pad_id=self.pad_id, do_sample=do_sample, rng=rng)
                answers.extend(self._answer(p, t) for p, t in zip(batch, new_tokens))
        finally:
            self.model.train(was_training)
        return answers

    def _answer(self, prompt: Prompt, tokens: list[int]) -> Answer:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        abstained = is_abstention(text, self.retrieval.abstention)
        return Answer(text=text, citations=[] if abstained else cite(text, prompt.passages), abstained=abstained,
                      prompt_tokens=len(prompt.input_ids), completion_tokens=len(tokens), passages=prompt.passages)


def cite(answer: str, passages: list[Passage]) -> list[tuple[str, str, str, float]]:
    """The passages that contain the answer; if none does, every passage the prompt held."""
    norm = normalize_answer(answer)
    hits = [p for p in passages if norm and norm in normalize_answer(p.text)] or list(passages)
    return [(p.chunk_id, p.doc_id, p.title, p.score) for p in hits]
