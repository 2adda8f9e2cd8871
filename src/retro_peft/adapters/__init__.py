"""PEFT adapters that read retrieved context: LoRA, AdaLoRA and IA3 on Hugging Face peft.

An adapter's config carries its retrieval settings (`RetrievalConfig`, defined with the
prompt builder in `retro_peft.generation.prompt` and exported here with the configs).
"""

from retro_peft.adapters.config import (
    METHODS,
    RetroAdaLoraConfig,
    RetroAdapterConfig,
    RetroIA3Config,
    RetroLoraConfig,
    adalora_schedule,
    config_for_method,
)
from retro_peft.adapters.model import RetroPeftModel, read_retro_config
from retro_peft.errors import AdapterMismatchError
from retro_peft.generation.prompt import RetrievalConfig

__all__ = ["METHODS", "AdapterMismatchError", "RetrievalConfig", "RetroAdaLoraConfig", "RetroAdapterConfig",
           "RetroIA3Config", "RetroLoraConfig", "RetroPeftModel", "adalora_schedule", "config_for_method",
           "read_retro_config"]
