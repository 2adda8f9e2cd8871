"""Adapter configs: the PEFT settings (a plain peft config) plus the retrieval settings.

One dataclass per method, each only naming its peft config class and defaults;
everything else (validation, JSON round trip) lives once in `RetroAdapterConfig`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peft import AdaLoraConfig, IA3Config, LoraConfig, PeftConfig

from retro_peft.errors import InputError

TEMPLATES = ("chat", "plain")
SEARCH_MODES = ("hybrid", "dense", "sparse")
# Every linear layer of a Llama-style block; the packaged SmolLM2 is a Llama.
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class RetrievalConfig:
    """How prompts are built from the index, for training and for generation alike."""

    k: int = 3  # retrieved passages in the prompt
    distractors: int = 1  # extra random passages from other documents (training only)
    oracle_fraction: float = 0.8  # RAFT's P: share of answerable examples that keep the gold passage
    template: str = "chat"  # "chat" = the model's chat template (plain if it has none), "plain"
    context_tokens: int = 700  # budget for the whole prompt; passages are dropped/truncated to fit
    abstention: str = "I don't know."  # the training target when the passages lack the answer
    mode: str = "hybrid"  # index search mode
    # Train as the frozen KV cache runs a prompt: each passage computed apart (attending to the template's
    # head, not to the other passages), whole passages only. Training reads it; answering through that
    # layout is the frozen KV cache's choice (Generator(kv_cache=...), a domain's kv_cache), not this flag.
    block_attention: bool = False

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 0:
            raise InputError(f"retrieval k must be an integer >= 0, got {self.k!r}")
        if not isinstance(self.distractors, int) or self.distractors < 0:
            raise InputError(f"distractors must be an integer >= 0, got {self.distractors!r}")
        if not 0.0 <= float(self.oracle_fraction) <= 1.0:
            raise InputError(f"oracle fraction P must be between 0 and 1, got {self.oracle_fraction!r}")
        if self.template not in TEMPLATES:
            raise InputError(f"unknown prompt template {self.template!r}; choose one of {', '.join(TEMPLATES)}")
        if not isinstance(self.context_tokens, int) or self.context_tokens < 32:
            raise InputError(f"context budget must be at least 32 tokens, got {self.context_tokens!r}")
        if not isinstance(self.abstention, str) or not self.abstention.strip():
            raise InputError("the abstention phrase must be a non-empty string")
        if not isinstance(self.block_attention, bool):
            raise InputError(f"block_attention must be true or false, got {self.block_attention!r}")
        if self.mode not in SEARCH_MODES:
            raise InputError(f"unknown search mode {self.mode!r}; choose one of {', '.join(SEARCH_MODES)}")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset, tuple)):
        return sorted(obj) if isinstance(obj, (set, frozenset)) else list(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "value") and not isinstance(obj, (str, int, float, bool)):  # enums (PeftType, TaskType)
        return obj.value
    if dataclasses.is_dataclass(obj):
        return _jsonable(dataclasses.asdict(obj))
    return obj


@dataclass
class RetroAdapterConfig:
    """PEFT config + retrieval config. Subclasses only pick the PEFT method and its defaults."""

    peft: PeftConfig | None = None
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)

    method: ClassVar[str] = ""
    peft_class: ClassVar[type[PeftConfig]] = PeftConfig
    default_lr: ClassVar[float] = 5e-4  # a starting point for short runs; the CLI's --lr overrides it

    def __post_init__(self):
        if self.peft is None:
            self.peft = self.default_peft()
        if not isinstance(self.peft, self.peft_class):
            raise InputError(f"{type(self).__name__} needs a {self.peft_class.__name__}, got {type(self.peft).__name__}")
        if isinstance(self.retrieval, dict):
            self.retrieval = RetrievalConfig(**self.retrieval)

    @classmethod
    def default_peft(cls) -> PeftConfig:
        raise NotImplementedError

    def target_modules(self) -> list[str] | str | None:
        targets = self.peft.target_modules
        return sorted(targets) if isinstance(targets, (set, frozenset)) else targets

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "peft": _jsonable(self.peft.to_dict()),
            "retrieval": dataclasses.asdict(self.retrieval),
        }

    @staticmethod
    def from_dict(obj: dict) -> "RetroAdapterConfig":
        method = obj.get("method")
        if method not in METHODS:
            raise InputError(f"unknown adapter method {method!r}; choose one of {', '.join(METHODS)}")
        cls = METHODS[method]
        peft_kwargs = dict(obj.get("peft") or {})
        known = {f.name for f in dataclasses.fields(cls.peft_class)}
        peft_cfg = cls.peft_class(**{k: v for k, v in peft_kwargs.items() if k in known and k != "peft_type"})
        known_r = {f.name for f in dataclasses.fields(RetrievalConfig)}
        retrieval = RetrievalConfig(**{k: v for k, v in (obj.get("retrieval") or {}).items() if k in known_r})
        return cls(peft=peft_cfg, retrieval=retrieval)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclass
class RetroLoraConfig(RetroAdapterConfig):
    method: ClassVar[str] = "lora"
    peft_class: ClassVar[type[PeftConfig]] = LoraConfig

    @classmethod
    def default_peft(cls) -> LoraConfig:
        return LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05, target_modules=list(LLAMA_LINEAR))


def adalora_schedule(steps: int) -> dict:
    """AdaLoRA budget schedule for a run of `steps` optimizer steps.

    Warm up at full rank for the first 10%, prune (cubic schedule) until 80%,
    then train the final ranks for the last 20%. peft needs tinit < steps - tfinal.
    """
    if steps < 1:
        raise InputError(f"AdaLoRA needs at least 1 training step, got {steps}")
    tinit, tfinal = steps // 10, steps // 5
    return {"total_step": steps, "tinit": tinit, "tfinal": tfinal, "deltaT": max(1, steps // 50)}


@dataclass
class RetroAdaLoraConfig(RetroAdapterConfig):
    method: ClassVar[str] = "adalora"
    peft_class: ClassVar[type[PeftConfig]] = AdaLoraConfig

    @classmethod
    def default_peft(cls, steps: int = 100) -> AdaLoraConfig:
        return AdaLoraConfig(task_type="CAUSAL_LM", init_r=12, target_r=6, lora_alpha=32, lora_dropout=0.05,
                             target_modules=list(LLAMA_LINEAR), **adalora_schedule(steps))

    def for_steps(self, steps: int) -> "RetroAdaLoraConfig":
        """The same config with its budget schedule fitted to a run of `steps` optimizer steps."""
        peft_cfg = dataclasses.replace(self.peft, **adalora_schedule(steps))
        return dataclasses.replace(self, peft=peft_cfg)


@dataclass
class RetroIA3Config(RetroAdapterConfig):
    method: ClassVar[str] = "ia3"
    peft_class: ClassVar[type[PeftConfig]] = IA3Config
    default_lr: ClassVar[float] = 3e-3  # IA3 scales activations (few parameters, starting at 1): needs larger steps

    @classmethod
    def default_peft(cls) -> IA3Config:
        # IA3's usual Llama placement: rescale keys, values and the MLP input of down_proj.
        return IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                         feedforward_modules=["down_proj"])


METHODS: dict[str, type[RetroAdapterConfig]] = {
    c.method: c for c in (RetroLoraConfig, RetroAdaLoraConfig, RetroIA3Config)
}


def config_for_method(method: str, *, retrieval: RetrievalConfig | None = None, steps: int | None = None) -> RetroAdapterConfig:
    """The default config of a method by name (what the CLI uses)."""
    if method not in METHODS:
        raise InputError(f"unknown adapter method {method!r}; choose one of {', '.join(METHODS)}")
    cfg = METHODS[method](retrieval=retrieval or RetrievalConfig())
    if isinstance(cfg, RetroAdaLoraConfig) and steps is not None:
        cfg = cfg.for_steps(steps)
    return cfg
