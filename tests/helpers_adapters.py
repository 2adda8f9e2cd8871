"""Shared builders for the adapter/training/generation tests: a tiny random Llama and a tiny real index."""

from __future__ import annotations

import json
from pathlib import Path

import torch

DOCS = [
    {"id": "normans", "title": "Normans", "text": "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France. Their leader Rollo swore fealty to King Charles III."},
    {"id": "tea", "title": "Tea", "text": "Tea is an aromatic beverage prepared by pouring hot water over cured leaves of the Camellia sinensis shrub, native to East Asia."},
    {"id": "rhine", "title": "Rhine", "text": "The Rhine is a European river that begins in the Swiss Alps and flows into the North Sea in the Netherlands, about 1,230 kilometres long."},
    {"id": "oxygen", "title": "Oxygen", "text": "Oxygen is a chemical element with symbol O and atomic number 8. It was discovered by Carl Wilhelm Scheele in Uppsala in 1773."},
    {"id": "chess", "title": "Chess", "text": "Chess is a board game for two players played on a square board of 64 squares arranged in an eight-by-eight grid."},
    {"id": "piano", "title": "Piano", "text": "The piano is a keyboard instrument invented in Italy by Bartolomeo Cristofori around the year 1700."},
]

QA = [
    {"id": "q1", "question": "What region in France is named after the Normans?", "answers": ["Normandy"], "gold_doc_ids": ["normans"]},
    {"id": "q2", "question": "Into which sea does the Rhine flow?", "answers": ["the North Sea"], "gold_doc_ids": ["rhine"]},
    {"id": "q3", "question": "What is the atomic number of oxygen?", "answers": ["8"], "gold_doc_ids": ["oxygen"]},
    {"id": "q4", "question": "Who invented the piano?", "answers": ["Bartolomeo Cristofori"], "gold_doc_ids": ["piano"]},
    {"id": "q5", "question": "How many squares does a chess board have?", "answers": ["64"], "gold_doc_ids": ["chess"]},
    {"id": "q6", "question": "Who discovered tea in the Alps?", "answers": [], "is_impossible": True, "gold_doc_ids": ["tea"]},
    {"id": "q7", "question": "Which shrub are tea leaves taken from?", "answers": ["Camellia sinensis"], "gold_doc_ids": ["tea"]},
    {"id": "q8", "question": "Who was the queen of the Normans?", "answers": [], "is_impossible": True, "gold_doc_ids": ["normans"]},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from retro_peft.models import resolve_generator

    return AutoTokenizer.from_pretrained(resolve_generator("smollm2-135m"))


def tiny_llama_folder(path: Path, tokenizer, seed: int = 0, initializer_range: float = 0.02) -> Path:
    """A 2-layer random Llama (real LlamaForCausalLM) with the SmolLM2 tokenizer, saved as a model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, initializer_range=initializer_range,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=1)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_index(path: Path, docs: list[dict] | None = None, encoder: str = "minilm"):
    from retro_peft.index import IndexConfig, build_index

    corpus = write_jsonl(path.parent / f"{path.name}-docs.jsonl", docs or DOCS)
    return build_index(path, [corpus], IndexConfig(encoder=encoder, chunk_tokens=64, overlap=8))


def single_thread() -> None:
    """One intra-op thread: the CI machine's 2 cores are shared, and oversubscribed
    OpenMP threads spin-wait (measured 50x slower on a tiny model); results also
    stay bit-identical between processes."""
    torch.set_num_threads(1)


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the environment of a test's subprocess (see `single_thread`)


class Crash(Exception):
    """Raised by `crash_at`: a training run stopped mid-way, as a crash would stop it."""


def crash_at(step: int):
    """A `train(on_step=...)` callback that raises Crash once `step` is done."""
    def on_step(done, _loss):
        if done == step:
            raise Crash
    return on_step


def resume_equals_straight(main, capsys, args: list[str], killed: Path, straight: Path) -> None:
    """`retro-peft train ARGS --out KILLED --resume` continues after the killed run's checkpoint and ends with
    the very adapter of the same run never interrupted (`--out STRAIGHT`)."""
    import json

    import torch
    from safetensors.torch import load_file

    assert main(["train", *args, "--out", str(killed), "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from"] >= 5
    assert main(["train", *args, "--out", str(straight)]) == 0
    a = load_file(killed / "adapter_model.safetensors")
    b = load_file(straight / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_killed_at_first_checkpoint(args: list[str], out: Path, timeout: float = 240) -> None:
    """Run `retro-peft train ARGS --out OUT` in its own process and SIGKILL it (no cleanup code runs) as soon as
    its first checkpoint is written; check that it died mid-run with a checkpoint and no finished adapter."""
    import os
    import subprocess
    import sys
    import time

    from retro_peft.training import latest_checkpoint

    proc = subprocess.Popen([sys.executable, "-m", "retro_peft.cli", "train", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **ONE_THREAD})
    try:
        deadline = time.monotonic() + timeout
        while latest_checkpoint(out) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.kill()
    finally:
        proc.wait()
    assert proc.returncode == -9, "the run finished before it could be killed"
    assert latest_checkpoint(out) is not None and not (out / "retro_config.json").exists()
