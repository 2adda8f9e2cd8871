"""Prompts and generation: the one prompt builder, and retrieve -> prompt -> decode."""

from retro_peft.generation.generator import Answer, Generator, decode, is_abstention, normalize_answer
from retro_peft.generation.prompt import Passage, Prompt, build_prompt, fit_passages

__all__ = ["Answer", "Generator", "Passage", "Prompt", "build_prompt", "decode", "fit_passages",
           "is_abstention", "normalize_answer"]
