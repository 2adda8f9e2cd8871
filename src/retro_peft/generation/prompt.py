"""The retrieval settings and the one prompt builder, shared by training and generation.

A prompt is the model's chat template (or a plain fallback) around one user
turn: numbered passages `[1] (title) text`, the question, and the instruction to
answer briefly from the passages or say the abstention phrase. A token budget
covers the whole prompt: passages are dropped or truncated to fit, the question
and instruction never are (and the answer comes after the prompt, outside it).

In a conversation the earlier turns come before that user turn (system messages
first, as the system prompt). Passages get their share of the budget first (all
of it but `history_tokens`, which the turns may use), then the newest turns fill
what is left; the oldest turns are dropped first, the question never is.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from retro_peft.choices import GROUNDINGS, HISTORY_STRATEGIES, ROLES, HistoryStrategy, PROMPT_TEMPLATES, SEARCH_MODES, Grounding, PromptTemplate, SearchMode
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
    # Conversations: how a follow-up's search query is built (see choices.HistoryStrategy), and the part of
    # the budget passages leave to earlier turns when there are any (at most half of it).
    history: HistoryStrategy = "none"
    history_tokens: int = 160

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
        if self.history not in HISTORY_STRATEGIES:
            raise InputError(f"unknown history strategy {self.history!r}; choose one of {', '.join(HISTORY_STRATEGIES)}")
        if isinstance(self.history_tokens, bool) or not isinstance(self.history_tokens, int) or self.history_tokens < 0:
            raise InputError(f"history_tokens must be an integer >= 0, got {self.history_tokens!r}")


@dataclass(frozen=True)
class SearchOptions:
    """One request's retrieval settings in place of its domain's (None or empty: the domain's own).

    Frozen and hashable, so requests with equal options can share a decode pass.
    filters: ((field, (accepted values...)), ...), sorted; build it with `SearchOptions.of`.
    """

    k: int | None = None
    mode: str | None = None
    filters: tuple[tuple[str, tuple], ...] = ()
    history: str | None = None  # how a follow-up's query is built (None: the domain's RetrievalConfig.history)

    @classmethod
    def of(cls, k: int | None = None, mode: str | None = None, filters: dict | None = None,
           history: str | None = None) -> SearchOptions:
        if history is not None and history not in HISTORY_STRATEGIES:
            raise InputError(f"unknown history strategy {history!r}; choose one of {', '.join(HISTORY_STRATEGIES)}")
        items = ((name, tuple(v) if isinstance(v, (list, tuple)) else (v,)) for name, v in (filters or {}).items())
        return cls(k, mode, tuple(sorted(items)), history)

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


@dataclass(frozen=True)
class Turn:
    """One message of a conversation before the question: a user or assistant turn, or a system message."""

    role: str
    content: str


def check_history(history) -> tuple[Turn, ...]:
    """The turns as `Turn`s ({role, content} dicts, (role, content) pairs or Turns), or an error naming the bad one."""
    if history is None:
        return ()
    if isinstance(history, (str, dict)) or not isinstance(history, (list, tuple)):
        raise InputError("history must be a list of {role, content} messages")
    turns = []
    for i, t in enumerate(history):
        if isinstance(t, Turn):
            role, content = t.role, t.content
        elif isinstance(t, dict):
            role, content = t.get("role"), t.get("content")
        elif isinstance(t, tuple) and len(t) == 2:
            role, content = t
        else:
            raise InputError(f"history[{i}] must be a {{role, content}} message")
        if role not in ROLES:
            raise InputError(f"history[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise InputError(f"history[{i}].content must be a non-empty string")
        turns.append(Turn(role, content.strip()))
    return tuple(turns)


@dataclass
class Prompt:
    input_ids: list[int]
    text: str
    passages: list[Passage]  # those that made it into the prompt, in prompt order (possibly truncated)
    history: tuple[Turn, ...] = field(default=())  # the earlier turns it holds (the newest ones that fit)
    dropped_turns: int = 0  # earlier user/assistant turns left out to fit the budget (the oldest)


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


def render(tokenizer, question: str, passages: list[Passage], retrieval: RetrievalConfig,
           history: tuple[Turn, ...] = ()) -> str:
    """Prompt text up to where the answer starts."""
    user = _user_message(question, [format_passage(i, p) for i, p in enumerate(passages, 1)], retrieval.abstention)
    system = "\n\n".join(t.content for t in history if t.role == "system")
    turns = [{"role": t.role, "content": t.content} for t in history if t.role != "system"]
    if uses_chat_template(tokenizer, retrieval.template):
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        return tokenizer.apply_chat_template(messages + [{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    before = "".join(f"{t['role'].capitalize()}: {t['content']}\n\n" for t in turns)
    return f"{system + chr(10) + chr(10) if system else ''}{before}{user}\n\nAnswer: "


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


def fit_passages(tokenizer, question: str, passages: list[Passage], retrieval: RetrievalConfig,
                 history: tuple[Turn, ...] = ()) -> list[Passage]:
    """Keep passages in the given (priority) order while the whole prompt fits the budget.

    The first passage that does not fit is truncated if a useful tail of it
    fits, and everything after it is dropped. The question is never cut: if the
    question alone exceeds the budget, the prompt holds no passages. With earlier
    turns, passages leave `history_tokens` of the budget to them (`fit_history`).
    System messages are kept whole, like the question.
    """
    system = tuple(t for t in history if t.role == "system")
    turns = len(history) > len(system)
    reserve = min(retrieval.history_tokens, retrieval.context_tokens // 2) if turns else 0
    budget = retrieval.context_tokens - reserve
    used = len(encode(tokenizer, render(tokenizer, question, [], retrieval, system)))
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
    while kept and len(encode(tokenizer, render(tokenizer, question, kept, retrieval, system))) > budget:
        last = kept[-1]
        n = len(encode(tokenizer, last.text))
        if n - 8 >= MIN_PASSAGE_TOKENS:
            kept[-1] = _truncate(tokenizer, last, n - 8)
        else:
            kept.pop()
    return kept


def fit_history(tokenizer, question: str, passages: list[Passage], retrieval: RetrievalConfig,
                history: tuple[Turn, ...]) -> tuple[tuple[Turn, ...], int]:
    """(the turns that fit beside `passages`, how many user/assistant turns were dropped): system messages
    always stay; of the others the newest are kept while the whole prompt fits the budget, starting with a
    user turn."""
    system = tuple(t for t in history if t.role == "system")
    turns = [t for t in history if t.role != "system"]
    kept: list[Turn] = []
    for turn in reversed(turns):  # newest first; the first that does not fit ends the history there
        trial = (turn, *kept)
        if len(encode(tokenizer, render(tokenizer, question, passages, retrieval, system + trial))) > \
                retrieval.context_tokens:
            break
        kept = list(trial)
    while kept and kept[0].role == "assistant":  # an answer whose question was dropped would stand alone
        kept.pop(0)
    return system + tuple(kept), len(turns) - len(kept)


def build_prompt(tokenizer, question: str, passages: list[Passage], retrieval: RetrievalConfig, *,
                 fitted: bool = False, history=()) -> Prompt:
    """Prompt for `question` with `passages` (highest priority first) fitted into the budget, after the
    conversation's earlier turns (`history`, oldest first) that fit beside them.

    `fitted=True` skips the passages' fitting (the caller already fitted and maybe reordered them).
    """
    if not question or not question.strip():
        raise InputError("the question is empty")
    history = check_history(history)
    kept = list(passages) if fitted else fit_passages(tokenizer, question, passages, retrieval, history)
    turns, dropped = fit_history(tokenizer, question, kept, retrieval, history) if history else ((), 0)
    text = render(tokenizer, question, kept, retrieval, turns)
    return Prompt(input_ids=encode(tokenizer, text), text=text, passages=kept, history=turns, dropped_turns=dropped)


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
