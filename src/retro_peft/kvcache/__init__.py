"""Frozen KV cache: every chunk's attention states computed once, so a prompt prefills only its question."""

from retro_peft.kvcache.frozen import CachedPrompt, FrozenKVCache, load_or_build

__all__ = ["CachedPrompt", "FrozenKVCache", "load_or_build"]
