"""The adapter bank: several domains on one base model, loaded once.

A domain is an index + an optional adapter (+ optionally its frozen KV cache). The
bank keeps every loaded domain's index open and at most `max_adapters` adapters
in memory, evicting the least recently used (its weights are reloaded from disk
when it is asked for again). A domain whose adapter is missing or broken fails
alone: the error names it and the other domains keep serving.

Batches may mix domains: each row is prompted with its own domain's passages
and template, and decoded in one pass with its own adapter (`MixedLoRA`, for
LoRA adapters; other methods are decoded one domain group at a time). A bank
holds adapters of one PEFT method: PEFT cannot combine, say, LoRA and IA3
layers in one model.

A domain may also bring its adapter's calibrated answerability head (at the
domain's `abstain_at` rate) and default answer choices; each row carries its
own (`Row`), so they mix in a batch as well. Rows answered by scoring choices
are decoded one adapter at a time (see `_decode_groups`).

A row may be a conversation's follow-up: its `history` (the earlier turns) goes to its domain's
`Generator.rows`, which puts the turns in the prompt and searches by the domain's history strategy
(a domain's `history`, in place of its adapter's `RetrievalConfig.history`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import retro_peft

from retro_peft.adapters.config import RetroAdapterConfig
from retro_peft.adapters.model import CHECKSUM_KEYS, load_answerability, load_soft_tokens, read_retro_config
from retro_peft.base_model import (base_fingerprint, check_device, check_fingerprint, inference_dtype, load_base_model,
                                   quantize_skipped)
from retro_peft.choices import check_kv_layout
from retro_peft.domains.mixed_lora import MixedLoRA
from retro_peft.domains.registry import AUTO, check_abstain_at, check_choices, check_history_strategy
from retro_peft.domains.routing import Router
from retro_peft.errors import InputError, RetroPeftError
from retro_peft.generation import (Answer, BatchRunner, Generator, RetrievalConfig, SamplingConfig, SearchOptions,
                                   StaticDecode, stream_answer)
from retro_peft.index import Encoder, open_index
from retro_peft.index.index import read_manifest
from retro_peft.kvcache import load_or_build
from retro_peft.paths import resolve_index_path
from retro_peft.storage import sha256_file

log = logging.getLogger(__name__)


class DomainError(RetroPeftError):
    """A domain could not be loaded or used; the others are unaffected."""


@dataclass
class Domain:
    name: str
    generator: Generator  # its index and retrieval settings (the model is the bank's)
    adapter_dir: Path | None = None
    method: str | None = None
    # What its answers depend on besides the request (base model and dtype, library version, index content,
    # adapter files, retrieval settings, KV cache on or off): part of the server's cache keys, so a replica or
    # a restart with a retrained adapter or a rebuilt index never serves another version's cached answers
    # through a shared Redis. index_version: what its search results depend on (the retrieval cache's key).
    version: str = ""
    index_version: str = ""

    @property
    def index(self):
        return self.generator.index


class AdapterBank:
    def __init__(self, base_model: str = "smollm2-135m", *, max_adapters: int = 8, device: str | None = None,
                 dtype: str | torch.dtype | None = None, max_new_tokens: int = 64, batch_size: int = 32,
                 quantize: str | None = None, quantize_skip: Sequence[str] = (), compile_decode: bool = False):
        if max_adapters < 1:
            raise InputError(f"max_adapters must be at least 1, got {max_adapters}")
        self.base_model_name = base_model
        device = str(check_device(device))
        # bf16 on a GPU, fp32 on a CPU unless asked (adapters keep their own dtype)
        dtype = inference_dtype(device, dtype)
        # quantize: "4bit"/"8bit" (bitsandbytes); every adapter loads on the quantized base as on the full one.
        # quantize_skip: the linear layers it keeps unquantized, by name suffix (load_base_model)
        self.model, self.tokenizer, _ = load_base_model(base_model, dtype=dtype, device=device, quantize=quantize,
                                                        quantize_skip=quantize_skip)
        self.model.eval()
        self.fingerprint = base_fingerprint(self.model)
        # what every domain's answers depend on (part of each `Domain.version`)
        self._answers_version = [self.fingerprint, str(dtype), retro_peft.__version__]
        if quantize:  # (appended only when set: the cache keys of full-precision banks stay as they were)
            self._answers_version.append(quantize)
        kept = quantize_skipped(self.model)
        if kept:  # (likewise: those of fully quantized banks stay as they were)
            self._answers_version.append("skip:" + ",".join(sorted(kept)))
        self._auto_version: str | None = None  # `version(AUTO)`, recomputed after a load or unload
        self.max_adapters = max_adapters
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.domains: dict[str, Domain] = {}
        self._resident: OrderedDict[str, None] = OrderedDict()  # adapters in memory, least recent first
        self._mixed: MixedLoRA | None = None
        self._encoder = None  # one query encoder shared by every index with the same encoder
        # Rows routed to no domain: the base model, no retrieval.
        self._base_generator = Generator(self.model, self.tokenizer, index=None, retrieval=RetrievalConfig(k=0),
                                         max_new_tokens=max_new_tokens)
        # decodes every domain's rows; compile_decode (CUDA): prefills of short prompts and every decode step as CUDA
        # graphs (`StaticDecode`; graphs are per thread: the server's one batcher thread decodes everything)
        self._runner = BatchRunner(self.model, self.tokenizer, batch_size=batch_size,
                                   static=StaticDecode(self.model) if compile_decode else None)

    # -- loading -----------------------------------------------------------------------------

    def load(self, name: str, index, adapter: str | Path | None = None, *,
             kv_cache: str | Path | None = None, kv_layout: str | None = None,
             choices: list[str] | tuple[str, ...] | None = None, abstain_at: float | None = None,
             history: str | None = None) -> Domain:
        """Open a domain's index (a name, path or open Index) and load its adapter, if any.

        kv_cache: the domain's frozen KV cache file, computed there if missing (`kvcache.load_or_build`);
        its rows then prefill only their question (kv_layout block, the default) or what follows their
        first passage (prefix: a full prefill's answers).
        choices: the answers its questions choose from when a request gives none. abstain_at: the answer
        rate the adapter's answerability head abstains at (None: as calibrated; 0: never by the score);
        without a head, abstention is only the adapter's own phrase. history: how a follow-up's search query
        is built (none, concat, rewrite; None: the adapter's `RetrievalConfig.history`, else none).
        """
        try:
            if kv_layout is not None and kv_cache is None:
                raise InputError("kv_layout needs kv_cache (the frozen KV cache file)")
            layout = check_kv_layout(kv_layout) if kv_cache is not None else None
            choices = check_choices(choices) if choices else ()
            if abstain_at is not None:
                check_abstain_at(abstain_at)
            if history is not None:
                check_history_strategy(history)
            if isinstance(index, (str, Path)):
                index = open_index(index, encoder=self._shared_encoder(index))
            retrieval, method, adapter_files, head, soft = RetrievalConfig(), None, None, None, None
            if adapter is not None:
                info = read_retro_config(adapter)
                config = RetroAdapterConfig.from_dict(info["adapter"])
                retrieval, method = config.retrieval, config.method
                adapter_files = {file: info.get(key) or sha256_file(Path(adapter) / file)
                                 for file, key in CHECKSUM_KEYS.items()}
                check_fingerprint(info["base_model"], self.fingerprint, what=f"adapter {adapter}",
                                  found_name=self.base_model_name)
                head = load_answerability(adapter, info)
                # its soft tokens are stored after the cache's passages (answers change); without a cache unused
                soft = load_soft_tokens(adapter, info) if kv_cache is not None else None
                head = head.at_rate(abstain_at) if head is not None else None
            retrieval = retrieval if history is None else replace(retrieval, history=history)
        except RetroPeftError as e:
            raise DomainError(f"domain {name!r}: {e}") from None
        if name in self.domains:  # reloading a domain replaces it
            self.unload(name)
        generator = Generator(self.model, self.tokenizer, index=index, retrieval=retrieval,
                              max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, answerability=head,
                              choices=choices)
        index_version = _digest([index.manifest["encoder"], index.manifest["files"], retro_peft.__version__])
        # the head (its weights and the threshold picked) and the default choices change answers too (the
        # retrieval settings hold the history strategy)
        version = _digest([self._answers_version, index_version, adapter_files, asdict(retrieval), layout,
                           None if head is None else asdict(head), choices] + ([soft.fingerprint()] if soft else []))
        self.domains[name] = Domain(name, generator, Path(adapter) if adapter else None, method, version,
                                    index_version)
        self._auto_version = None
        try:
            if adapter is not None:
                self._ensure_resident(name)
            if kv_cache is not None:
                generator.kv_cache = self._frozen_cache(name, kv_cache, layout, soft)
        except Exception as e:  # an unwritable cache file or an out-of-memory build fails this domain alone
            self.unload(name)
            raise e if isinstance(e, DomainError) else DomainError(f"domain {name!r}: {e}") from None
        return self.domains[name]

    def _frozen_cache(self, name: str, path: str | Path, layout: str, soft=None):
        """The domain's frozen KV cache, for the weights it answers with (its adapter, or none, and its soft tokens,
        stored after every passage: `kvcache.soft`)."""
        domain = self.domains[name]
        with self.adapters_for([name]):
            cache = load_or_build(path, self.model, self.tokenizer, domain.index, domain.generator.retrieval,
                                  layout=layout, soft=soft)
        return cache.attach(self.model, check=False)  # load_or_build checked it against these weights

    def _shared_encoder(self, index_name):
        manifest = read_manifest(resolve_index_path(index_name))
        if self._encoder is None or self._encoder.fingerprint != manifest["encoder"]["fingerprint"]:
            self._encoder = Encoder(manifest["encoder"]["name"])
        return self._encoder

    def _ensure_resident(self, name: str) -> None:
        """Bring a domain's adapter into memory, evicting the least recently used beyond the bound."""
        domain = self.domains[name]
        if domain.adapter_dir is None:
            return
        if name in self._resident:
            self._resident.move_to_end(name)
            return
        while len(self._resident) >= self.max_adapters:
            self._drop_adapter(next(iter(self._resident)))
        from peft import PeftModel

        methods = {self.domains[n].method for n in self._resident}
        if methods and domain.method not in methods:
            # PEFT holds adapters of one type per model (it cannot mix LoRA and IA3 layers).
            raise DomainError(f"domain {name!r}: its {domain.method} adapter cannot share the base model with "
                              f"the {', '.join(sorted(methods))} adapters already loaded; use one bank per method")
        try:
            if not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(self.model, domain.adapter_dir, adapter_name=name)
            else:
                self.model.load_adapter(domain.adapter_dir, adapter_name=name)
        except Exception as e:  # a broken file must not take the bank down
            if isinstance(self.model, PeftModel) and name in self.model.peft_config:
                self.model.delete_adapter(name)
            raise DomainError(f"domain {name!r}: cannot load adapter {domain.adapter_dir}: {e}") from None
        self.model.eval()
        self._resident[name] = None
        self._mixed = None
        for holder in [self._runner, self._base_generator, *(d.generator for d in self.domains.values())]:
            holder.model = self.model

    def _drop_adapter(self, name: str) -> None:
        self._resident.pop(name, None)
        if name in getattr(self.model, "peft_config", {}):
            if self.model.active_adapter == name and len(self.model.peft_config) > 1:
                self.model.set_adapter(next(n for n in self.model.peft_config if n != name))
            self.model.delete_adapter(name)
        self._mixed = None

    def unload(self, name: str) -> None:
        self._get(name)
        self._drop_adapter(name)
        del self.domains[name]
        self._auto_version = None

    def activate(self, name: str) -> float:
        """Make `name` the active adapter (for single-domain batches); returns the seconds it took."""
        start = time.perf_counter()
        domain = self._get(name)
        self._ensure_resident(name)
        if domain.adapter_dir is not None:
            self.model.set_adapter(name)
        return time.perf_counter() - start

    def version(self, name: str) -> str:
        """A domain's `Domain.version`; for `auto`, every domain's (routing reads all their indexes)."""
        if name == AUTO:
            if self._auto_version is None:
                self._auto_version = _digest([self._answers_version,
                                              sorted((n, d.version) for n, d in self.domains.items())])
            return self._auto_version
        return self._get(name).version

    def _get(self, name: str) -> Domain:
        if name not in self.domains:
            known = ", ".join(sorted(self.domains)) or "none"
            raise InputError(f"unknown domain {name!r} (loaded domains: {known})")
        return self.domains[name]

    # -- answering ---------------------------------------------------------------------------

    def answer(self, question: str, domain: str | None, *, sampling: SamplingConfig | None = None,
               on_text=None, choices=None, history=None) -> Answer:
        """`history`: the conversation's earlier turns ({role, content} or `Turn`s, oldest first)."""
        stream = None if on_text is None else (lambda _row, delta: on_text(delta))
        return self.answer_many([question], [domain], sampling=sampling, on_text=stream,
                                choices=None if choices is None else [choices],
                                history=None if history is None else [history])[0]

    def stream(self, question: str, domain: str | None, *, sampling: SamplingConfig | None = None, choices=None,
               history=None):
        """Yield text pieces as they are generated, then the final `Answer`."""
        return stream_answer(lambda on_text: self.answer(question, domain, sampling=sampling, on_text=on_text,
                                                         choices=choices, history=history))

    def answer_many(self, questions: list[str], domains: list[str | None], *, sampling: SamplingConfig | None = None,
                    search: SearchOptions | None = None, on_text=None, cancelled=None,
                    choices: list | None = None, history: list | None = None,
                    constraints: list | None = None) -> list[Answer]:
        """Answer a batch whose rows may belong to different domains (None: base model, no retrieval).

        search: retrieval k / mode / filters for every row, in place of each domain's own.
        choices: per row, the strings its answer must be one of (None: its domain's choices, if any).
        history: per row, its conversation's earlier turns (None or empty: none).
        constraints: per row, the `JsonConstraint` its answer is decoded under (None: none).
        on_text(row, delta) streams each row's text; cancelled(row) -> bool stops a row (client gone).
        """
        sampling = sampling or SamplingConfig(max_new_tokens=self.max_new_tokens)
        rows = self.rows(questions, domains, search=search, choices=choices, history=history, constraints=constraints)
        return self.run_rows(rows, domains, sampling, on_text=on_text, cancelled=cancelled)

    # -- rows: `answer_many` in two steps, and what a scheduler that decodes rows itself needs ------------------
    # (serving.scheduler's continuous batching keeps its own running batch over `runner`)

    @property
    def runner(self) -> BatchRunner:
        """The one runner that decodes every domain's rows (its model is the bank's, adapters included)."""
        return self._runner

    def rows(self, questions: list[str], domains: list[str | None], *, search: SearchOptions | None = None,
             choices: list | None = None, history: list | None = None, constraints: list | None = None) -> list:
        """Each question's `Row`, prompted by its own domain (index, template, head, choices, KV cache)."""
        if len(questions) != len(domains) or any(x is not None and len(x) != len(questions)
                                                 for x in (choices, history, constraints)):
            raise InputError("answer_many needs one domain (and, if given, one choice list and one history) per "
                             "question")
        rows: list = [None] * len(questions)
        for name in set(domains):
            generator = self._base_generator if name is None else self._get(name).generator
            at = [r for r, d in enumerate(domains) if d == name]
            mine = None if choices is None else [choices[r] for r in at]
            turns = None if history is None else [history[r] for r in at]
            grammar = None if constraints is None else [constraints[r] for r in at]
            for r, row in zip(at, generator.rows([questions[r] for r in at], search=search, choices=mine,
                                                 history=turns, constraints=grammar)):
                rows[r] = row
        return rows

    def run_rows(self, rows: list, domains: list[str | None], sampling: SamplingConfig, *, on_text=None,
                 cancelled=None) -> list[Answer]:
        """Decode prepared rows (`rows`), row r with domain r's adapter, in as few passes as the adapters allow."""
        scored = [bool(row.choices) for row in rows]
        return self._runner.run(rows, sampling, on_text=on_text, cancelled=cancelled,
                                groups=lambda batch: self._groups(batch, domains, scored))

    def adapter_of(self, domain: str | None) -> str | None:
        """The adapter a domain's rows decode with (its name; None: the base model)."""
        return None if domain is None or self.domains[domain].adapter_dir is None else domain

    def mixes(self, adapter: str | None) -> bool:
        """Whether rows of this adapter can decode beside other adapters' in one forward (plain LoRA, or none)."""
        return adapter is None or self._mixed_lora().supports(adapter)

    def keep_resident(self, adapters) -> None:
        """Bring these adapters into memory (or mark them most recently used), in order."""
        for name in adapters:
            self._ensure_resident(name)

    def bring_in(self, adapter: str, in_use: set) -> bool:
        """Bring `adapter` into memory unless that would evict one in `in_use` (False: wait). The adapters in use
        are touched first, so the least recently used one evicted is never one of them."""
        if adapter in self._resident:
            return True
        if len(in_use | {adapter}) > self.max_adapters:
            return False
        self.keep_resident([*in_use, adapter])
        return True

    def adapters_for(self, domains: list[str | None]):
        """The adapter context for one forward over rows of these domains (or adapter names)."""
        adapters = [self.adapter_of(d) for d in domains]
        distinct = set(adapters)
        if distinct == {None}:
            return _base_only(self.model)
        if len(distinct) == 1:
            self.model.set_adapter(adapters[0])
            return contextlib.nullcontext()
        return self._mixed_lora().batch(adapters)

    def _groups(self, batch: list[int], domains: list[str | None], scored: list[bool]):
        """The runner's decode groups of one batch: its adapters brought into memory (at most max_adapters at
        a time), then one pass per group that can share it, inside that group's adapter context.
        scored[r]: row r is answered by scoring its choices."""
        for part in self._resident_parts(batch, domains):
            self.keep_resident(dict.fromkeys(domains[r] for r in part if domains[r] is not None))
            for group in self._decode_groups(part, domains, scored):
                yield group, self.adapters_for([domains[r] for r in group])

    def _resident_parts(self, rows: list[int], domains: list[str | None]) -> list[list[int]]:
        """Split rows so that each part needs at most max_adapters adapters in memory at once
        (loading one part's adapters must not evict another adapter of the same part)."""
        by = self._by_adapter(rows, domains)
        names = [a for a in by if a is not None]
        if len(names) <= self.max_adapters:
            return [rows]
        parts = [[r for a in names[i:i + self.max_adapters] for r in by[a]]
                 for i in range(0, len(names), self.max_adapters)]
        parts[0] += by.get(None, [])  # base-model rows ride along with the first part
        return [sorted(part) for part in parts]

    @property
    def grammars(self):
        """JSON constraints compiled for the base model (the server checks a request's schema with it)."""
        return self._runner.grammars

    def route(self, question: str) -> str | None:
        """The domain for `domain="auto"`: see `retro_peft.domains.routing`; None = base model, no retrieval."""
        return self.router().route(question).domain

    def router(self):
        key = tuple(sorted(self.domains))
        if getattr(self, "_router_key", None) != key:
            self._router = Router({name: d.index for name, d in self.domains.items()})
            self._router_key = key
        return self._router

    def _decode_groups(self, rows: list[int], domains: list[str | None], scored: list[bool]) -> list[list[int]]:
        """Rows decoded freely: one group if every adapter involved can share a mixed pass, else one group per
        adapter. Rows answered by scoring choices: one group per adapter, always, since their scoring pass runs
        each row once per choice, which a mixed pass's row -> adapter map does not follow."""
        free = [r for r in rows if not scored[r]]
        groups = list(self._by_adapter([r for r in rows if scored[r]], domains).values())
        adapters = {self.adapter_of(domains[r]) for r in free}
        if len(adapters) <= 1 or all(a is None or self.mixes(a) for a in adapters):
            return [free, *groups] if free else groups
        return [*self._by_adapter(free, domains).values(), *groups]

    def _by_adapter(self, rows: list[int], domains: list[str | None]) -> dict:
        """{adapter name or None: its rows}, in first-seen order."""
        by: dict = {}
        for r in rows:
            by.setdefault(self.adapter_of(domains[r]), []).append(r)
        return by

    def _mixed_lora(self) -> MixedLoRA:
        if self._mixed is None:
            self._mixed = MixedLoRA(self.model)
        return self._mixed


def _digest(parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _base_only(model):
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
