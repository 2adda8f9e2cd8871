"""PEFT adapters that read retrieved context: LoRA, AdaLoRA and IA3 on Hugging Face peft."""

from retro_peft.adapters.config import (
    METHODS,
    RetrievalConfig,
    RetroAdaLoraConfig,
    RetroAdapterConfig,
    RetroIA3Config,
    RetroLoraConfig,
    adalora_schedule,
    config_for_method,
)
from retro_peft.adapters.model import AdapterMismatchError, RetroPeftModel, base_fingerprint, read_retro_config

__all__ = ["METHODS", "AdapterMismatchError", "RetrievalConfig", "RetroAdaLoraConfig", "RetroAdapterConfig",
           "RetroIA3Config", "RetroLoraConfig", "RetroPeftModel", "adalora_schedule", "base_fingerprint",
           "config_for_method", "read_retro_config"]
