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

A row with `choices` is answered by scoring them (`constrained.choice_logprobs`), not by
free decoding; a row with an `answerability` head abstains when its prompt scores below
the head's threshold (see `answerability`). Both kinds of row may share a batch. A row with a `constraint`
(a JSON answer) is decoded under its grammar's token masks (`grammar`), beside free rows in the same pass.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from retro_peft.generation.answerability import AnswerabilityHead, prompt_end_hook, prompt_features
from retro_peft.generation.answers import Answer, cite, is_abstention, split_citations
from retro_peft.generation.constrained import choice_logprobs
from retro_peft.generation.decode import Generated, generate_batch, stop_token_ids
from retro_peft.generation.grammar import Grammars, JsonConstraint, json_strings
from retro_peft.generation.prompt import Prompt, check_fits, encode, model_context
from retro_peft.generation.sampling import SamplingConfig

# Tokens decoded after a chosen choice to read the citation markers a trained adapter puts there ("yes [2]").
CITATION_TOKENS = 8


@dataclass
class Row:
    """One question, ready to decode."""

    prompt: Prompt  # the whole prompt: checked against the model's context, counted, cited from
    abstention: str  # the phrase that makes the answer an abstention (its domain's)
    context: object | None = None  # the frozen KV cache holding the segments the row starts with (None: none)
    keys: list[str] = field(default_factory=list)  # those segments, in prompt order
    tail_ids: list[int] | None = None  # what runs through the model after them (None: the whole prompt)
    choices: tuple[str, ...] = ()  # the answer is exactly one of these (scored, not decoded)
    answerability: AnswerabilityHead | None = None  # abstain below its threshold (None: only by the phrase)
    cites: bool = False  # the model ends answers with citation markers (read after a chosen choice)
    constraint: JsonConstraint | None = None  # the answer is this JSON (decoded under its grammar's masks)

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

    @property
    def grammars(self) -> Grammars:
        """JSON constraints compiled for this tokenizer and the model's vocabulary (compiled once each)."""
        return Grammars(self.tokenizer, self.model.config.vocab_size, self.stop_ids)

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
                    with adapters:
                        free = [r for r in group if not rows[r].choices]
                        chosen = [r for r in group if rows[r].choices]
                        if free:
                            self._decode(rows, free, sampling, on_text, cancelled, answers)
                        if chosen:
                            self._choose(rows, chosen, on_text, answers)
        finally:
            self.model.train(was_training)
        return answers

    def _scoring(self, rows: list[Row], group: list[int], mask_abstention: bool):
        """(a context reading the answerability scores from the prefill, {position in group: score})."""
        scores: dict[int, float] = {}
        heads = [rows[r].answerability for r in group]
        if all(h is None for h in heads):
            return contextlib.nullcontext(), scores

        def on_prefill(hidden, logits):
            for i, head in enumerate(heads):
                if head is None:
                    continue
                features = prompt_features(hidden[i:i + 1], logits[i:i + 1], head.abstain_token)
                scores[i] = float(head.scores(features)[0])
                if mask_abstention and scores[i] >= head.threshold:  # the score says answer: the decoder may not abstain
                    logits[i, head.abstain_token] = -math.inf
            return logits

        return prompt_end_hook(self.model, on_prefill), scores

    def _decode(self, rows, group, sampling, on_text, cancelled, answers) -> None:
        sequences, context = self.inputs([rows[r] for r in group])
        hook, scores = self._scoring(rows, group, mask_abstention=True)

        def abstains(i: int) -> bool:  # a JSON row answers in its schema: its score is reported, not acted on
            row = rows[group[i]]
            return i in scores and scores[i] < row.answerability.threshold and row.constraint is None

        def cancel(i: int) -> bool:  # a row the score abstains on stops before its first token
            return abstains(i) or (cancelled is not None and cancelled(group[i]))

        constraints = [rows[r].constraint for r in group]
        # (xgrammar is imported only for a batch that has a JSON row: plain answering does not need it installed)
        grammar = (self.grammars.masks(constraints, budget=sampling.max_new_tokens)
                   if any(c is not None for c in constraints) else None)
        with hook:
            done = generate_batch(self.model, self.tokenizer, sequences, stop_ids=self.stop_ids, pad_id=self.pad_id,
                                  sampling=sampling, on_text=_for_rows(on_text, group), cancelled=cancel,
                                  static=self.static, context=context, grammar=grammar)
        for i, (r, generated) in enumerate(zip(group, done)):
            if abstains(i):
                answers[r] = abstained(rows[r], scores[i])
                if on_text is not None:
                    on_text(r, rows[r].abstention)
            else:
                answers[r] = make_answer(rows[r], generated)
                answers[r].answerability = scores.get(i)

    def _choose(self, rows, group, on_text, answers) -> None:
        """Answer choice rows: the most likely choice, its citation markers decoded after it if the model cites."""
        prompts = [rows[r].prompt.input_ids for r in group]
        options = [[encode(self.tokenizer, c) for c in rows[r].choices] for r in group]
        hook, scores = self._scoring(rows, group, mask_abstention=False)
        with hook:
            logprobs = choice_logprobs(self.model, prompts, options, self.pad_id)
        picks = [max(range(len(lp)), key=lp.__getitem__) for lp in logprobs]
        keep = [i for i, r in enumerate(group) if not (i in scores and scores[i] < rows[r].answerability.threshold)]
        follow = [i for i in keep if rows[group[i]].cites]
        after: dict[int, str] = {}
        if follow:
            done = generate_batch(self.model, self.tokenizer, [prompts[i] + options[i][picks[i]] for i in follow],
                                  stop_ids=self.stop_ids, pad_id=self.pad_id,
                                  sampling=SamplingConfig(max_new_tokens=CITATION_TOKENS))
            after = {i: g.text for i, g in zip(follow, done)}
        for i, r in enumerate(group):
            row = rows[r]
            if i not in keep:
                answers[r] = abstained(row, scores[i])
                text = row.abstention
            else:
                text = row.choices[picks[i]]
                cited = split_citations(after.get(i, ""), row.prompt.passages)[1]
                answers[r] = Answer(text=text, citations=cite(text, row.prompt.passages, cited),
                                    prompt_tokens=len(row.prompt.input_ids), completion_tokens=len(options[i][picks[i]]),
                                    passages=row.prompt.passages, answerability=scores.get(i),
                                    dropped_turns=row.prompt.dropped_turns)
            if on_text is not None:
                on_text(r, text)

    def inputs(self, rows: list[Row]):
        """What one decode pass runs: each row's token ids, and the stored context they follow (or None).

        Rows with stored segments prefill only their tail; a pass in which no row has any is an ordinary
        one. Rows may come from different caches (rows of different domains): one of them assembles all.
        """
        if not any(r.stored for r in rows):
            return [r.prompt.input_ids for r in rows], None
        sequences = [r.tail_ids if r.stored else r.prompt.input_ids for r in rows]
        assembler = next(r.context for r in rows if r.stored)
        past, mask, sequences = assembler.assemble_rows([(r.context, r.keys if r.stored else []) for r in rows],
                                                        self.model, tails=sequences)
        return sequences, (past, mask)


