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
from retro_peft.generation.prompt import RetrievalConfig

# Every linear layer of a Llama-style block; the packaged SmolLM2 is a Llama.
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
    def from_dict(obj: dict) -> RetroAdapterConfig:
        method = obj.get("method")
        if method not in METHODS:
            raise InputError(f"unknown adapter method {method!r}; choose one of {', '.join(METHODS)}")
        cls = METHODS[method]
        peft_kwargs = dict(obj.get("peft") or {})
        known = {f.name for f in dataclasses.fields(cls.peft_class)}
        peft_cfg = cls.peft_class(**{k: v for k, v in peft_kwargs.items() if k in known and k != "peft_type"})
        known_r = {f.name for f in dataclasses.fields(RetrievalConfig)}
        saved = obj.get("retrieval") or {}
        # Adapters saved before grounding and citation markers existed were trained on the span rule, without markers.
        retrieval = RetrievalConfig(**{"grounding": "span", "citations": False,
                                       **{k: v for k, v in saved.items() if k in known_r}})
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

    def for_steps(self, steps: int) -> RetroAdaLoraConfig:
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
