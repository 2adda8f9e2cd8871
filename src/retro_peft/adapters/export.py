"""An adapter merged into its base model's weights, saved as a plain Hugging Face model folder.

For engines that serve one model without PEFT (TGI, llama.cpp after its own conversion, vLLM without
`--enable-lora`): the folder is what `AutoModelForCausalLM.from_pretrained` loads, safetensors weights and the
tokenizer, plus `retro_export.json` recording what was merged (the adapter's files' checksums, its base model and
the retrieval settings its prompts were trained with). Built as a temporary folder next to the target and renamed
into place (`storage.replace_folder`): readers see no folder, the old one or the new one, never a part.

No GGUF file: the `gguf` package (pip) writes GGUF files and maps tensor names, but the Hugging Face -> GGUF model
conversion (per-architecture hyper-parameters, Llama's query/key row permutation, and the tokenizer's
pre-tokenizer name that llama.cpp picks by hashing the tokenizer's output) lives in llama.cpp's
`convert_hf_to_gguf.py`, not in the package; run that script on the exported folder (docs/scale-out.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from retro_peft.adapters.model import CHECKSUM_KEYS, RetroPeftModel, read_retro_config
from retro_peft.base_model import DTYPES, save_model_folder
from retro_peft.errors import InputError
from retro_peft.storage import check_output_folder, write_folder

EXPORT_RECORD = "retro_export.json"
EXPORT_DTYPES = tuple(DTYPES)  # every dtype by name but "auto"


@dataclass
class ExportConfig:
    out: str | Path
    overwrite: bool = False  # replace an existing folder at `out`
    dtype: str = "float32"  # the saved weights' dtype (the merge itself runs in float32)
    base_model: str | None = None  # None: the base model named in the adapter's retro_config.json

    def validate(self) -> None:
        if self.dtype not in EXPORT_DTYPES:
            raise InputError(f"unknown export dtype {self.dtype!r}: use {', '.join(EXPORT_DTYPES)}")
        check_output_folder(self.out, self.overwrite, "export folder")


def export_merged(adapter_dir, config: ExportConfig) -> dict:
    """Merge the adapter in `adapter_dir` into its base model and save the result at `config.out`; returns the
    export record (also written as `retro_export.json` in the folder). Every check runs before the model loads."""
    config.validate()
    info = read_retro_config(adapter_dir)
    out = Path(config.out)
    # float32 on the CPU: the merge adds the adapter's low-rank product to each weight once, in full precision
    model = RetroPeftModel.load(adapter_dir, base_model=config.base_model, dtype=torch.float32, device="cpu")
    merged = model.model.merge_and_unload()
    merged.to(DTYPES[config.dtype])
    record = {"adapter": str(Path(adapter_dir).absolute()), "method": info.get("method"),
              "base_model": info["base_model"], "dtype": config.dtype,
              "retrieval": info["adapter"].get("retrieval"), "template": info.get("template"),
              **{key: info.get(key) for key in CHECKSUM_KEYS.values()}}
    write_folder(out, lambda tmp: save_model_folder(tmp, merged, model.tokenizer, EXPORT_RECORD, record))
    return {"out": str(out), **record}
