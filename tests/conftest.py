import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SQUAD = DATA / "squad-v2-dev-5-articles.json"
WIKI = DATA / "wikipedia-vital-10k-en.jsonl"

# One home for the whole run: the converted SmolLM2 and the embedding cache are
# shared by all tests (each test still gets its own index folders).
_HOME = Path(os.environ.get("RETRO_PEFT_TEST_HOME", "/tmp/retro-peft-test-home"))
os.environ["RETRO_PEFT_HOME"] = str(_HOME)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_cli(*args, env=None, check=False, timeout=300):
    """Run the real `retro-peft` command in a new process."""
    proc = subprocess.run([sys.executable, "-m", "retro_peft.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"retro-peft {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def tokenizer():
    from helpers_adapters import smollm2_tokenizer

    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """A tiny random Llama folder (SmolLM2's tokenizer). initializer_range 0.2: with the default 0.02 the tied LM
    head is so small that no adapter could move the loss far from log(vocab), and "the loss goes down" would
    say little."""
    from helpers_adapters import tiny_llama_folder

    return tiny_llama_folder(tmp_path_factory.mktemp("tiny") / "llama", tokenizer, initializer_range=0.2)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """A tiny index of the helpers' DOCS (MiniLM)."""
    from helpers_adapters import tiny_index

    return tiny_index(tmp_path_factory.mktemp("index") / "idx")


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    """The helpers' QA items as a JSONL file."""
    from helpers_adapters import QA, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("qa") / "qa.jsonl", QA)


@pytest.fixture(scope="session")
def encoder():
    from retro_peft.index import Encoder

    return Encoder("minilm")


@pytest.fixture(scope="session")
def small_encoder_dir(tmp_path_factory, encoder):
    """A different (random, tiny) sentence-transformers encoder sharing MiniLM's tokenizer."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-encoder")
    config = BertConfig(vocab_size=encoder.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(folder / "bert")
    encoder.tokenizer.save_pretrained(folder / "bert")
    word = models.Transformer(str(folder / "bert"), max_seq_length=128)
    SentenceTransformer(modules=[word, models.Pooling(32)]).save(str(folder / "st"))
    return folder / "st"


@pytest.fixture
def corpus(tmp_path):
    """A small corpus in three formats."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "cats.md").write_text("# Cats\n\nCats are small carnivorous mammals. A cat purrs when content and sleeps "
                                  "up to sixteen hours a day.\n")
    (docs / "rust.txt").write_text("Rust is a systems programming language focused on memory safety. The borrow "
                                   "checker enforces ownership rules at compile time.\n")
    (tmp_path / "more.jsonl").write_text(
        '{"id": "volcano", "text": "Volcanoes erupt molten rock called lava from the mantle.", "title": "Volcano", "topic": "geo"}\n'
        '{"id": "glacier", "text": "Glaciers are slow rivers of ice that carve valleys.", "title": "Glacier", "topic": "geo"}\n'
        '{"id": "opera", "text": "Opera is a form of theatre in which music is a fundamental component.", "title": "Opera", "topic": "arts"}\n'
    )
    return tmp_path
