"""Calibrated abstention: hold out part of the training questions, fit the answerability head on them.

The held-out questions are answered as at inference (retrieval, the adapter on), but only the
prompt is run: the head reads the last prompt position (`generation.answerability`). They are
held out by document (questions about one paragraph stay together), so the head and its
threshold see prompts the adapter never trained on, as unseen questions will be.
"""

from __future__ import annotations

import hashlib

import torch

from retro_peft.errors import InputError
from retro_peft.generation.answerability import AnswerabilityHead, fit_head, prompt_end_hook, prompt_features
from retro_peft.generation.decode import generate_batch, left_pad
from retro_peft.generation.prompt import encode
from retro_peft.generation.sampling import SamplingConfig
from retro_peft.qa import QAItem

DEFAULT_HELD_OUT = 0.15  # share of the training questions kept for the head and its threshold


def split_held_out(items: list[QAItem], fraction: float = DEFAULT_HELD_OUT, seed: int = 0):
    """(questions to train the adapter on, held-out questions), split by gold document, deterministic."""
    if not 0.0 < fraction < 1.0:
        raise InputError(f"the held-out share must be between 0 and 1, got {fraction!r}")

    def bucket(item: QAItem) -> float:
        group = item.gold_doc_ids[0] if item.gold_doc_ids else item.id
        digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    held = [it for it in items if bucket(it) < fraction]
    kept = [it for it in items if bucket(it) >= fraction]
    if not held or not any(it.answerable for it in held):
        raise InputError(f"holding out {fraction:.0%} of {len(items)} questions by document leaves no answerable "
                         "question to calibrate on; use more questions or a larger held-out share")
    if not any(it.answerable for it in kept):
        raise InputError("after holding out questions for calibration no answerable training question is left")
    return kept, held


@torch.inference_mode()
def answerability_features(generator, items: list[QAItem]) -> torch.Tensor:
    """[questions, hidden + 1]: each question's prompt features, read where `generator` reads them when it answers:
    the first forward of its own decode pass (through its frozen KV cache, in its layout, when it has one) for a
    free answer, the whole prompt's for a choice answer (as `BatchRunner._choose` scores them)."""
    model, runner = generator.model, generator.runner
    abstain_token = encode(generator.tokenizer, generator.retrieval.abstention)[0]
    rows = generator.rows([it.question for it in items], choices=[it.choices for it in items])
    out: list = [None] * len(rows)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), generator.batch_size):
            batch = list(range(start, min(start + generator.batch_size, len(rows))))
            for group in ([i for i in batch if not rows[i].choices], [i for i in batch if rows[i].choices]):
                if not group:
                    continue
                got: list[torch.Tensor] = []
                with prompt_end_hook(model, lambda hidden, logits, got=got: got.append(
                        prompt_features(hidden, logits, abstain_token))):
                    if rows[group[0]].choices:
                        ids, mask = left_pad([rows[i].prompt.input_ids for i in group], runner.pad_id, generator.device)
                        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                              use_cache=False, logits_to_keep=1)
                    else:
                        sequences, context = runner.inputs([rows[i] for i in group])
                        generate_batch(model, generator.tokenizer, sequences, stop_ids=runner.stop_ids,
                                       pad_id=runner.pad_id, sampling=SamplingConfig(max_new_tokens=1), context=context)
                for i, features in zip(group, got[0].cpu()):
                    out[i] = features
    finally:
        model.train(was_training)
    return torch.stack(out)


def calibrate(generator, items: list[QAItem], *, answer_rate: float, seed: int = 0) -> AnswerabilityHead:
    """Fit the head on held-out `items` so that `answer_rate` of answerable questions are answered."""
    features = answerability_features(generator, items)
    abstain_token = encode(generator.tokenizer, generator.retrieval.abstention)[0]
    return fit_head(features, [it.answerable for it in items], abstain_token=abstain_token,
                    answer_rate=answer_rate, seed=seed, layout=generator.layout)