def _for_rows(callback, group: list[int]):
    """`callback(row, ...)` for a pass over `group`: the pass numbers its rows 0.., the caller by `group`."""
    return None if callback is None else (lambda i, *args: callback(group[i], *args))


def abstained(row: Row, score: float) -> Answer:
    """The answer of a row its answerability score abstains on."""
    return Answer(text=row.abstention, abstained=True, prompt_tokens=len(row.prompt.input_ids),
                  passages=row.prompt.passages, answerability=score, dropped_turns=row.prompt.dropped_turns)


def make_answer(row: Row, generated: Generated) -> Answer:
    if row.constraint is not None:  # the JSON as decoded; its string values are what cites (markers in them too)
        text, abstained = generated.text, False
        cited_text, cited = split_citations(" ".join(json_strings(text)), row.prompt.passages)
    else:
        text, cited = split_citations(generated.text, row.prompt.passages)
        cited_text, abstained = text, is_abstention(text, row.abstention)
    return Answer(text=text, citations=[] if abstained else cite(cited_text, row.prompt.passages, cited),
                  abstained=abstained,
                  dropped_turns=row.prompt.dropped_turns,
                  prompt_tokens=len(row.prompt.input_ids), completion_tokens=len(generated.tokens),
                  passages=row.prompt.passages, finish_reason=generated.finish_reason,
                  logprobs=None if generated.logprobs is None else
                  [(t, lp, top) for t, (lp, top) in zip(generated.tokens, generated.logprobs)])
