"""Reading the user's documents.

- `.txt` / `.md` files, and folders of them (recursively): one document each,
  id = path relative to the folder given (or the file name), metadata `source`
  and `title` (the first Markdown heading, else the file stem).
- `.jsonl`: one document a line with `text` and optional `id`, `title`; every
  other field is kept as metadata (and can be filtered on).
- `.json` in SQuAD format: each paragraph a document, id `squad_doc_id(title, i)`,
  metadata `title`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable

from retro_peft.errors import InputError
from retro_peft.jsonl import read_jsonl
from retro_peft.qa import squad_doc_id, squad_paragraphs

MARKDOWN_SUFFIXES = (".md", ".markdown")
TEXT_SUFFIXES = {".txt", *MARKDOWN_SUFFIXES}


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    metadata: dict = field(default_factory=dict)


def load_documents(inputs: Iterable[str | Path | Document]) -> list[Document]:
    """Documents from files, folders or `Document` objects, in order; ids must be unique."""
    docs: list[Document] = []
    for item in inputs:
        if isinstance(item, Document):
            docs.append(item)
            continue
        path = Path(item)
        if not path.exists():
            raise InputError(f"input not found: {path}")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise InputError(f"folder {path} holds no .txt or .md files")
            docs.extend(_text_document(p, p.relative_to(path).as_posix()) for p in files)
        elif path.suffix.lower() in TEXT_SUFFIXES:
            docs.append(_text_document(path, path.name))
        elif path.suffix.lower() == ".jsonl":
            docs.extend(_jsonl_documents(path))
        elif path.suffix.lower() == ".json":
            docs.extend(_squad_documents(path))
        else:
            raise InputError(f"unsupported input {path}: expected .txt, .md, .jsonl, SQuAD .json or a folder")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise InputError("the corpus is empty: no document has any text")
    seen: dict[str, Document] = {}
    for d in docs:
        if d.id in seen and seen[d.id].text != d.text:
            raise InputError(f"two different documents share the id {d.id!r}")
        seen[d.id] = d
    return list(seen.values())


def _text_document(path: Path, doc_id: str) -> Document:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None
    title = next((line.lstrip("#").strip() for line in text.splitlines() if line.startswith("# ")), path.stem)
    return Document(doc_id, text, {"source": str(path), "title": title})


def _jsonl_documents(path: Path) -> list[Document]:
    docs = []
    for lineno, obj in read_jsonl(path):
        if not isinstance(obj.get("text"), str):
            raise InputError(f"{path}:{lineno}: each line needs a 'text' string")
        doc_id = str(obj["id"]) if obj.get("id") is not None else f"{path.name}:{lineno}"
        metadata = {k: v for k, v in obj.items() if k not in ("id", "text")}
        docs.append(Document(doc_id, obj["text"], metadata))
    return docs


def _squad_documents(path: Path) -> list[Document]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: malformed JSON at line {e.lineno} ({e.msg})") from None
    return [Document(squad_doc_id(title, pi), paragraph["context"], {"title": title})
            for _where, title, pi, paragraph in squad_paragraphs(obj, path)]
