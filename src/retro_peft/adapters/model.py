"""A Hugging Face causal LM wrapped with a PEFT adapter, saved as a standard PEFT folder.

Folder layout (plain `peft.PeftModel.from_pretrained` loads it as is):
    adapter_config.json         peft's own config
    adapter_model.safetensors   the adapter weights
    answerability.json          (optional) the calibrated abstention head (`generation.answerability`)
    retro_config.json           the retrieval settings, the index and encoder it was
                                trained with, the base model (name + fingerprints)
                                and the training data's sha256
Every file is replaced atomically, `retro_config.json` last: it records the
weights' sha256, so a folder whose save was cut short is detected on load.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from retro_peft.adapters.config import RetroAdapterConfig, RetroAdaLoraConfig
from retro_peft.base_model import (base_fingerprint, check_fingerprint, load_base_model, quantize_skipped,
                                   quantize_skipped_linears, quantized)
from retro_peft.choices import check_quantize_skip
from retro_peft.errors import AdapterMismatchError, EncoderMismatchError, InputError
from retro_peft.generation.answerability import ANSWERABILITY_FILE, AnswerabilityHead
from retro_peft.generation.generator import Generator
from retro_peft.kvcache.soft import SOFT_TOKENS_FILE, SoftTokens
from retro_peft.storage import replace_folder, sha256_file

log = logging.getLogger(__name__)

RETRO_CONFIG = "retro_config.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Each PEFT file's checksum in retro_config.json, so a config from one save and weights from another never load
CHECKSUM_KEYS = {"adapter_model.safetensors": "adapter_model_sha256", "adapter_config.json": "adapter_config_sha256"}
FORMAT_VERSION = 1
RETRIEVER_FOLDER = "retriever"  # a jointly trained encoder (train --train-retriever), inside the adapter folder


def check_target_modules(model, config: RetroAdapterConfig) -> None:
    """Fail before training if the adapter targets a module name the model does not have."""
    targets = config.target_modules()
    if targets is None or isinstance(targets, str):  # regex / "all-linear": peft resolves it
        return
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise InputError(f"the {config.method} adapter targets module(s) {', '.join(missing)} that "
                         f"{type(model).__name__} does not have; its linear layers are: {', '.join(leaves)}")


class RetroPeftModel:
    """A PEFT model plus what retro-peft needs around it: tokenizer, retrieval config, provenance."""

    def __init__(self, model, tokenizer, config: RetroAdapterConfig, base_model_name: str, info: dict | None = None):
        self.model = model  # a peft.PeftModel
        self.tokenizer = tokenizer
        self.config = config
        self.base_model_name = base_model_name
        self.info = dict(info or {})
        self.answerability: AnswerabilityHead | None = None  # fitted by `training.calibrate`, saved with the adapter
        self.soft_tokens: SoftTokens | None = None  # trained by TrainConfig.soft_tokens, saved with the adapter

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, base_model, config: RetroAdapterConfig, *, tokenizer=None, dtype=None, device=None,
               seed: int | None = 0, quantize: str | None = None,
               quantize_skip: Sequence[str] = ()) -> RetroPeftModel:
        """Wrap `base_model` (a name, or a loaded model with `tokenizer`) with a fresh adapter.

        quantize: "4bit"/"8bit" loads the base quantized (QLoRA: the adapter trains in full precision on it).
        quantize_skip: with quantize, suffixes of the linear layers kept unquantized (`load_base_model`)."""
        from peft import get_peft_model

        base, tokenizer, name = cls._base(base_model, tokenizer, dtype, device, quantize, quantize_skip)
        check_target_modules(base, config)
        _prepare_quantized(base)
        if seed is not None:  # adapter initialisation is random: make it repeatable
            torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(base, config.peft)
        except ValueError as e:  # peft's own checks (e.g. a regex that matches nothing)
            raise InputError(f"cannot attach the {config.method} adapter: {e}") from None
        return cls(peft_model, tokenizer, config, name, {"base_model": {"name": name, **base_fingerprint(base)}})

    @staticmethod
    def _base(base_model, tokenizer, dtype, device, quantize=None, quantize_skip=()):
        if isinstance(base_model, (str, os.PathLike)):
            model, tok, _path = load_base_model(os.fspath(base_model), dtype=dtype, device=device, quantize=quantize,
                                                quantize_skip=quantize_skip)
            return model, tokenizer or tok, os.fspath(base_model)
        if tokenizer is None:
            raise InputError("a loaded base model needs its tokenizer")
        skip = check_quantize_skip(quantize, quantize_skip)
        kept = quantize_skipped(base_model)
        # bitsandbytes quantizes while loading, not after
        if quantize and (quantized(base_model) != quantize or (kept is not None and set(kept) != set(skip))):
            raise InputError(f"quantize={quantize!r}{f', quantize_skip={list(skip)!r}' if skip else ''} applies when "
                             "the base model is loaded: give its name or folder, or load it with "
                             "load_base_model(..., quantize=..., quantize_skip=...)")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if device is not None:
            base_model.to(device)
        return base_model, tokenizer, str(getattr(base_model.config, "_name_or_path", "") or "<in-memory model>")

    @classmethod
    def load(cls, adapter_dir, *, base_model=None, tokenizer=None, dtype=None, device=None,
             is_trainable: bool = False, quantize: str | None = None,
             quantize_skip: Sequence[str] = ()) -> RetroPeftModel:
        """Load a saved adapter onto its base model (by default the one named in retro_config.json), quantized
        if `quantize` says so, but for the linear layers `quantize_skip` names (an adapter trained on any of
        these bases loads on any)."""
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        info = read_retro_config(adapter_dir)
        config = RetroAdapterConfig.from_dict(info["adapter"])
        recorded = info["base_model"]
        base, tokenizer, name = cls._base(base_model if base_model is not None else recorded["name"],
                                          tokenizer, dtype, device, quantize, quantize_skip)
        check_fingerprint(recorded, base_fingerprint(base), what=f"adapter {adapter_dir}", found_name=name)
        if is_trainable:
            _prepare_quantized(base)
        try:
            peft_model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=is_trainable)
        except (ValueError, RuntimeError, KeyError) as e:
            raise AdapterMismatchError(f"adapter {adapter_dir} does not fit base model {name!r}: {e}") from None
        model = cls(peft_model, tokenizer, config, name, info)
        model.answerability = load_answerability(adapter_dir, info)
        model.soft_tokens = load_soft_tokens(adapter_dir, info)
        return model

    # -- saving -------------------------------------------------------------------------
    def save(self, out_dir, *, index=None, training_data_sha256: str | None = None, extra: dict | None = None,
             retriever: Callable[[Path], dict] | None = None) -> Path:
        """Write the adapter folder whole: built next to `out_dir`, then swapped in as one rename.

        A save that dies half-way leaves the previous adapter (or none) in place, never a mix.
        A training run's checkpoints in the old folder move into the new one.
        retriever(folder): writes a jointly trained encoder into `folder` (the adapter's `retriever/`) and
        returns its description; the adapter then records `index` as re-embedded with it.
        """
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            self.model.save_pretrained(tmp, safe_serialization=True)
            (tmp / "README.md").unlink(missing_ok=True)  # peft's empty model card; the folder is the three files
            if self.answerability is not None:
                self.answerability.save(tmp)
            if self.soft_tokens is not None:
                self.soft_tokens.save(tmp)
            index_info = _index_info(index) if index is not None else self.info.get("index")
            trained_retriever = retriever(tmp / RETRIEVER_FOLDER) if retriever is not None else None
            if trained_retriever is not None and index_info is not None:
                index_info = {**index_info, "encoder": str(out_dir.absolute() / RETRIEVER_FOLDER),
                              "encoder_fingerprint": trained_retriever["fingerprint"]}
            info = {
                "format_version": FORMAT_VERSION,
                "method": self.config.method,
                "adapter": self.config.to_dict(),
                "base_model": self.info.get("base_model") or {"name": self.base_model_name,
                                                              **base_fingerprint(self.model.get_base_model())},
                "index": index_info,
                "retriever": trained_retriever or self.info.get("retriever"),
                "template": self.config.retrieval.template,
                "training_data_sha256": training_data_sha256 or self.info.get("training_data_sha256"),
                "trained_from": self.info.get("trained_from"),  # the adapter this one continued, if any
                **{key: sha256_file(tmp / name) for name, key in CHECKSUM_KEYS.items()},
                "answerability_sha256": sha256_file(tmp / ANSWERABILITY_FILE) if self.answerability else None,
                "soft_tokens_sha256": sha256_file(tmp / SOFT_TOKENS_FILE) if self.soft_tokens is not None else None,
                "final_ranks": self.final_ranks(),
                **(extra or {}),
            }
            (tmp / RETRO_CONFIG).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            replace_folder(tmp, out_dir, carry_over={"checkpoints"})
            self.info = info
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out_dir

    # -- introspection ------------------------------------------------------------------
    def trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return trainable, total

    def final_ranks(self) -> dict[str, int] | None:
        """AdaLoRA: the rank each adapted module kept after pruning (None for other methods)."""
        if not isinstance(self.config, RetroAdaLoraConfig):
            return None
        pattern = self.model.peft_config[self.model.active_adapter].rank_pattern
        if not pattern:
            return None
        # peft keys the pattern by parameter name, and renames the keys in place when saving
        # ("...q_proj.lora_E.default" -> "...q_proj.lora_E"): report by module instead.
        def module(name: str) -> str:
            name = name.removeprefix("base_model.model.").removesuffix(f".{self.model.active_adapter}")
            return name.removesuffix(".lora_E")
        return {module(name): int(sum(bool(x) for x in mask)) for name, mask in sorted(pattern.items())}

    @property
    def retrieval(self):
        return self.config.retrieval

    def generator(self, index=None, *, abstain_at: float | None = None, **kwargs):
        """A Generator with this adapter. abstain_at: the answer rate to abstain at by the calibrated head
        (None: the rate it was calibrated for; 0: never by the score); ignored without a head."""
        head = self.answerability.at_rate(abstain_at) if self.answerability is not None else None
        return Generator(self.model, self.tokenizer, index=index, retrieval=self.config.retrieval,
                         answerability=head, **kwargs)


def _prepare_quantized(base, keep_skipped_dtype: bool | None = None) -> None:
    """A quantized base made ready to train an adapter on (peft's QLoRA recipe: every base weight frozen, its
    norms and embeddings in float32); a full-precision base is left as it is.

    The recipe casts every other half-precision weight to float32, the linear layers quantize_skip kept too.
    keep_skipped_dtype (None: where the base is on CUDA) keeps those in their load dtype: the training loop computes
    under bfloat16 autocast there, so float32 copies would double their memory for nothing (for an 8B Llama's
    down_proj and v_proj, 4 GB); on the CPU it computes in float32 without autocast, which needs them upcast."""
    if not quantized(base):
        return
    from peft import prepare_model_for_kbit_training

    kept = quantize_skipped_linears(base)
    if keep_skipped_dtype is None:
        keep_skipped_dtype = any(p.device.type == "cuda" for m in kept.values() for p in m.parameters())
    held = kept if keep_skipped_dtype else {}

    def put(name: str, module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, module)

    for name in held:  # out of the model while peft casts its parameters
        put(name, torch.nn.Identity())
    try:
        # checkpointing is the trainer's own switch (TrainConfig.gradient_checkpointing), not peft's
        prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    finally:
        for name, module in held.items():
            put(name, module.requires_grad_(False))


def _index_info(index) -> dict:
    encoder = (getattr(index, "manifest", None) or {}).get("encoder") or {}
    return {"path": str(getattr(index, "path", "")), "encoder": getattr(index, "encoder_name", None),
            "encoder_fingerprint": encoder.get("fingerprint"), "chunks": len(index)}


def check_index(info: dict, index) -> None:
    """The index must be embedded by the encoder the adapter was trained with (dense scores differ otherwise)."""
    recorded = (info.get("index") or {}).get("encoder_fingerprint")
    found = ((getattr(index, "manifest", None) or {}).get("encoder") or {}).get("fingerprint")
    if recorded and found and recorded != found:
        raise EncoderMismatchError(
            f"the adapter was trained with an index built by encoder {info['index'].get('encoder')!r} "
            f"(fingerprint {recorded}), but index {index.path} was built by {index.encoder_name!r} "
            f"(fingerprint {found}); rebuild the index with --encoder {info['index'].get('encoder')}")


def save_with_head(adapter_dir, head: AnswerabilityHead, out_dir, *, record: dict, overwrite: bool = False) -> Path:
    """A copy of the adapter folder with `head` as its answerability head, everything else byte for byte (its
    training checkpoints left out), written whole or not at all. record: what the head was fitted on, kept as
    retro_config.json's "calibration". out_dir may be the adapter folder itself, with `overwrite`."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    info = read_retro_config(adapter_dir)
    if out_dir.exists() and not overwrite:
        raise InputError(f"{out_dir} exists: choose another --out, or --overwrite to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} is a file, not an adapter folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for item in adapter_dir.iterdir():
            if item.name in (ANSWERABILITY_FILE, RETRO_CONFIG, "checkpoints"):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        head.save(tmp)
        info = {**info, "answerability_sha256": sha256_file(tmp / ANSWERABILITY_FILE), "calibration": record}
        (tmp / RETRO_CONFIG).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        replace_folder(tmp, out_dir, carry_over={"checkpoints"})  # (in place: its checkpoints stay)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_answerability(adapter_dir, info: dict) -> AnswerabilityHead | None:
    """The adapter's calibrated head, checked against the checksum its save recorded (None if it has none)."""
    adapter_dir = Path(adapter_dir)
    recorded = info.get("answerability_sha256")
    path = adapter_dir / ANSWERABILITY_FILE
    if recorded is None:
        return None
    if not path.is_file() or sha256_file(path) != recorded:
        raise InputError(f"{path} is missing or does not match {RETRO_CONFIG} (changed after the save)")
    return AnswerabilityHead.load(adapter_dir)


def load_soft_tokens(adapter_dir, info: dict) -> SoftTokens | None:
    """The adapter's soft tokens (`kvcache.soft`), checked against the checksum its save recorded (None: none)."""
    path = Path(adapter_dir) / SOFT_TOKENS_FILE
    recorded = info.get("soft_tokens_sha256")
    if recorded is None:
        return None
    if not path.is_file() or sha256_file(path) != recorded:
        raise InputError(f"{path} is missing or does not match {RETRO_CONFIG} (changed after the save)")
    return SoftTokens.load(adapter_dir)


def read_retro_config(adapter_dir) -> dict:
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise InputError(f"adapter folder not found: {adapter_dir}")
    path = adapter_dir / RETRO_CONFIG
    for name in ADAPTER_FILES:
        if not (adapter_dir / name).is_file():
            raise InputError(f"{adapter_dir} is not an adapter folder: {name} is missing")
    if not path.is_file():
        raise InputError(f"{adapter_dir} is a PEFT adapter without {RETRO_CONFIG} (not saved by retro-peft)")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e.msg})") from None
    if not isinstance(info, dict) or "adapter" not in info or "base_model" not in info:
        raise InputError(f"{path} lacks the 'adapter' or 'base_model' section")
    for name, key in CHECKSUM_KEYS.items():
        recorded = info.get(key)
        if recorded and sha256_file(adapter_dir / name) != recorded:
            raise InputError(f"{adapter_dir}/{name} does not match {RETRO_CONFIG} "
                             "(the files were changed or mixed up after the save)")
    return info
