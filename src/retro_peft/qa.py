"""Question-answer files, shared by retrieval evaluation, training and answer evaluation.

Two formats:
- JSONL, one object a line: `question`, `answers` (list of strings; empty or
  absent with `"is_impossible": true` for an unanswerable question), optional
  `gold_doc_ids`, `id`, `kind` (`span`: the answer is words of a passage, the
  default; `free`: an answer of its own; `choice`: one of `choices`) and
  `choices` (list of strings; a domain may give default ones). One file holds
  one kind; a choice answer must be one of its choices. `history`: the
  conversation before the question, a list of {role, content} messages (roles
  system, user, assistant), which training puts into the prompt.
- SQuAD 1.1/2.0 JSON: every question's gold document is its paragraph, whose
  document id is `squad_doc_id(title, paragraph_index)` (the same id the SQuAD
  document loader gives that paragraph).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from retro_peft.choices import ANSWER_KINDS, ROLES, AnswerKind
from retro_peft.errors import InputError
from retro_peft.text import normalize_answer
from retro_peft.jsonl import read_jsonl


@dataclass(frozen=True)
class QAItem:
    id: str
    question: str
    answers: tuple[str, ...]
    gold_doc_ids: tuple[str, ...] = ()
    is_impossible: bool = False
    metadata: dict = field(default_factory=dict, compare=False, hash=False)
    kind: AnswerKind = "span"
    choices: tuple[str, ...] = ()  # kind "choice": the answers allowed, in the order the prompt shows them
    history: tuple[tuple[str, str], ...] = ()  # (role, content) of the turns before the question, oldest first

    @property
    def answerable(self) -> bool:
        return bool(self.answers) and not self.is_impossible


QA_FIELDS = frozenset({"id", "question", "answers", "gold_doc_ids", "is_impossible", "kind", "choices", "history"})


def squad_doc_id(title: str, paragraph_index: int) -> str:
    return f"{title}/p{paragraph_index}"


def is_squad(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("data"), list)


def squad_paragraphs(obj, path: Path, articles: slice | None = None):
    """(where, title, paragraph index, paragraph) for each paragraph of a SQuAD object, its fields checked.

    `where` names the file, article and paragraph for error messages; the
    paragraph's `context` is a string. The SQuAD document loader and `load_qa`
    both read through here, so they agree on ids and on what a bad file is.
    """
    if not is_squad(obj):
        raise InputError(f"{path} is JSON but not SQuAD format (expected a top-level 'data' list)")
    data = obj["data"]
    for ai in range(len(data))[articles or slice(None)]:
        article = data[ai]
        if not isinstance(article, dict):
            raise InputError(f"{path}: article {ai}: expected an object with 'title' and 'paragraphs'")
        title = article.get("title", "")
        if not isinstance(title, str):
            raise InputError(f"{path}: article {ai}: 'title' must be a string")
        paragraphs = article.get("paragraphs", [])
        if not isinstance(paragraphs, list):
            raise InputError(f"{path}: article {ai} ({title!r}): 'paragraphs' must be a list")
        for pi, paragraph in enumerate(paragraphs):
            where = f"{path}: article {ai} ({title!r}), paragraph {pi}"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str):
                raise InputError(f"{where}: each paragraph needs a 'context' string")
            yield where, title, pi, paragraph


def load_qa(path: str | Path, *, articles: slice | None = None, require_answers: bool = False,
            kind: AnswerKind | None = None, choices: list[str] | tuple[str, ...] | None = None) -> list[QAItem]:
    """Read a QA file; `articles` selects SQuAD articles (e.g. `slice(0, 3)` for the training split).

    `kind` and `choices`: the defaults for items that name none (a domain's declared kind and choices).
    """
    if kind is not None and kind not in ANSWER_KINDS:
        raise InputError(f"unknown answer kind {kind!r}; choose one of {', '.join(ANSWER_KINDS)}")
    default_choices = _choices(choices, "the default choices") if choices else ()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"QA file not found: {path}")
    if path.suffix == ".json":
        try:
            items = _load_squad(json.loads(path.read_text(encoding="utf-8")), path, articles)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: malformed JSON at line {e.lineno} ({e.msg})") from None
    else:
        items = _load_jsonl(path, kind, default_choices)
    if not items:
        raise InputError(f"QA file {path} holds no questions")
    if require_answers and not any(item.answers for item in items):
        raise InputError(f"QA file {path} holds no question with an answer")
    return items


def _load_squad(obj, path: Path, articles: slice | None) -> list[QAItem]:
    items = []
    for where, title, pi, paragraph in squad_paragraphs(obj, path, articles):
        qas = paragraph.get("qas", [])
        if not isinstance(qas, list):
            raise InputError(f"{where}: 'qas' must be a list")
        for qi, qa in enumerate(qas):
            if not isinstance(qa, dict) or not isinstance(qa.get("question"), str) or not qa["question"].strip():
                raise InputError(f"{where}, question {qi}: needs a non-empty 'question' string")
            raw = qa.get("answers", [])
            if not isinstance(raw, list) or not all(isinstance(a, dict) and isinstance(a.get("text", ""), str) for a in raw):
                raise InputError(f"{where}, question {qi}: 'answers' must be a list of objects with a 'text' string")
            answers = tuple(dict.fromkeys(a["text"] for a in raw if a.get("text")))
            impossible = _flag(qa, "is_impossible", f"{where}, question {qi}") or not answers
            items.append(QAItem(
                id=str(qa.get("id", f"{title}/{pi}/{len(items)}")),
                question=qa["question"],
                answers=() if impossible else answers,
                gold_doc_ids=(squad_doc_id(title, pi),),
                is_impossible=impossible,
                metadata={"title": title},
            ))
    return items


def _choices(value, where: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) and c.strip() for c in value):
        raise InputError(f"{where}: 'choices' must be a list of non-empty strings")
    out = tuple(dict.fromkeys(c.strip() for c in value))
    if len({normalize_answer(c) for c in out}) < len(out):
        raise InputError(f"{where}: two of the choices {list(out)!r} are the same answer after normalisation")
    if len(out) < 2:
        raise InputError(f"{where}: 'choices' needs at least two different choices, got {list(value)!r}")
    return out


def _choice_answers(answers: tuple[str, ...], choices: tuple[str, ...], where: str) -> tuple[str, ...]:
    """The answers spelled as their choices (matched after normalisation), or an error naming the stray one."""
    by_norm = {normalize_answer(c): c for c in choices}
    out = []
    for a in answers:
        if normalize_answer(a) not in by_norm:
            raise InputError(f"{where}: answer {a!r} is not one of its choices ({', '.join(choices)})")
        out.append(by_norm[normalize_answer(a)])
    return tuple(dict.fromkeys(out))


def _history(value, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InputError(f"{where}: 'history' must be a list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InputError(f"{where}: history[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise InputError(f"{where}: history[{i}].content must be a non-empty string")
        out.append((m["role"], m["content"].strip()))
    return tuple(out)


def _flag(obj: dict, name: str, where: str) -> bool:
    # A JSON boolean only (null or absent: false): the string "false" would otherwise count as true.
    value = obj.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InputError(f"{where}: {name!r} must be true or false, got {value!r}")
    return value


def _load_jsonl(path: Path, default_kind: str | None, default_choices: tuple[str, ...]) -> list[QAItem]:
    items = []
    file_kind = None  # the kind of the first item: every other must match it
    for lineno, obj in read_jsonl(path):
        if not isinstance(obj.get("question"), str) or not obj["question"].strip():
            raise InputError(f"{path}:{lineno}: each line needs a non-empty 'question' string")
        answers = obj.get("answers", [])
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise InputError(f"{path}:{lineno}: 'answers' must be a list of strings")
        answers = tuple(a for a in answers if a.strip())
        impossible = _flag(obj, "is_impossible", f"{path}:{lineno}")
        if not answers and not impossible:
            raise InputError(f"{path}:{lineno}: question has no answers (set \"is_impossible\": true for an unanswerable one)")
        gold = obj.get("gold_doc_ids", [])
        if isinstance(gold, str):
            gold = [gold]
        if not isinstance(gold, list) or not all(isinstance(g, (str, int)) and not isinstance(g, bool) for g in gold):
            raise InputError(f"{path}:{lineno}: 'gold_doc_ids' must be a list of document ids (strings)")
        where = f"{path}:{lineno}"
        choices = _choices(obj["choices"], where) if obj.get("choices") is not None else default_choices
        kind = obj.get("kind") or default_kind or ("choice" if choices else "span")
        if kind not in ANSWER_KINDS:
            raise InputError(f"{where}: unknown answer kind {kind!r}; choose one of {', '.join(ANSWER_KINDS)}")
        if file_kind is None:
            file_kind = kind
        elif kind != file_kind:
            raise InputError(f"{where}: answer kind {kind!r}, but the file's first question is {file_kind!r} "
                             "(one QA file holds one kind; split the file)")
        if kind == "choice":
            if not choices:
                raise InputError(f"{where}: a 'choice' question needs its 'choices' (or the domain's default ones)")
            answers = _choice_answers(answers, choices, where)
        items.append(QAItem(
            id=str(obj.get("id", f"{path.stem}:{lineno}")),
            question=obj["question"].strip(),
            answers=() if impossible else answers,
            gold_doc_ids=tuple(str(g) for g in gold),
            is_impossible=impossible,
            metadata={k: v for k, v in obj.items() if k not in QA_FIELDS},
            kind=kind,
            choices=choices if kind == "choice" else (),
            history=_history(obj.get("history"), where),
        ))
    return items
