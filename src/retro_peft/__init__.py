"""retro-peft: retrieval-augmented parameter-efficient fine-tuning.

Index documents, train PEFT adapters that learn to read retrieved passages,
answer with citations.
"""

from retro_peft.errors import RetroPeftError

__version__ = "0.1.0"

__all__ = ["RetroPeftError", "__version__"]
