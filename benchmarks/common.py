"""What the benchmark scripts share: where things are, which machine ran them, timing and JSON output.

The scripts run as `python benchmarks/X.py`, so this folder is on `sys.path` and `import common` needs no
path edit; `retro_peft` itself comes from the installed package (`pip install -e .`). Only the standard
library is imported here at module level: `serve.py`'s load-generator subprocess imports this too.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the project root
# read-only data sets beside the checkout, never copied into it; RETRO_PEFT_DATA points elsewhere (on the GPU
# machine, a carried copy that is not part of the project)
DATA = Path(os.environ["RETRO_PEFT_DATA"]) if os.environ.get("RETRO_PEFT_DATA") else ROOT.parent / "shared" / "data"
SQUAD = DATA / "squad-v2-dev-5-articles.json"
WIKI = DATA / "wikipedia-vital-10k-en.jsonl"
RESULTS = ROOT / "benchmarks" / "results"  # the raw results BENCHMARKS.md cites
SCRATCH = ROOT / ".bench"  # indexes and run folders the scripts build (git-ignored)

# Random-weight Llama shapes for speed runs on machines without model weights (generation, throughput, serve).
RANDOM_CONFIGS = {
    # Llama-3.2-1B's shape with SmolLM2's vocabulary.
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=49152, max_position_embeddings=4096,
                     tie_word_embeddings=True),
    # Llama-3.1-8B's shape (its vocabulary too: the LM head is a real share of a step's bytes).
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                     tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True),
}


# -- the machine -------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (what `lscpu` shows as "Model name")."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict:
    """The machine and software a result was measured with (imports torch)."""
    import torch

    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "transformers": transformers_version,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def machine_summary(info: dict | None = None) -> str:
    """One line for a report: "<CPU model>, <N> cores"."""
    info = info or machine_info()
    return f"{info['cpu']}, {info['cores']} cores"


# -- data --------------------------------------------------------------------------------------


def wiki_query(article: dict) -> str | None:
    """The Wikipedia description-to-article task's query for one record of WIKI: its description when it has
    4 words or more and does not contain the title, else None (retrieval.py and routing.py share the task)."""
    description = (article.get("description") or "").strip()
    if len(description.split()) >= 4 and article["title"].lower() not in description.lower():
        return description
    return None


def wiki_data(limit: int | None = None):
    """(documents, queries) of the description-to-article task: every lead a document (title and topic as
    metadata), each article with a description query (wiki_query) a QAItem whose gold document is itself."""
    from retro_peft.index import Document
    from retro_peft.qa import QAItem

    docs, items = [], []
    with open(WIKI, encoding="utf-8") as f:
        for line in f:
            o = json.loads(line)
            docs.append(Document(o["id"], o["text"], {"title": o["title"], "topic": o["topic"]}))
            desc = wiki_query(o)
            if desc is not None:
                items.append(QAItem(id=o["id"], question=desc, answers=(), gold_doc_ids=(o["id"],)))
            if limit and len(docs) >= limit:
                break
    return docs, items


def is_tuning(article_id: str) -> bool:
    """The Wikipedia split shared by routing and retriever training: sha256(article id) even -> tuning half."""
    return int(hashlib.sha256(article_id.encode()).hexdigest(), 16) % 2 == 0


# -- timing ------------------------------------------------------------------------------------


def timed(fn, *args, **kwargs):
    """(wall seconds, result) of `fn(*args, **kwargs)`."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def pct(values, q) -> float:
    """The q-th percentile of `values`."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


# -- results -----------------------------------------------------------------------------------


def write_json(path, data) -> None:
    """`data` as indented JSON at `path` (its folder created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def print_json(data, out=None) -> None:
    """Print `data` as indented JSON, and write it to `out` too when given."""
    print(json.dumps(data, indent=2))
    if out:
        write_json(out, data)
