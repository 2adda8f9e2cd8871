"""History-aware retrieval: the search query of a follow-up ("When did he die?") built from the conversation.

- `concat`: the question, the previous user turns (newest first, at most `CONCAT_USER_TURNS`) and the
  previous answer, each weighted (the question 1, each older user turn half the one after it, the answer
  1/2). The dense query is the weighted sum of the parts' embeddings (renormalised); the sparse query is
  their text with the question twice, so BM25 counts its words most.
- `rewrite`: the generator's base model (adapters off: an adapter trained to answer would answer)
  condenses the conversation and the question into one standalone question (prompted with one worked
  example), which is searched as is. A reply that is not a question (small models tend to answer
  instead) is not used: that follow-up is searched as `concat` would.
"""

from __future__ import annotations

import numpy as np

from retro_peft.generation.prompt import Turn, encode, uses_chat_template

CONCAT_USER_TURNS = 2
ANSWER_WEIGHT = 0.5
REWRITE_TOKENS = 40


def concat_parts(question: str, history: tuple[Turn, ...]) -> list[tuple[str, float]]:
    """(text, weight) of each part of a `concat` query: the question first."""
    parts = [(question, 1.0)]
    users = [t.content for t in reversed(history) if t.role == "user"][:CONCAT_USER_TURNS]
    parts += [(u, 0.5 ** (i + 1)) for i, u in enumerate(users)]
    answer = next((t.content for t in reversed(history) if t.role == "assistant"), None)
    if answer:
        parts.append((answer, ANSWER_WEIGHT))
    return parts


def concat_text(parts: list[tuple[str, float]]) -> str:
    question = parts[0][0]
    return " ".join([question, question] + [text for text, _ in parts[1:]])


def concat_vectors(encoder, parts_per_query: list[list[tuple[str, float]]]) -> np.ndarray:
    """[queries, dim]: each query's weighted, renormalised sum of its parts' embeddings (one encoder call)."""
    flat = [text for parts in parts_per_query for text, _ in parts]
    vectors = np.asarray(encoder.encode(flat), dtype=np.float32)
    out, at = [], 0
    for parts in parts_per_query:
        weights = np.array([w for _, w in parts], dtype=np.float32)[:, None]
        v = (vectors[at:at + len(parts)] * weights).sum(0)
        out.append(v / max(float(np.linalg.norm(v)), 1e-12))
        at += len(parts)
    return np.stack(out)


def concat_queries(index, questions: list[str], histories: list[tuple[Turn, ...]], mode: str,
                   rewrites: list[str | None] | None = None):
    """(query texts, dense query vectors or None) for `index.search_many`: each question searched with its
    rewrite when it has one, else as `concat` (a question without history: the question alone)."""
    rewrites = rewrites or [None] * len(questions)
    parts = [[(r, 1.0)] if r else concat_parts(q, h) for q, h, r in zip(questions, histories, rewrites)]
    vectors = concat_vectors(index.encoder, parts) if mode != "sparse" else None
    return [concat_text(p) for p in parts], vectors


def rewrite_text(tokenizer, question: str, history: tuple[Turn, ...], template: str) -> str:
    """The prompt that asks the base model for a standalone version of `question`."""
    lines = [f"{t.role.capitalize()}: {t.content}" for t in history if t.role != "system"]
    ask = ("Rewrite the last question of the conversation so that it names what it refers to. Do not answer "
           "it.\n\nExample:\nConversation:\nUser: Who founded Microsoft?\nAssistant: Bill Gates.\n"
           "Last question: When was he born?\nStandalone question: When was Bill Gates born?\n\n"
           "Conversation:\n" + "\n".join(lines) + f"\nLast question: {question.strip()}")
    if uses_chat_template(tokenizer, template):  # the reply starts as the example's does
        return tokenizer.apply_chat_template([{"role": "user", "content": ask}], tokenize=False,
                                             add_generation_prompt=True) + "Standalone question:"
    return ask + "\nStandalone question:"


def rewrite_ids(tokenizer, question: str, history: tuple[Turn, ...], template: str) -> list[int]:
    return encode(tokenizer, rewrite_text(tokenizer, question, history, template))


def clean_rewrite(text: str) -> str | None:
    """The first line of the model's reply if it is a question, else None (not a usable rewrite)."""
    line = next((x.strip().strip('"') for x in text.splitlines() if x.strip()), "")
    return line if line.endswith("?") and len(line) > 3 else None
