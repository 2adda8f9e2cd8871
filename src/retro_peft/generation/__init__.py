"""Answering, from the bottom up: the prompt (`prompt`), sampling (`sampling`), the decode loop (`decode`),
what the text means (`answers`), the batch runner (`runner`) and retrieve -> prompt -> decode (`generator`).

Nothing here imports the frozen KV cache (`retro_peft.kvcache` builds on this package).
"""

from retro_peft.generation.answers import Answer, cite, is_abstention, mentions, normalize_answer
from retro_peft.generation.decode import Generated, StaticDecode, decode, generate_batch
from retro_peft.generation.generator import Generator, stream_answer
from retro_peft.generation.prompt import Passage, Prompt, RetrievalConfig, SearchOptions, build_prompt, fit_passages
from retro_peft.generation.runner import BatchRunner, Row
from retro_peft.generation.sampling import SamplingConfig

__all__ = ["Answer", "BatchRunner", "Generated", "Generator", "Passage", "Prompt", "RetrievalConfig", "Row",
           "SamplingConfig", "SearchOptions", "StaticDecode", "build_prompt", "cite", "decode", "fit_passages",
           "generate_batch", "is_abstention", "mentions", "normalize_answer", "stream_answer"]
