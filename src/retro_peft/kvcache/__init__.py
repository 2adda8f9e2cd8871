"""Frozen KV cache: every chunk's attention states computed once, so a prompt prefills only its question.

`layout` cuts prompts into stored segments, `rotation` moves stored keys to new positions,
`store` computes, saves, loads and checks the states (`FrozenKVCache`), `assembly` puts a
batch's context together at query time.
"""

from retro_peft.kvcache.layout import CachedPrompt
from retro_peft.kvcache.store import FrozenKVCache, load_or_build

__all__ = ["CachedPrompt", "FrozenKVCache", "load_or_build"]
