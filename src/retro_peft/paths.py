"""Where retro-peft keeps its state: `$RETRO_PEFT_HOME` (default `~/.retro-peft`)."""

from __future__ import annotations

import os
from pathlib import Path

from retro_peft.errors import InputError


def home() -> Path:
    return Path(os.environ.get("RETRO_PEFT_HOME") or Path.home() / ".retro-peft").expanduser()


def resolve_index_path(name: str | os.PathLike) -> Path:
    """A bare name lives under `$RETRO_PEFT_HOME/indexes`; anything that looks like a path is a path."""
    text = os.fspath(name)
    if not text or not text.strip():
        raise InputError("index name is empty: give a name (stored under $RETRO_PEFT_HOME/indexes) or a path")
    if os.sep in text or text.startswith(".") or (os.altsep and os.altsep in text):
        return Path(text).expanduser().resolve()
    return home() / "indexes" / text


def cache_dir(kind: str) -> Path:
    return home() / "cache" / kind
