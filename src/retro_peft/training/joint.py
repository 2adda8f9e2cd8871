"""Joint training: the adapter's answer loss and the retriever's loss in one run (`train --train-retriever`).

Each optimizer step adds `weight` x the retriever's loss on the step's own questions to the answer loss;
the encoder (a copy of the index's) is a second parameter group of the same AdamW, under the same
schedule, clipped on its own, and saved in every checkpoint, so a resumed run continues both halves.

- contrastive: each question against its gold chunk, the batch's other positives and one mined hard
  negative per question (MultipleNegativesRankingLoss, scale 20), except candidates from the question's
  own gold documents, which are masked rather than counted as negatives;
- lsr: each question's top-k chunks (retrieved once, at the start, by the starting encoder) are scored by
  the adapter being trained, as it is at that step (log p(answer | chunk), no gradient), and the
  encoder's distribution over them is pulled to the generator's (REPLUG's KL; `training.lsr`).

The training examples' passages are retrieved once, before the first step (as RA-DIT's LM fine-tuning
does): the trained retriever serves the adapter at answer time, through the index re-embedded with it
at the end of the run.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from retro_peft.choices import RETRIEVER_SUPERVISIONS, RetrieverSupervision
from retro_peft.errors import InputError
from retro_peft.generation.constrained import choice_logprobs
from retro_peft.index.retriever import (RetrieverTrainConfig, mined_negatives, corpus_documents, embed_with_grad,
                                        training_pairs)
from retro_peft.qa import QAItem
from retro_peft.training.lsr import LSRConfig, lsr_loss, scoring_inputs

MNRL_SCALE = 20.0  # sentence-transformers' MultipleNegativesRankingLoss default: cosine x 20


@dataclass
class JointRetrieverConfig:
    supervision: RetrieverSupervision = "contrastive"
    weight: float = 1.0  # the retriever's loss is added to the answer loss times this
    lr: float = 2e-5  # the encoder's learning rate (the adapter keeps its own)
    max_grad_norm: float = 1.0
    hard_negatives: int = 1  # contrastive: mined negatives per question
    k: int = 4  # lsr: chunks per question
    seed: int = 0

    def validate(self) -> None:
        if self.supervision not in RETRIEVER_SUPERVISIONS:
            raise InputError(f"--train-retriever must be one of {', '.join(RETRIEVER_SUPERVISIONS)}, got {self.supervision!r}")
        for name in ("weight", "lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InputError(f"retriever {name} must be a positive number, got {value!r}")
        if not self.max_grad_norm >= 0:
            raise InputError(f"retriever max_grad_norm must be >= 0, got {self.max_grad_norm!r}")
        if self.supervision == "lsr":
            LSRConfig(k=self.k).validate()
        else:
            RetrieverTrainConfig(hard_negatives=self.hard_negatives, batch_size=1).validate()


class RetrieverObjective:
    """The retriever's half of a joint run: its encoder, its per-question data, and its loss on a batch."""

    def __init__(self, index, items: list[QAItem], config: JointRetrieverConfig, *, tokenizer=None, retrieval=None):
        """Every input check runs here, before the generator is loaded: unknown gold documents, no usable
        question. lsr needs the generator's tokenizer and retrieval settings (its scoring prompts)."""
        config.validate()
        self.config = config
        self.index = index
        self.encoder = copy.deepcopy(index.encoder.model)  # the index's own encoder stays as it is
        self.encoder.train()
        self.start_fingerprint = index.encoder.fingerprint
        self.by_item: dict[str, dict] = {}
        if config.supervision == "contrastive":
            self._prepare_contrastive(items)
        else:
            if tokenizer is None or retrieval is None:
                raise InputError("lsr joint training needs the generator's tokenizer and retrieval settings")
            self._prepare_lsr(items, tokenizer, retrieval)
        if not self.by_item:
            raise InputError(f"no training question can train the retriever ({config.supervision}): it needs "
                             "answerable questions" + (" with gold_doc_ids" if config.supervision == "contrastive"
                                                       else f" with {config.k} retrieved chunks"))

    def _prepare_contrastive(self, items: list[QAItem]) -> None:
        pairs = {p.question: p for p in training_pairs(self.index, items)}  # refuses unknown gold documents
        corpus, self.docs_of = corpus_documents(self.index)
        ordered = list(pairs.values())
        mined = mined_negatives(self.encoder, ordered, corpus, self.docs_of,
                           RetrieverTrainConfig(hard_negatives=self.config.hard_negatives, seed=self.config.seed))
        negatives = {p.question: n for p, n in zip(ordered, mined)}
        for item in items:
            pair = pairs.get(item.question)
            if pair is not None and item.answerable:
                self.by_item[item.id] = {"question": pair.question, "positive": pair.positive,
                                         "negatives": negatives[pair.question], "gold": pair.gold_doc_ids}

    def _prepare_lsr(self, items: list[QAItem], tokenizer, retrieval) -> None:
        from retro_peft.generation import Passage

        usable = [it for it in items if it.answerable]
        hits = self.index.search_many([it.question for it in usable], k=self.config.k, mode="dense") if usable else []
        for item, row in zip(usable, hits):
            if len(row) < self.config.k:
                continue
            chunks = [Passage.from_hit(h) for h in row]
            prompts, targets, _ = scoring_inputs(tokenizer, retrieval, [item], [chunks])
            self.by_item[item.id] = {"question": item.question, "chunks": [p.text for p in chunks],
                                     "prompts": prompts, "targets": targets}

    # -- the training loop's side --------------------------------------------------------------
    def identity(self) -> dict:
        """What a resumed run must share with the run it resumes."""
        return {**asdict(self.config), "start_encoder": self.start_fingerprint}

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def to(self, device) -> RetrieverObjective:
        self.encoder.to(device)
        return self

    def loss(self, item_ids: list[str], generator_model, pad_id: int) -> torch.Tensor | None:
        """The retriever's loss on a batch's questions (None when none of them can train it)."""
        rows = [self.by_item[i] for i in dict.fromkeys(item_ids) if i in self.by_item]
        if not rows:
            return None
        if self.config.supervision == "lsr":
            return self._lsr_loss(rows, generator_model, pad_id)
        return self._contrastive_loss(rows)

    def _contrastive_loss(self, rows: list[dict]) -> torch.Tensor:
        candidates = list(dict.fromkeys([r["positive"] for r in rows] + [n for r in rows for n in r["negatives"]]))
        q = embed_with_grad(self.encoder, [r["question"] for r in rows])
        c = embed_with_grad(self.encoder, candidates)
        scores = (q @ c.T).float() * MNRL_SCALE
        target = torch.tensor([candidates.index(r["positive"]) for r in rows], device=scores.device)
        # A candidate from a question's own gold documents (another question's positive from the same
        # paragraph) is not a negative for it.
        masked = torch.tensor([[bool(self.docs_of[t] & r["gold"]) and t != r["positive"] for t in candidates]
                               for r in rows], device=scores.device)
        return torch.nn.functional.cross_entropy(scores.masked_fill(masked, float("-inf")), target)

    def _lsr_loss(self, rows: list[dict], generator_model, pad_id: int) -> torch.Tensor:
        was_training = generator_model.training
        generator_model.eval()  # no dropout in the scores the retriever is taught
        try:
            lm = [[s for (s,) in choice_logprobs(generator_model, r["prompts"], r["targets"], pad_id)] for r in rows]
        finally:
            generator_model.train(was_training)
        k = self.config.k
        q = embed_with_grad(self.encoder, [r["question"] for r in rows])
        c = embed_with_grad(self.encoder, [t for r in rows for t in r["chunks"]]).view(len(rows), k, -1)
        return lsr_loss(q.float(), c.float(), torch.tensor(lm), LSRConfig(k=k))

    # -- saving -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().contiguous().cpu() for n, t in self.encoder.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.encoder.state_dict()) ^ set(state)
        if missing:
            raise InputError(f"the checkpoint's retriever does not match this run's encoder ({sorted(missing)[:3]})")
        self.encoder.load_state_dict(state)

    def write(self, folder: Path) -> dict:
        """Save the encoder as a sentence-transformers folder inside the adapter being written; its description."""
        from retro_peft.index.embedding import Encoder

        was_training = self.encoder.training
        self.encoder.eval()
        try:
            self.encoder.save(str(folder))
        finally:
            self.encoder.train(was_training)
        trained = Encoder(str(folder))  # what the index will load: the saved folder
        return {"fingerprint": trained.fingerprint, "dim": trained.dim, "supervision": self.config.supervision,
                "start_encoder": self.start_fingerprint}
