"""Contrastive fine-tuning of an index's encoder on a QA file's (question, gold chunk) pairs.

Each question with `gold_doc_ids` gives one pair: the question and a chunk of
one of its gold documents (the first that holds an answer string, else the one
sharing most answer words, else the first). The loss is sentence-transformers'
MultipleNegativesRankingLoss: the other pairs' chunks in a batch are the
negatives, plus `hard_negatives` chunks a question mined from the index
(`mine_hard_negatives`: the encoder's nearest chunks, less every chunk of the
question's own gold documents, which are not negatives). Batches hold no text
twice (NO_DUPLICATES): two questions about one paragraph in one batch would
each count the other's positive as a negative.

The result is a plain sentence-transformers folder, written whole or not at
all (a temporary sibling folder renamed into place). Point an index at it with
`Index.reembed` (`retro-peft index reembed NAME --encoder DIR`).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from retro_peft.errors import InputError, RetroPeftError
from retro_peft.index.chunking import Chunk
from retro_peft.qa import QAItem
from retro_peft.storage import check_parent_writable, replace_folder
from retro_peft.text import normalize_answer

log = logging.getLogger(__name__)

# Mined candidates per question beyond `hard_negatives`: room for the ones the gold filter removes.
_MINING_SLACK = 10


@dataclass
class RetrieverTrainConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    hard_negatives: int = 1  # mined negatives per question; 0: in-batch negatives only
    seed: int = 0
    max_seq_length: int | None = None  # None: the encoder's own

    def validate(self) -> None:
        def positive_int(name: str, value, minimum: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")

        positive_int("epochs", self.epochs)
        positive_int("batch_size", self.batch_size, 1 if self.hard_negatives else 2)
        positive_int("hard_negatives", self.hard_negatives, 0)
        positive_int("seed", self.seed, 0)
        if self.max_seq_length is not None:
            positive_int("max_seq_length", self.max_seq_length)
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not self.lr > 0:
            raise InputError(f"lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.warmup_ratio, (int, float)) or not 0 <= self.warmup_ratio < 1:
            raise InputError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")


@dataclass(frozen=True)
class Pair:
    question: str
    positive: str
    gold_doc_ids: frozenset[str]


def training_pairs(index, items: list[QAItem]) -> list[Pair]:
    """(question, gold chunk text) for each answerable question with gold documents; refuses unknown gold ids."""
    if not items:
        raise InputError("no questions to train the retriever on")
    usable = [it for it in items if it.gold_doc_ids and not it.is_impossible]
    if not usable:
        raise InputError("no answerable question has gold_doc_ids: retriever training needs each question's "
                         "gold document(s)")
    by_doc: dict[str, list[Chunk]] = {}
    for c in index.chunks():
        by_doc.setdefault(c.doc_id, []).append(c)
    pairs, seen = [], set()
    for item in usable:
        missing = next((d for d in item.gold_doc_ids if d not in by_doc), None)
        if missing is not None:
            raise InputError(f"gold document {missing!r} of question {item.id!r} is not in index {index.path}")
        chunk = _gold_chunk(item, [c for d in dict.fromkeys(item.gold_doc_ids) for c in by_doc[d]])
        key = (item.question, chunk.text)
        if key not in seen:
            seen.add(key)
            pairs.append(Pair(item.question, chunk.text, frozenset(item.gold_doc_ids)))
    return pairs


def _gold_chunk(item: QAItem, candidates: list[Chunk]) -> Chunk:
    answers = [a.lower() for a in item.answers if a.strip()]
    for c in candidates:
        text = c.text.lower()
        if any(a in text for a in answers):
            return c
    words = {w for a in answers for w in normalize_answer(a).split()}
    if words and len(candidates) > 1:
        # max keeps the first of equals: with no answer word anywhere, the first chunk
        return max(candidates, key=lambda c: len(words.intersection(normalize_answer(c.text).split())))
    return candidates[0]


def corpus_documents(index) -> tuple[list[str], dict[str, set[str]]]:
    """The index's distinct chunk texts, and the documents each text belongs to (what a negative must avoid)."""
    docs_of: dict[str, set[str]] = {}
    for c in index.chunks():
        docs_of.setdefault(c.text, set()).add(c.doc_id)
    return list(docs_of), docs_of


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that is a file, another kind of folder, or a model (unless overwrite)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} is a file; give a folder for the trained encoder")
    if out.is_dir() and any(out.iterdir()):
        if not ((out / "modules.json").exists() or (out / "config.json").exists()):
            raise InputError(f"{out} exists and is not a sentence-transformers model folder; choose another")
        if not overwrite:
            raise InputError(f"{out} already holds a model: use overwrite (--overwrite) to replace it")
    check_parent_writable(out, "output folder")


