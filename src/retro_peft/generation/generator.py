"""Retrieve -> prompt -> generate, one request or a batch, with one model and one index."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading

from retro_peft import tracing
from retro_peft.errors import InputError
from retro_peft.generation.answers import Answer
from retro_peft.generation.decode import StaticDecode
from retro_peft.generation.grammar import JsonConstraint
from retro_peft.generation.answerability import AnswerabilityHead
from retro_peft.generation.history import REWRITE_TOKENS, clean_rewrite, concat_queries, rewrite_ids
from retro_peft.generation.prompt import (Passage, Prompt, RetrievalConfig, SearchOptions, Turn, build_prompt,
                                          check_history, with_choices)
from retro_peft.generation.runner import BatchRunner, Row
from retro_peft.generation.sampling import SamplingConfig

log = logging.getLogger(__name__)


class Generator:
    """Answer questions from an index with a (PEFT-wrapped or plain) causal LM."""

    def __init__(self, model, tokenizer, index=None, retrieval: RetrievalConfig | None = None, *,
                 max_new_tokens: int = 24, batch_size: int = 8, compile_decode: bool = False, kv_cache=None,
                 answerability: AnswerabilityHead | None = None, choices: tuple[str, ...] = ()):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.tokenizer = tokenizer
        self.index = index
        self.retrieval = retrieval or RetrievalConfig()
        self.max_new_tokens = max_new_tokens
        # answerability: abstain below this calibrated head's threshold; choices: every answer is one of these
        # (a domain's declared choices; a question's own, given to answer_many, come first)
        self.answerability = answerability
        self.choices = tuple(choices)
        # compile_decode (CUDA): each decode step one CUDA-graph replay; the first batch of a shape compiles
        self.runner = BatchRunner(model, tokenizer, batch_size=batch_size,
                                  static=StaticDecode(model) if compile_decode else None)
        # kv_cache: a FrozenKVCache of `index` for this model; prompts then prefill only their question
        self.kv_cache = None if kv_cache is None else kv_cache.attach(model)
        if self.kv_cache is not None:
            self.kv_cache.check(index=index, tokenizer=tokenizer, retrieval=self.retrieval)
        if answerability is not None and answerability.layout != self.layout:
            log.warning("the answerability head was calibrated on prompts in the %s layout and answers in the %s "
                        "layout, where its scores shift: its answer rate is not the one it was fitted for (refit it "
                        "there: retro-peft calibrate ADAPTER --kv-cache FILE ...)", answerability.layout, self.layout)

    @property
    def layout(self) -> str:
        """How prompts run: "full" (a full prefill) or the frozen KV cache's layout."""
        return self.kv_cache.layout if self.kv_cache is not None else "full"

    @property
    def model(self):
        return self.runner.model

    @model.setter
    def model(self, model) -> None:  # the bank wraps its base model in a PeftModel on the first adapter load
        self.runner.model = model

    @property
    def static(self) -> StaticDecode | None:
        return self.runner.static

    @static.setter
    def static(self, static: StaticDecode | None) -> None:
        self.runner.static = static

    @property
    def batch_size(self) -> int:
        return self.runner.batch_size

    @property
    def device(self):
        return next(self.model.parameters()).device

    def retrieve(self, questions: list[str], search: SearchOptions | None = None,
                 history: list | None = None) -> list[list[Passage]]:
        """Each question's passages; a follow-up (with `history`) searches by the conversation as the
        strategy says (`search.history`, else `RetrievalConfig.history`; see `generation.history`)."""
        search = search or SearchOptions()
        k = self.retrieval.k if search.k is None else search.k
        if self.index is None or k == 0:
            return [[] for _ in questions]
        mode = search.mode or self.retrieval.mode
        histories = self._histories(questions, history)
        strategy = search.history or self.retrieval.history
        with tracing.span("retrieve", questions=len(questions), k=k, mode=mode, history=strategy):
            queries, vectors = list(questions), None
            if strategy != "none" and any(histories):
                rewrites = self.standalone(questions, histories) if strategy == "rewrite" else None
                queries, vectors = concat_queries(self.index, questions, histories, mode, rewrites)
            hits = self.index.search_many(queries, k=k, mode=mode, filters=search.filter_dict(),
                                          query_vectors=vectors)
        return [[Passage.from_hit(h) for h in row] for row in hits]

    def standalone(self, questions: list[str], histories: list[tuple[Turn, ...]]) -> list[str | None]:
        """Each follow-up rewritten into a standalone question by the base model; None for a question
        without history, or when the reply is not a question."""
        at = [i for i, h in enumerate(histories) if h]
        rows = [Row(Prompt(rewrite_ids(self.tokenizer, questions[i], histories[i], self.retrieval.template), "",
                           []), self.retrieval.abstention) for i in at]
        disable = getattr(self.model, "disable_adapter", None)  # a PeftModel: answer as the base model
        with disable() if disable is not None else contextlib.nullcontext():
            answers = self.runner.run(rows, SamplingConfig(max_new_tokens=REWRITE_TOKENS))
        out: list[str | None] = [None] * len(questions)
        for i, a in zip(at, answers):
            out[i] = clean_rewrite(a.text)
        return out

    @staticmethod
    def _histories(questions: list[str], history: list | None) -> list[tuple[Turn, ...]]:
        if history is None:
            return [() for _ in questions]
        if len(history) != len(questions):
            raise InputError(f"{len(history)} histories for {len(questions)} questions")
        return [check_history(h) for h in history]

    def prompts(self, questions: list[str], passages: list[list[Passage]] | None = None,
                search: SearchOptions | None = None, choices: list | None = None,
                history: list | None = None) -> list[Prompt]:
        """Prompts as the model sees them (retrieval uses the bare questions, the prompt lists the choices),
        after each conversation's earlier turns (`history`: per question, its turns, oldest first)."""
        histories = self._histories(questions, history)
        passages = self.retrieve(questions, search, histories) if passages is None else passages
        shown = [with_choices(q, c) for q, c in zip(questions, self._choices(questions, choices))]
        return [build_prompt(self.tokenizer, q, p, self.retrieval, history=h)
                for q, p, h in zip(shown, passages, histories)]

    def _choices(self, questions: list[str], choices: list | None) -> list[tuple[str, ...]]:
        if choices is not None and len(choices) != len(questions):
            raise InputError(f"{len(choices)} choice lists for {len(questions)} questions")
        if any(isinstance(c, str) for c in choices or ()):
            raise InputError("each question's choices must be a list of strings, not one string")
        out = [tuple(c) if c else self.choices for c in (choices or [None] * len(questions))]
        for c in out:
            if c and (len(set(c)) < 2 or not all(isinstance(x, str) and x.strip() for x in c)):
                raise InputError(f"choices must be at least two different non-empty strings, got {list(c)!r}")
        return out

    @staticmethod
    def _constraints(questions: list[str], choices: list | None, constraints: list | None) -> list:
        """Each question's JSON constraint (None: free or a choice answer). A JSON answer replaces the default
        choices; a question's own choices and a constraint together are refused."""
        if constraints is None:
            return [None] * len(questions)
        if len(constraints) != len(questions):
            raise InputError(f"{len(constraints)} constraints for {len(questions)} questions")
        for c, x in zip(constraints, choices or [None] * len(questions)):
            if c is not None and not isinstance(c, JsonConstraint):
                raise InputError(f"a constraint is a JsonConstraint, got {type(c).__name__}")
            if c is not None and x:
                raise InputError("give choices or a JSON constraint for a question, not both")
        return list(constraints)

    def rows(self, questions: list[str], passages: list[list[Passage]] | None = None,
             search: SearchOptions | None = None, choices: list | None = None,
             history: list | None = None, constraints: list | None = None) -> list[Row]:
        """The questions ready to decode: with a frozen KV cache, as it runs them (stored segments + tail;
        a question with earlier turns is prefilled in full: the cache's segments start the prompt)."""
        for q in questions:
            if not isinstance(q, str) or not q.strip():
                raise InputError("the question is empty")
        constraints = self._constraints(questions, choices, constraints)
        choices = [() if c is not None else x for c, x in zip(constraints, self._choices(questions, choices))]
        histories = self._histories(questions, history)
        extra = {"answerability": self.answerability, "cites": self.retrieval.citations}
        abstention = self.retrieval.abstention
        passages = self.retrieve(questions, search, histories) if passages is None else passages
        # rows the frozen KV cache runs (no earlier turns: its stored head starts the prompt) get its prompts;
        # the others an ordinary one, built once
        cached_at = [i for i, h in enumerate(histories) if not h] if self.kv_cache is not None else []
        plain_at = sorted(set(range(len(questions))) - set(cached_at))
        rows: list = [None] * len(questions)
        plain = self.prompts([questions[i] for i in plain_at], [passages[i] for i in plain_at], search,
                             [choices[i] for i in plain_at], [histories[i] for i in plain_at]) if plain_at else []
        for i, p in zip(plain_at, plain):
            rows[i] = Row(p, abstention, choices=choices[i], constraint=constraints[i], **extra)
        if cached_at:
            shown = [with_choices(questions[i], choices[i]) for i in cached_at]
            cached = self.kv_cache.prompts(self.tokenizer, shown, [passages[i] for i in cached_at], self.retrieval)
            for i, p in zip(cached_at, cached):
                rows[i] = Row(p.prompt, abstention, self.kv_cache, p.keys, p.tail_ids, choices=choices[i],
                              constraint=constraints[i], **extra)
        return rows

    def sampling(self, sampling: SamplingConfig | None = None) -> SamplingConfig:
        return sampling or SamplingConfig(max_new_tokens=self.max_new_tokens)

    def answer(self, question: str, *, passages: list[Passage] | None = None,
               sampling: SamplingConfig | None = None, on_text=None, choices=None, history=None) -> Answer:
        """One answer; `on_text(delta)` streams its text as it is generated; `choices`: answer one of these;
        `history`: the conversation's earlier turns ({role, content}, oldest first)."""
        stream = None if on_text is None else (lambda _row, delta: on_text(delta))
        return self.answer_many([question], passages=None if passages is None else [passages], sampling=sampling,
                                on_text=stream, choices=None if choices is None else [choices],
                                history=None if history is None else [history])[0]

    def stream(self, question: str, *, sampling: SamplingConfig | None = None):
        """Yield the answer's text pieces as tokens are produced, then the final `Answer`."""
        return stream_answer(lambda on_text: self.answer(question, sampling=sampling, on_text=on_text))

    def answer_many(self, questions: list[str], *, passages: list[list[Passage]] | None = None,
                    sampling: SamplingConfig | None = None, search: SearchOptions | None = None, on_text=None,
                    cancelled=None, choices: list | None = None, history: list | None = None,
                    constraints: list | None = None) -> list[Answer]:
        """`choices`: per question, the strings its answer must be one of (None or empty: the default);
        `history`: per question, its conversation's earlier turns (None or empty: none);
        `constraints`: per question, the `JsonConstraint` its answer is decoded under (None: none)."""
        if isinstance(questions, str):
            raise InputError("answer_many takes a list of questions")
        return self.runner.run(self.rows(questions, passages, search, choices, history, constraints),
                               self.sampling(sampling),
                               on_text=on_text, cancelled=cancelled)


def stream_answer(run):
    """Turn a callback-streaming call `run(on_text) -> Answer` into an iterator of pieces, then the Answer."""
    pieces: queue.Queue = queue.Queue()
    result: dict = {}

    def work():
        try:
            result["answer"] = run(pieces.put)
        except BaseException as e:  # re-raised in the consumer's thread
            result["error"] = e
        finally:
            pieces.put(None)

    threading.Thread(target=work, daemon=True).start()
    while (piece := pieces.get()) is not None:
        yield piece
    if "error" in result:
        raise result["error"]
    yield result["answer"]
