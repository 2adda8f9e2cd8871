"""Token-aware chunking with overlap, counted in the embedder's own tokens.

Windows of `chunk_tokens` tokens advance by `chunk_tokens - overlap`; a chunk's
text is the exact character span of its tokens in the document, so nothing is
re-spelled by a detokeniser. A window never starts inside a word.
Chunk ids are `doc_id#<content hash>`: adding the same document again yields the
same ids, so it changes nothing.
A Markdown document's chunks also carry `headings`, the path of headings the chunk
starts under ("Guide > Install > Linux"), for contextual chunks (`IndexConfig.context`).
"""

from __future__ import annotations

import bisect
import hashlib
import re
from dataclasses import dataclass, field

from retro_peft.errors import InputError
from retro_peft.index.documents import MARKDOWN_SUFFIXES, Document

HEADINGS = "headings"  # the chunk metadata field holding a Markdown chunk's heading path
_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


@dataclass(frozen=True)
class ChunkingConfig:
    chunk_tokens: int = 192
    overlap: int = 32

    def validate(self, max_tokens: int | None = None) -> None:
        if self.chunk_tokens <= 0:
            raise InputError(f"chunk tokens must be positive, got {self.chunk_tokens}")
        if not 0 <= self.overlap < self.chunk_tokens:
            raise InputError(f"overlap must be in [0, chunk tokens={self.chunk_tokens}), got {self.overlap}")
        if max_tokens is not None and self.chunk_tokens > max_tokens:
            raise InputError(f"chunk tokens {self.chunk_tokens} exceed the encoder's limit of {max_tokens} tokens")


@dataclass(frozen=True)
class Chunk:
    id: str
    doc_id: str
    text: str
    metadata: dict = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        return text_hash(self.text)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def chunk_documents(docs: list[Document], tokenizer, config: ChunkingConfig) -> list[Chunk]:
    """Split documents into chunks; `tokenizer` must be a fast (offset-mapping) Hugging Face tokenizer."""
    config.validate()
    encodings = tokenizer([d.text for d in docs], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    chunks: list[Chunk] = []
    for doc, offsets in zip(docs, encodings["offset_mapping"]):
        seen: set[str] = set()
        markdown = str(doc.metadata.get("source", "")).lower().endswith(MARKDOWN_SUFFIXES)
        paths = heading_paths(doc.text) if markdown else []
        starts = [offset for offset, _ in paths]
        for start, end in _windows(offsets, config):
            text = doc.text[start:end].strip()
            chunk_id = f"{doc.id}#{text_hash(text)[:16]}"
            if text and chunk_id not in seen:
                seen.add(chunk_id)
                metadata = doc.metadata
                if markdown:
                    # the headings in force where the chunk's text begins (a heading it opens with included)
                    first = start + len(doc.text[start:end]) - len(doc.text[start:end].lstrip())
                    at = bisect.bisect_right(starts, first) - 1
                    metadata = {**doc.metadata, HEADINGS: paths[at][1] if at >= 0 else ""}
                chunks.append(Chunk(chunk_id, doc.id, text, metadata))
    return chunks


def heading_paths(text: str) -> list[tuple[int, str]]:
    """(character offset of each ATX heading, the heading path from there: "H1 > H2 > H3"), in order.

    A heading closes every deeper or equal one before it; lines inside fenced code blocks are not headings.
    """
    out, stack, fenced, offset = [], [], False, 0
    for line in text.splitlines(keepends=True):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := _ATX_HEADING.match(line.rstrip("\r\n"))):
            level, title = len(m.group(1)), m.group(2).strip()
            stack = [(lv, t) for lv, t in stack if lv < level] + [(level, title)]
            out.append((offset, " > ".join(t for _, t in stack if t)))
        offset += len(line)
    return out


def _windows(offsets: list[tuple[int, int]], config: ChunkingConfig):
    n = len(offsets)
    if n == 0:
        return
    step = config.chunk_tokens - config.overlap
    start = 0
    while True:
        end = min(start + config.chunk_tokens, n)
        yield offsets[start][0], offsets[end - 1][1]
        if end == n:
            return
        nxt = start + step
        # Step past word-piece continuations (no gap to the previous token) so a
        # chunk never begins mid-word; give up after a few tokens on long words.
        limit = min(end, nxt + 8)
        while nxt < limit and offsets[nxt][0] == offsets[nxt - 1][1]:
            nxt += 1
        start = nxt if nxt < end else start + step
