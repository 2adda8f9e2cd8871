"""`retro-peft export`: an adapter merged into its base model, saved as a Hugging Face model folder."""

from __future__ import annotations

import json

from retro_peft.choices import DTYPE_NAMES
from retro_peft.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("export", help="merge an adapter into its base model's weights and save a Hugging Face "
                                      "model folder (safetensors + tokenizer) for vLLM, TGI or llama.cpp")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder written by `retro-peft train`")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base weights (required: the "
                                                        "one export there is)")
    p.add_argument("--out", required=True, help="the folder to write (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (atomically)")
    p.add_argument("--model", help="base model to merge into (default: the one the adapter names)")
    p.add_argument("--dtype", choices=[d for d in DTYPE_NAMES if d != "auto"], help="the saved weights' dtype (default float32; the merge "
                                                           "runs in float32 either way)")
    p.set_defaults(func=run)


def run(args) -> int:
    from retro_peft.adapters.export import ExportConfig, export_merged

    if not args.merge:
        raise InputError("export writes the adapter merged into its base model: pass --merge (a plain adapter "
                         "folder already is a standard PEFT folder; vLLM loads it as is, see docs/scale-out.md)")
    config = ExportConfig(out=args.out, overwrite=args.overwrite, base_model=args.model,
                          **({"dtype": args.dtype} if args.dtype else {}))
    print(json.dumps(export_merged(args.adapter, config), indent=2))
    return 0
