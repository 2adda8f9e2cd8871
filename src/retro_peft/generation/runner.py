"""The one batch runner: prepared rows -> decode passes -> answers.

`Generator.answer_many` (one model, one index) and `AdapterBank.answer_many` (rows of
several domains) both end here. They prepare a `Row` per question (its prompt and,
through a frozen KV cache, the stored segments it starts with); the runner checks
every prompt fits the model, cuts the rows into batches, decodes each and turns the
text into `Answer`s. The bank passes `groups` to split a batch further by adapter
and to put each group's adapters in place around its pass.

The runner does not import the frozen KV cache: a row names the cache object that
holds its segments, and that object assembles the batch's context (`assemble_rows`),
so the generation layer stays below `retro_peft.kvcache`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from retro_peft.generation.answers import Answer, cite, is_abstention
from retro_peft.generation.decode import Generated, generate_batch, stop_token_ids
from retro_peft.generation.prompt import Prompt, check_fits, model_context
from retro_peft.generation.sampling import SamplingConfig


@dataclass
class Row:
    """One question, ready to decode."""

    prompt: Prompt  # the whole prompt: checked against the model's context, counted, cited from
    abstention: str  # the phrase that makes the answer an abstention (its domain's)
    context: object | None = None  # the frozen KV cache holding the segments the row starts with (None: none)
    keys: list[str] = field(default_factory=list)  # those segments, in prompt order
    tail_ids: list[int] | None = None  # what runs through the model after them (None: the whole prompt)

    @property
    def stored(self) -> bool:
        return self.context is not None and bool(self.keys)


# groups(batch rows) -> (rows decoded together, the context their pass runs in), e.g. rows split by adapter
Groups = Callable[[list[int]], Iterable[tuple[list[int], contextlib.AbstractContextManager]]]


class BatchRunner:
    """Decodes rows in batches of `batch_size` with `model` (which its owner may replace between calls)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 8, static=None):
        self.model, self.tokenizer, self.batch_size, self.static = model, tokenizer, batch_size, static
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def run(self, rows: list[Row], sampling: SamplingConfig, *, on_text=None, cancelled=None,
            groups: Groups | None = None) -> list[Answer]:
        """Answers in row order. on_text(row, delta) streams a row's text; cancelled(row) -> bool stops it."""
        check_fits([r.prompt for r in rows], sampling.max_new_tokens, model_context(self.model))
        groups = groups or (lambda batch: [(batch, contextlib.nullcontext())])
        answers: list = [None] * len(rows)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(rows), self.batch_size):
                for group, adapters in groups(list(range(start, min(start + self.batch_size, len(rows))))):
                    sequences, context = self.inputs([rows[r] for r in group])
                    with adapters:
                        done = generate_batch(self.model, self.tokenizer, sequences, stop_ids=self.stop_ids,
                                              pad_id=self.pad_id, sampling=sampling,
                                              on_text=_for_rows(on_text, group), cancelled=_for_rows(cancelled, group),
                                              static=self.static, context=context)
                    for r, generated in zip(group, done):
                        answers[r] = make_answer(rows[r], generated)
        finally:
            self.model.train(was_training)
        return answers

    def inputs(self, rows: list[Row]):
        """What one decode pass runs: each row's token ids, and the stored context they follow (or None).

        Rows with stored segments prefill only their tail; a pass in which no row has any is an ordinary
        one. Rows may come from different caches (rows of different domains): one of them assembles all.
        """
        if not any(r.stored for r in rows):
            return [r.prompt.input_ids for r in rows], None
        sequences = [r.tail_ids if r.stored else r.prompt.input_ids for r in rows]
        device = next(self.model.parameters()).device
        assembler = next(r.context for r in rows if r.stored)
        return sequences, assembler.assemble_rows([(r.context, r.keys if r.stored else []) for r in rows], device)


def _for_rows(callback, group: list[int]):
    """`callback(row, ...)` for a pass over `group`: the pass numbers its rows 0.., the caller by `group`."""
    return None if callback is None else (lambda i, *args: callback(group[i], *args))


def make_answer(row: Row, generated: Generated) -> Answer:
    text = generated.text.strip()
    abstained = is_abstention(text, row.abstention)
    return Answer(text=text, citations=[] if abstained else cite(text, row.prompt.passages), abstained=abstained,
                  prompt_tokens=len(row.prompt.input_ids), completion_tokens=len(generated.tokens),
                  passages=row.prompt.passages, finish_reason=generated.finish_reason)
