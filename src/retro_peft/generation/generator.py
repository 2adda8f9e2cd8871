"""Retrieve -> prompt -> generate, one request or a batch, with one model and one index."""

from __future__ import annotations

import queue
import threading

from retro_peft.errors import InputError
from retro_peft.generation.answers import Answer
from retro_peft.generation.decode import StaticDecode
from retro_peft.generation.prompt import Passage, Prompt, RetrievalConfig, SearchOptions, build_prompt
from retro_peft.generation.runner import BatchRunner, Row
from retro_peft.generation.sampling import SamplingConfig


class Generator:
    """Answer questions from an index with a (PEFT-wrapped or plain) causal LM."""

    def __init__(self, model, tokenizer, index=None, retrieval: RetrievalConfig | None = None, *,
                 max_new_tokens: int = 24, batch_size: int = 8, compile_decode: bool = False, kv_cache=None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.tokenizer = tokenizer
        self.index = index
        self.retrieval = retrieval or RetrievalConfig()
        self.max_new_tokens = max_new_tokens
        # compile_decode (CUDA): each decode step one CUDA-graph replay; the first batch of a shape compiles
        self.runner = BatchRunner(model, tokenizer, batch_size=batch_size,
                                  static=StaticDecode(model) if compile_decode else None)
        # kv_cache: a FrozenKVCache of `index` for this model; prompts then prefill only their question
        self.kv_cache = None if kv_cache is None else kv_cache.attach(model)
        if self.kv_cache is not None:
            self.kv_cache.check(index=index, tokenizer=tokenizer, retrieval=self.retrieval)

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

    def retrieve(self, questions: list[str], search: SearchOptions | None = None) -> list[list[Passage]]:
        search = search or SearchOptions()
        k = self.retrieval.k if search.k is None else search.k
        if self.index is None or k == 0:
            return [[] for _ in questions]
        hits = self.index.search_many(list(questions), k=k, mode=search.mode or self.retrieval.mode,
                                      filters=search.filter_dict())
        return [[Passage.from_hit(h) for h in row] for row in hits]

    def prompts(self, questions: list[str], passages: list[list[Passage]] | None = None,
                search: SearchOptions | None = None) -> list[Prompt]:
        passages = self.retrieve(questions, search) if passages is None else passages
        return [build_prompt(self.tokenizer, q, p, self.retrieval) for q, p in zip(questions, passages)]

    def rows(self, questions: list[str], passages: list[list[Passage]] | None = None,
             search: SearchOptions | None = None) -> list[Row]:
        """The questions ready to decode: with a frozen KV cache, as it runs them (stored segments + tail)."""
        for q in questions:
            if not isinstance(q, str) or not q.strip():
                raise InputError("the question is empty")
        abstention = self.retrieval.abstention
        if self.kv_cache is None:
            return [Row(p, abstention) for p in self.prompts(questions, passages, search)]
        passages = self.retrieve(questions, search) if passages is None else passages
        return [Row(c.prompt, abstention, self.kv_cache, c.keys, c.tail_ids)
                for c in self.kv_cache.prompts(self.tokenizer, questions, passages, self.retrieval)]

    def sampling(self, sampling: SamplingConfig | None = None) -> SamplingConfig:
        return sampling or SamplingConfig(max_new_tokens=self.max_new_tokens)

    def answer(self, question: str, *, passages: list[Passage] | None = None,
               sampling: SamplingConfig | None = None, on_text=None) -> Answer:
        """One answer; `on_text(delta)` streams its text as it is generated."""
        stream = None if on_text is None else (lambda _row, delta: on_text(delta))
        return self.answer_many([question], passages=None if passages is None else [passages], sampling=sampling,
                                on_text=stream)[0]

    def stream(self, question: str, *, sampling: SamplingConfig | None = None):
        """Yield the answer's text pieces as tokens are produced, then the final `Answer`."""
        return stream_answer(lambda on_text: self.answer(question, sampling=sampling, on_text=on_text))

    def answer_many(self, questions: list[str], *, passages: list[list[Passage]] | None = None,
                    sampling: SamplingConfig | None = None, search: SearchOptions | None = None, on_text=None,
                    cancelled=None) -> list[Answer]:
        if isinstance(questions, str):
            raise InputError("answer_many takes a list of questions")
        return self.runner.run(self.rows(questions, passages, search), self.sampling(sampling), on_text=on_text,
                               cancelled=cancelled)


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