def train_retriever(index, items: list[QAItem], out_dir: str | Path, config: RetrieverTrainConfig | None = None,
                    *, overwrite: bool = False) -> dict:
    """Fine-tune `index`'s encoder on `items` and save it at `out_dir`; returns a summary (pairs, steps, seconds,
    loss, fingerprints, out). Every input check runs before the encoder is loaded or anything is written."""
    config = config or RetrieverTrainConfig()
    config.validate()
    out = Path(out_dir).absolute()
    check_output_folder(out, overwrite)
    pairs = training_pairs(index, items)
    corpus, docs_of = corpus_documents(index)
    if config.hard_negatives:
        for p in pairs:
            outside = sum(1 for t in corpus if not docs_of[t] & p.gold_doc_ids)
            if outside < config.hard_negatives:
                raise InputError(f"{config.hard_negatives} hard negatives per question, but the index holds only "
                                 f"{outside} chunks outside the gold documents of {p.question!r}; lower hard_negatives")

    start = time.perf_counter()
    base = index.encoder  # loads and checks it: the encoder that built the index
    model = copy.deepcopy(base.model)  # the index's own encoder stays as it is
    if config.max_seq_length is not None:
        model.max_seq_length = config.max_seq_length
    negatives = mined_negatives(model, pairs, corpus, docs_of, config) if config.hard_negatives else None
    log.info("training the retriever on %d pairs (%s hard negatives each)", len(pairs), config.hard_negatives)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    work = Path(tempfile.mkdtemp(prefix="retro-peft-retriever-"))
    try:
        state = _fit(model, pairs, negatives, config, work)
        model.save(str(tmp))
        from retro_peft.index.embedding import Encoder

        trained = Encoder(str(tmp))  # what a user loads: the saved folder, not the model in memory
        if trained.fingerprint == base.fingerprint:
            raise RetroPeftError("the trained encoder has the same fingerprint as the one it started from (did "
                                 "training change no weight?); nothing written")
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    losses = [e["loss"] for e in state.log_history if "loss" in e]
    tail = max(1, len(losses) // 10)
    return {
        "pairs": len(pairs), "questions": len({p.question for p in pairs}),
        "hard_negatives": config.hard_negatives, "steps": int(state.global_step),
        "seconds": round(time.perf_counter() - start, 2),
        "loss": {"first": round(sum(losses[:tail]) / tail, 4), "last": round(sum(losses[-tail:]) / tail, 4)}
        if losses else None,
        "base_encoder": base.describe(), "fingerprint": trained.fingerprint, "config": asdict(config),
        "out": str(out),
    }


def mined_negatives(model, pairs: list[Pair], corpus: list[str], docs_of: dict[str, set[str]],
               config: RetrieverTrainConfig) -> list[list[str]]:
    """`hard_negatives` chunk texts per pair: the nearest mined ones outside its gold documents, topped up with
    random such chunks where mining found too few."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    n = config.hard_negatives
    mined: dict[tuple[str, str], list[str]] = {}
    want = min(n + _MINING_SLACK, len(corpus) - 2)
    if want >= 1:
        data = Dataset.from_dict({"anchor": [p.question for p in pairs], "positive": [p.positive for p in pairs]})
        options = dict(corpus=corpus, num_negatives=want, range_max=min(len(corpus), want + 10), verbose=False)
        try:
            rows = mine_hard_negatives(data, model, output_format="n-tuple", **options)
        except TypeError:  # sentence-transformers < 4: as_triplets=False is the n-tuple format
            rows = mine_hard_negatives(data, model, as_triplets=False, **options)
        columns = [f"negative_{i}" for i in range(1, want + 1)]
        for row in rows:
            mined[(row["anchor"], row["positive"])] = [row[c] for c in columns]
    rng = random.Random(config.seed)
    out = []
    for p in pairs:
        picked = [t for t in mined.get((p.question, p.positive), []) if not docs_of[t] & p.gold_doc_ids][:n]
        if len(picked) < n:
            rest = [t for t in corpus if t not in picked and not docs_of[t] & p.gold_doc_ids]
            picked += rng.sample(rest, n - len(picked))
        out.append(picked)
    return out


def _fit(model, pairs: list[Pair], negatives: list[list[str]] | None, config: RetrieverTrainConfig, work: Path):
    import torch

    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
        from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import MultipleNegativesRankingLoss
        from sentence_transformers.training_args import BatchSamplers

    columns = {"anchor": [p.question for p in pairs], "positive": [p.positive for p in pairs]}
    for i in range(config.hard_negatives if negatives else 0):
        columns[f"negative_{i + 1}"] = [row[i] for row in negatives]
    dataset = Dataset.from_dict(columns)
    # Warm-up in whole steps (floor): a run of a few steps gets none rather than a first step at lr 0, and
    # transformers 4 (warmup_ratio) and 5 (a float warmup_steps) agree on an int. The batch count is the
    # sampler's nominal one: NO_DUPLICATES may make a few more, smaller batches.
    warmup = int(config.warmup_ratio * config.epochs * math.ceil(len(pairs) / config.batch_size))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work), num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr, seed=config.seed, batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no",
        logging_strategy="steps", logging_steps=1, report_to="none", disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(), warmup_steps=warmup,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                                         loss=MultipleNegativesRankingLoss(model))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints every step's loss on stdout, where the CLI prints JSON
    trainer.train()
    return trainer.state


def embed_with_grad(model, texts: list[str]):
    """Unit vectors of `texts` from a sentence-transformers model, with gradients (its `encode` has none)."""
    import torch

    tokenize = getattr(model, "preprocess", None) or model.tokenize  # `tokenize` is deprecated in s-t 6
    features = tokenize(texts)
    device = next(model.parameters()).device
    features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
    return torch.nn.functional.normalize(model(features)["sentence_embedding"], dim=-1)
