"""`retro-peft demo`: the whole pipeline on retro-peft's own documentation, in one command.

1. Index the documentation that ships inside the package (`data/demo/docs/*.md`)
   as `$RETRO_PEFT_HOME/indexes/retro-docs`.
2. Load SmolLM2-135M-Instruct and answer the held-out questions
   (`data/demo/qa-eval.jsonl`) closed-book, then with retrieval.
3. Train a RetroLoRA adapter on the training questions (`data/demo/qa-train.jsonl`,
   RAFT-style examples) and save it to `$RETRO_PEFT_HOME/adapters/retro-docs`.
4. Answer the held-out questions with RetroLoRA + retrieval, print the three
   setups side by side and a few answers with their citations.
5. Register the domain `retro-docs` (index + adapter).

Every phase reuses the library's own building blocks (`build_index`,
`build_examples`, `train`, `Generator`, `score`, `add_domain`); this module only
chooses small sizes (`DemoConfig`) that finish in minutes on a laptop CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from collections.abc import Callable

from retro_peft import paths
from retro_peft.errors import InputError

DOMAIN = "retro-docs"
DESCRIPTION = "retro-peft's own documentation (built by `retro-peft demo`)"
SETUPS = ("base, closed-book", "base + retrieval", "RetroLoRA + retrieval")
# `run_demo`'s phases, in order; the long ones draw a progress bar (chunks embedded, questions answered, steps)
PHASES = ("index the documentation", "load the base model", "answer with the base model", "train RetroLoRA",
          "answer with RetroLoRA", "register the domain")


@dataclass
class DemoConfig:
    """Sizes of the demo. The defaults take ~5-8 minutes on 2 idle CPU cores."""

    name: str = DOMAIN  # the index, adapter and domain name
    model: str = "smollm2-135m"
    encoder: str = "minilm"
    # Index: short chunks keep prompts short (the step time grows with the prompt).
    chunk_tokens: int = 128
    overlap: int = 24
    # Prompts: 2 retrieved passages in at most ~450 tokens. No RAFT distractor: on a CPU the
    # step time grows with the prompt, and the 1 - P share of examples already teaches abstention.
    k: int = 2
    distractors: int = 0
    oracle_fraction: float = 0.8
    context_tokens: int = 448
    # Training.
    method: str = "lora"
    steps: int = 40
    batch_size: int = 4
    lr: float = 1e-3  # twice the CLI's default for LoRA (default_lr, 5e-4): the demo trains for only 40 steps
    seed: int = 0
    # Evaluation.
    eval_limit: int | None = None  # None: every held-out question
    max_new_tokens: int = 24
    gen_batch_size: int = 8
    show_answers: int = 4  # answers printed with their citations
    threads: int | None = None  # torch CPU threads (None: torch's default, one per core)

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        """A smoke run: a few steps, a few questions, short answers (~1-2 minutes on a CPU)."""
        return cls(**{"steps": 2, "batch_size": 2, "eval_limit": 4, "max_new_tokens": 8, "show_answers": 2,
                      **overrides})

    def validate(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"--steps must be a positive integer, got {self.steps!r}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise InputError(f"the evaluation limit must be positive, got {self.eval_limit!r}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads must be positive, got {self.threads!r}")


# -- the shipped data ----------------------------------------------------------------------------

def data_dir() -> Path:
    """`retro_peft/data/demo`: the documentation corpus and its QA pairs."""
    return Path(str(resources.files("retro_peft") / "data" / "demo"))


def docs_dir() -> Path:
    return data_dir() / "docs"


def qa_file(split: str) -> Path:
    if split not in ("train", "eval"):
        raise InputError(f"unknown QA split {split!r}: choose train or eval")
    return data_dir() / f"qa-{split}.jsonl"


def load_demo_qa(split: str):
    from retro_peft.qa import load_qa

    return load_qa(qa_file(split), require_answers=split == "train")


def adapter_dir(name: str = DOMAIN) -> Path:
    return paths.home() / "adapters" / name


# -- phases ----------------------------------------------------------------------------------------

class Timer:
    """Prints `==> [i/phases] phase` when a phase starts and its wall and CPU time when it ends; keeps both.

    CPU time (this process, all threads) does not depend on what else runs on the
    machine: on N idle cores a phase takes roughly cpu / N seconds.
    """

    def __init__(self, emit: Callable[[str], None] = print, phases: int | None = None):
        self.emit, self.phases = emit, phases
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    @contextlib.contextmanager
    def phase(self, name: str):
        count = f"[{len(self.seconds) + 1}/{self.phases}] " if self.phases else ""
        self.emit(f"==> {count}{name}")
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        self.seconds[name], self.cpu_seconds[name] = time.perf_counter() - t0, time.process_time() - c0
        self.emit(f"    {name}: {self.seconds[name]:.1f} s ({self.cpu_seconds[name]:.1f} s CPU)")

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start

    @property
    def total_cpu(self) -> float:
        return time.process_time() - self.cpu_start


def build_demo_index(config: DemoConfig, *, progress: bool = True):
    """(Re)build the documentation index under `$RETRO_PEFT_HOME/indexes/<name>` (atomic, like every index write)."""
    from retro_peft.index import IndexConfig, build_index

    index_config = IndexConfig(encoder=config.encoder, chunk_tokens=config.chunk_tokens, overlap=config.overlap)
    return build_index(config.name, [docs_dir()], index_config, overwrite=True, progress=progress)


def retrieval_config(config: DemoConfig):
    from retro_peft.adapters import RetrievalConfig

    return RetrievalConfig(k=config.k, distractors=config.distractors, oracle_fraction=config.oracle_fraction,
                           context_tokens=config.context_tokens)


def create_model(config: DemoConfig):
    """SmolLM2 with a fresh adapter. LoRA starts as the identity (B = 0), and the base rows run with it disabled."""
    from retro_peft.adapters import RetroPeftModel, config_for_method

    adapter_config = config_for_method(config.method, retrieval=retrieval_config(config), steps=config.steps)
    return RetroPeftModel.create(config.model, adapter_config, seed=config.seed)


def evaluate_base(model, index, items, config: DemoConfig, *, progress: bool = True) -> dict:
    """The base model (adapter disabled), closed-book and with retrieval."""
    from retro_peft.generation import Generator
    from retro_peft.training import evaluate

    generator = Generator(model.model, model.tokenizer, index=index, retrieval=retrieval_config(config),
                          max_new_tokens=config.max_new_tokens, batch_size=config.gen_batch_size)
    with model.model.disable_adapter():
        return {
            SETUPS[0]: evaluate(generator, items, retrieval=False, desc=SETUPS[0], progress=progress),
            SETUPS[1]: evaluate(generator, items, retrieval=True, desc=SETUPS[1], progress=progress),
        }


def train_demo_adapter(model, index, items, config: DemoConfig, out_dir: Path, *, progress: bool = True):
    """RAFT-style examples from the training questions, then `train`; the adapter is saved to `out_dir`."""
    from retro_peft.training import TrainConfig, build_examples, train

    examples = build_examples(items, index, model.tokenizer, model.retrieval, seed=config.seed)
    with_gold = sum(ex.has_gold for ex in examples)
    mean_len = sum(len(ex) for ex in examples) / len(examples)
    print(f"    {len(examples)} examples ({with_gold} with the answer in context, {len(examples) - with_gold} "
          f"abstain), {mean_len:.0f} tokens on average")
    train_config = TrainConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                               log_every=max(1, min(10, config.steps // 5)))
    data_sha = hashlib.sha256(qa_file("train").read_bytes()).hexdigest()
    return train(model, examples, train_config, out_dir=out_dir, index=index, data_sha256=data_sha,
                 progress=progress)


def evaluate_adapter(model, index, items, config: DemoConfig, *, progress: bool = True):
    from retro_peft.training import evaluate

    generator = model.generator(index=index, max_new_tokens=config.max_new_tokens, batch_size=config.gen_batch_size)
    return evaluate(generator, items, retrieval=True, desc=SETUPS[2], progress=progress)


def register_demo_domain(config: DemoConfig, out_dir: Path):
    from retro_peft.domains.registry import add_domain

    return add_domain(config.name, config.name, adapter=out_dir, description=DESCRIPTION, overwrite=True)


# -- reporting -------------------------------------------------------------------------------------

def _pct(value: float | None) -> str:
    return "    -" if value is None else f"{100 * value:5.1f}"


def format_table(results: dict) -> str:
    """The setups side by side: EM and F1 on answerable questions, abstention on unanswerable ones."""
    first = next(iter(results.values()))
    header = (f"{'setup':24s} {'EM':>6s} {'F1':>6s} {'abstain on':>11s} {'answered':>9s} {'gold doc':>9s}\n"
              f"{'':24s} {'':>6s} {'':>6s} {'unanswer.':>11s} {'answer.':>9s} {'in prompt':>9s}")
    lines = [header, "-" * 70]
    for name, r in results.items():
        lines.append(f"{name:24s} {_pct(r.em):>6s} {_pct(r.f1):>6s} {_pct(r.abstain_unanswerable):>11s} "
                     f"{_pct(r.answer_answerable):>9s} {_pct(r.retrieval_recall):>9s}")
    lines.append(f"({first.n} held-out questions: {first.n_answerable} answerable, {first.n_unanswerable} "
                 "unanswerable; scores in %; EM/F1 on answerable questions, an abstention scores 0)")
    return "\n".join(lines)


def pick_examples(result, n: int) -> list[dict]:
    """Up to `n` predictions: answerable ones first, and one unanswerable question if there is one."""
    if n <= 0:
        return []
    answerable = [p for p in result.predictions if p["answers"]]
    unanswerable = [p for p in result.predictions if not p["answers"]]
    chosen = answerable[: n - 1 if unanswerable and n > 1 else n] + unanswerable[:1]
    return chosen[:n]


def format_answers(result, n: int) -> str:
    lines = []
    for p in pick_examples(result, n):
        docs = list(dict.fromkeys(c[1] for c in p["citations"]))
        gold = " | ".join(p["answers"]) if p["answers"] else "(not in the docs: should abstain)"
        lines += [f"Q: {p['question']}", f"   answer: {p['prediction'] or '(empty)'}",
                  f"   cites:  {', '.join(docs) if docs else '-'}", f"   gold:   {gold}"]
    return "\n".join(lines)


@dataclass
class DemoResult:
    results: dict  # setup name -> EvalResult
    index_path: Path
    adapter_dir: Path
    domain: str
    seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    train: dict = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    total_cpu_seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"domain": self.domain, "index": str(self.index_path), "adapter": str(self.adapter_dir),
                "scores": {name: r.summary() for name, r in self.results.items()},
                "predictions": {name: r.predictions for name, r in self.results.items()},
                "train": self.train, "seconds": self.seconds, "total_seconds": self.total_seconds,
                "cpu_seconds": self.cpu_seconds, "total_cpu_seconds": self.total_cpu_seconds}


# -- the flow --------------------------------------------------------------------------------------

def run_demo(config: DemoConfig | None = None, *, out_dir: str | Path | None = None, progress: bool = True,
             report: str | Path | None = None) -> DemoResult:
    """Index the docs, evaluate the base model, train RetroLoRA, evaluate it, register the domain."""
    from retro_peft.storage import check_output_file
    from retro_peft.training.trainer import check_output_dir

    config = config or DemoConfig()
    config.validate()
    out_dir = Path(out_dir) if out_dir else adapter_dir(config.name)
    # Output paths are checked now, not after minutes of indexing, answering and training.
    check_output_dir(out_dir)
    if report:
        check_output_file(report, "report")
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    timer = Timer(phases=len(PHASES))
    print(f"retro-peft demo: home {paths.home()}, {config.steps} training steps, domain {config.name!r}")
    train_items, eval_items = load_demo_qa("train"), load_demo_qa("eval")
    eval_items = eval_items[: config.eval_limit] if config.eval_limit else eval_items

    with timer.phase(PHASES[0]):
        index = build_demo_index(config, progress=progress)
        print(f"    {index.manifest['counts']['documents']} documents -> {len(index)} chunks in {index.path}")
    with timer.phase(PHASES[1]):
        model = create_model(config)
        trainable, total = model.trainable_parameters()
        print(f"    {config.model} + {config.method} adapter: {trainable:,} trainable of {total:,} parameters")
    results = {}
    with timer.phase(PHASES[2]):
        results.update(evaluate_base(model, index, eval_items, config, progress=progress))
    with timer.phase(f"{PHASES[3]} ({config.steps} steps)"):
        trained = train_demo_adapter(model, index, train_items, config, out_dir, progress=progress)
        print(f"    final loss {trained.final_loss:.3f}, {trained.tokens_per_s:.0f} tokens/s; adapter in {out_dir}")
    with timer.phase(PHASES[4]):
        results[SETUPS[2]] = evaluate_adapter(model, index, eval_items, config, progress=progress)
    with timer.phase(PHASES[5]):
        spec = register_demo_domain(config, out_dir)
        print(f"    domain {spec.name}: index {spec.index}, adapter {spec.adapter}")

    result = DemoResult(results, index.path, out_dir, spec.name, dict(timer.seconds), timer.total,
                        {"steps": trained.steps, "final_loss": trained.final_loss, "losses": trained.losses,
                         "tokens_per_s": trained.tokens_per_s, "config": asdict(config)},
                        dict(timer.cpu_seconds), timer.total_cpu)
    print()
    print(format_table(results))
    print()
    print("Answers of RetroLoRA + retrieval:")
    print(format_answers(results[SETUPS[2]], config.show_answers))
    print()
    print(f"{'phase':32s} {'wall':>9s} {'CPU':>9s}")
    for name, seconds in timer.seconds.items():
        print(f"{name:32s} {seconds:7.1f} s {timer.cpu_seconds[name]:7.1f} s")
    print(f"{'total':32s} {result.total_seconds:7.1f} s {result.total_cpu_seconds:7.1f} s")
    if report:
        from retro_peft.storage import atomic_write_json

        atomic_write_json(Path(report), result.to_dict())
        print(f"report written to {report}")
    print(f'\nAsk it yourself:  retro-peft ask "What is the default LoRA rank?" --domain {spec.name}')
    return result


__all__ = ["DemoConfig", "DemoResult", "data_dir", "docs_dir", "format_table",
           "load_demo_qa", "qa_file", "run_demo"]
