"""`retro-peft gptq`: a base model rounded once by GPTQ onto the NF4 grid that `--quantize 4bit` stores."""

from __future__ import annotations

import json

from retro_peft.choices import DTYPE_NAMES


def register(sub) -> None:
    from retro_peft.cli import parse_quantize_skip

    p = sub.add_parser("gptq", help="round a base model's weights onto bitsandbytes' 4-bit grid with GPTQ on "
                                    "calibration texts; train, ask and serve the saved folder with --quantize 4bit")
    p.add_argument("model", metavar="BASE", help="base model: packaged name, folder or Hugging Face id")
    p.add_argument("--calibration", nargs="+", required=True, metavar="PATH",
                   help="texts whose activations the rounding keeps close: files or folders as `index` reads them "
                        "(.txt, .md, .jsonl, SQuAD .json); your domain's documents or general text")
    p.add_argument("--out", required=True, help="the folder to write (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (atomically)")
    p.add_argument("--quantize-skip", type=parse_quantize_skip, default=(),
                   help="linear layers --quantize 4bit will keep unquantized (comma-separated): left unrounded; "
                        "pass the same names when loading the folder")
    p.add_argument("--samples", type=int, default=64, help="calibration windows (default 64)")
    p.add_argument("--tokens", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--device", help="where to round (default: cpu); cuda for large models")
    p.add_argument("--dtype", choices=[d for d in DTYPE_NAMES if d != "auto"], default="float32",
                   help="the model's dtype while rounding and the saved weights' (default float32)")
    p.set_defaults(func=run)


def run(args) -> int:
    from retro_peft.gptq import RoundingConfig, write_rounded_base
    from retro_peft.index.documents import load_documents

    config = RoundingConfig(out=args.out, overwrite=args.overwrite, quantize_skip=args.quantize_skip,
                            samples=args.samples, tokens=args.tokens, device=args.device, dtype=args.dtype)
    config.validate()  # before reading the texts
    texts = [doc.text for doc in load_documents(args.calibration)]
    print(json.dumps(write_rounded_base(args.model, texts, config), indent=2))
    return 0
