"""The retrieval settings and the one prompt builder, shared by training and generation.

A prompt is the model's chat template (or a plain fallback) around one user
turn: numbered passages `[1] (title) text`, the question, and the instruction to
answer briefly from the passages or say the abstention phrase. A token budget
covers the whole prompt: passages are dropped or truncated to fit, the question
and instruction never are (and the answer comes after the prompt, outside it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from retro_peft.choices import GROUNDINGS, PROMPT_TEMPLATES, SEARCH_MODES, Grounding, PromptTemplate, SearchMode
from retro_peft.errors import InputError

# Shortest passage tail worth keeping when truncating to the budget.
MIN_PASSAGE_TOKENS = 24


@dataclass
class RetrievalConfig:
    """How prompts are built from the index, for training and for generation alike."""

    k: int = 3  # retrieved passages in the prompt
    distractors: int = 1  # extra random passages from other documents (training only)
    oracle_fraction: float = 0.8  # RAFT's P: share of answerable examples that keep the gold passage
    template: PromptTemplate = "chat"  # "chat" = the model's chat template (plain if it has none), "plain"
    context_tokens: int = 700  # budget for the whole prompt; passages are dropped/truncated to fit
    abstention: str = "I don't know."  # the training target when the passages lack the answer
    mode: SearchMode = "hybrid"  # index search mode
    # Train as the frozen KV cache runs a prompt: each passage computed apart (attending to the template's
    # head, not to the other passages), whole passages only. Training reads it; answering through that
    # layout is the frozen KV cache's choice (Generator(kv_cache=...), a domain's kv_cache), not this flag.
    block_attention: bool = False
    grounding: Grounding = "auto"  # which passages are an item's gold ones in training (see choices.Grounding)
    # Train the answer to end with the markers of the gold passages it used ("... [2]"); `cite` reads them.
    citations: bool = True

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 0:
            raise InputError(f"retrieval k must be an integer >= 0, got {self.k!r}")
        if not isinstance(self.distractors, int) or self.distractors < 0:
            raise InputError(f"distractors must be an integer >= 0, got {self.distractors!r}")
        if not 0.0 <= float(self.oracle_fraction) <= 1.0:
            raise InputError(f"oracle fraction P must be between 0 and 1, got {self.oracle_fraction!r}")
        if self.template not in PROMPT_TEMPLATES:
            raise InputError(f"unknown prompt template {self.template!r}; choose one of {', '.join(PROMPT_TEMPLATES)}")
        if not isinstance(self.context_tokens, int) or self.context_tokens < 32:
            raise InputError(f"context budget must be at least 32 tokens, got {self.context_tokens!r}")
        if not isinstance(self.abstention, str) or not self.abstention.strip():
            raise InputError("the abstention phrase must be a non-empty string")
        if not isinstance(self.block_attention, bool):
            raise InputError(f"block_attention must be true or false, got {self.block_attention!r}")
        if self.grounding not in GROUNDINGS:
            raise InputError(f"unknown grounding {self.grounding!r}; choose one of {', '.join(GROUNDINGS)}")
        if not isinstance(self.citations, bool):
            raise InputError(f"citations must be true or false, got {self.citations!r}")
        if self.mode not in SEARCH_MODES:
            raise InputError(f"unknown search mode {self.mode!r}; choose one of {', '.join(SEARCH_MODES)}")


@dataclass(frozen=True)
class SearchOptions:
    """One request's retrieval settings in place of its domain's (None or empty: the domain's own).

    Frozen and hashable, so requests with equal options can share a decode pass.
    filters: ((field, (accepted values...)), ...), sorted; build it with `SearchOptions.of`.
    """

    k: int | None = None
    mode: str | None = None
    filters: tuple[tuple[str, tuple], ...] = ()

    @classmethod
    def of(cls, k: int | None = None, mode: str | None = None, filters: dict | None = None) -> SearchOptions:
        items = ((name, tuple(v) if isinstance(v, (list, tuple)) else (v,)) for name, v in (filters or {}).items())
        return cls(k, mode, tuple(sorted(items)))

    def filter_dict(self) -> dict | None:
        return {name: list(values) for name, values in self.filters} or None



@dataclass(frozen=True)
class Passage:
    """A retrieved chunk as it appears in a prompt (and in an answer's citations)."""

    chunk_id: str
    doc_id: str
    text: str
    title: str = ""
    score: float = 0.0

    @classmethod
    def from_hit(cls, hit) -> Passage:
        meta = getattr(hit, "metadata", None) or {}
        return cls(chunk_id=str(hit.chunk_id), doc_id=str(hit.doc_id), text=hit.text,
                   title=str(meta.get("title") or ""), score=float(hit.score))


@dataclass
class Prompt:
    input_ids: list[int]
    text: str
    passages: list[Passage]  # those that made it into the prompt, in prompt order (possibly truncated)


def instruction(abstention: str, closed_book: bool = False) -> str:
    if closed_book:
        return f'Answer the question in a few words. If you do not know the answer, reply "{abstention}"'
    return f'Answer the question in a few words, using only the passages. If they do not contain the answer, reply "{abstention}"'


def with_choices(question: str, choices) -> str:
    """The question as the prompt shows it: a choice question lists its choices (training and answering alike)."""
    question = question.strip()
    if not choices:
        return question
    return f"{question}\nAnswer with one of: {', '.join(choices)}."


def passage_marker(number: int) -> str:
    return f"[{number}]"


def passage_body(passage: Passage) -> str:
    """The passage as the prompt shows it after its marker (the frozen KV cache stores these tokens)."""
    title = f"({passage.title}) " if passage.title else ""
    return f" {title}{passage.text.strip()}"


def format_passage(number: int, passage: Passage) -> str:
    return passage_marker(number) + passage_body(passage)


def _user_message(question: str, passage_lines: list[str], abstention: str) -> str:
    parts = []
    if passage_lines:
        parts.append("Passages:\n" + "\n".join(passage_lines))
    parts.append(f"Question: {question.strip()}")
    parts.append(instruction(abstention, closed_book=not passage_lines))
    return "\n\n".join(parts)


def uses_chat_template(tokenizer, template: str) -> bool:
    return template == "chat" and bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, question: str, passages: list[Passage], retrieval: RetrievalConfig) -> str:
    """Prompt text up to where the answer starts."""
    user = _user_message(question, [format_passage(i, p) for i, p in enumerate(passages, 1)], retrieval.abstention)
    if uses_chat_template(tokenizer, retrieval.template):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    return f"{user}\n\nAnswer: "


def encode(tokenizer, text: str) -> list[int]:
    # The template already holds every special token the model needs.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_ids(tokenizer, retrieval: RetrievalConfig) -> list[int]:
    """Tokens that close the answer: the chat turn's end (`<|im_end|>` for SmolLM2) or EOS."""
    if uses_chat_template(tokenizer, retrieval.template):
        im_end = tokenizer.get_vocab().get("<|im_end|>")
        if im_end is not None:
            return [im_end]
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _truncate(tokenizer, passage: Passage, max_tokens: int) -> Passage:
    ids = encode(tokenizer, passage.text)[:max_tokens]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    # Cut at a word boundary so no half word reaches the model.
    if " " in text.strip():
        text = text[: text.rstrip().rfind(" ")]
    return replace(passage, text=text.rstrip() + " ...")


def fit_passages(tokenizer, question: str, passages: list[Passage], retrieval: RetrievalConfig) -> list[Passage]:
    """Keep passages in the given (priority) order while the whole prompt fits the budget.

    The first passage that does not fit is truncated if a useful tail of it
    fits, and everything after it is dropped. The question is never cut: if the
    question alone exceeds the budget, the prompt holds no passages.
    """
    budget = retrieval.context_tokens
    used = len(encode(tokenizer, render(tokenizer, question, [], retrieval)))
    kept: list[Passage] = []
    for passage in passages:
        # "\n[n] (title) text" per passage; +2 covers the newline and the "Passages:" header on the first.
        cost = len(encode(tokenizer, format_passage(len(kept) + 1, passage))) + 2 + (3 if not kept else 0)
        if used + cost <= budget:
            kept.append(passage)
            used += cost
            continue
        room = budget - used - (cost - len(encode(tokenizer, passage.text))) - 2
        if room >= MIN_PASSAGE_TOKENS:
            kept.append(_truncate(tokenizer, passage, room))
        break
    # Per-piece token counts can differ from the joined text's by a token or two:
    # check the real length and shorten from the end until it fits.
    while kept and len(encode(tokenizer, render(tokenizer, question, kept, retrieval))) > budget:
        last = kept[-1]
        n = len(encode(tokenizer, last.text))
        if n - 8 >= MIN_PASSAGE_TOKENS:
            kept[-1] = _truncate(tokenizer, last, n - 8)
        else:
            kept.pop()
    return kept


def build_prompt(tokenizer, question: str, passages: list[Passage], retrieval: RetrievalConfig, *,
                 fitted: bool = False) -> Prompt:
    """Prompt for `question` with `passages` (highest priority first) fitted into the budget.

    `fitted=True` skips the fitting (the caller already fitted and maybe reordered them).
    """
    if not question or not question.strip():
        raise InputError("the question is empty")
    kept = list(passages) if fitted else fit_passages(tokenizer, question, passages, retrieval)
    text = render(tokenizer, question, kept, retrieval)
    return Prompt(input_ids=encode(tokenizer, text), text=text, passages=kept)


def model_context(model) -> int | None:
    """The longest sequence the model was built for (None if its config does not say)."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def check_fits(prompts: list[Prompt], max_new_tokens: int, context: int | None) -> None:
    """Refuse a prompt that, with the tokens to generate, would run past the model's context:
    positions beyond it were never trained (rotary models answer garbage, others fail)."""
    if context is None:
        return
    for prompt in prompts:
        if len(prompt.input_ids) + max_new_tokens > context:
            raise InputError(f"the prompt is {len(prompt.input_ids)} tokens; with {max_new_tokens} new tokens it "
                             f"exceeds the model's context of {context} tokens (shorten the question, or lower "
                             f"max_new_tokens / context_tokens)")
