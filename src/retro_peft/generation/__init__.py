"""Prompts and generation: the one prompt builder, and retrieve -> prompt -> decode."""

from retro_peft.generation.generator import (Answer, Generated, Generator, SamplingConfig, SearchOptions, StaticDecode,
                                             decode, generate_batch, is_abstention, normalize_answer, stream_answer)
from retro_peft.generation.prompt import Passage, Prompt, build_prompt, fit_passages

__all__ = ["Answer", "Generated", "Generator", "SamplingConfig", "SearchOptions", "StaticDecode", "generate_batch",
           "stream_answer", "Passage", "Prompt", "build_prompt", "decode", "fit_passages", "is_abstention",
           "normalize_answer"]
