"""The domain registry: which index (and which adapter) make up each named domain.

A domain is one small JSON file, `$RETRO_PEFT_HOME/domains/<name>.json`:

    {"format": "retro-peft-domain", "format_version": 1, "name": "law",
     "index": "law-docs", "adapter": "/abs/path/to/adapter", "description": "...",
     "kv_cache": null, "kv_layout": null, "choices": null, "abstain_at": null, "history": null,
     "created_at": "..."}

`index` is kept as given when it is a bare index name (so it follows
`$RETRO_PEFT_HOME`), as an absolute path otherwise; `adapter` is always an
absolute path. `kv_cache` (opt-in, absolute path or null): the domain answers
through a frozen KV cache stored in that file (`retro_peft.kvcache`), computed
when the domain is first loaded and read back after; `kv_layout` says how
(`block`, the default, or `prefix`: see `retro_peft.choices.KVLayout`).
`choices` (optional): the answer choices its questions take by default (e.g. yes/no/maybe; a
request's own choices come first); `abstain_at` (optional): the answer rate its adapter's
calibrated answerability head abstains at (null: the rate it was calibrated for; 0: never by the
score). `history` (optional): how a follow-up's search query is built from its conversation
(`none`, `concat` or `rewrite`: see `retro_peft.choices.HistoryStrategy`; null: the adapter's retrieval
setting, else none). Files written before these keys existed read as null.
Files are written atomically, so a crash never leaves half a domain.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from retro_peft import paths
from retro_peft.choices import HISTORY_STRATEGIES, KV_LAYOUTS, check_kv_layout
from retro_peft.errors import InputError, RetroPeftError
from retro_peft.index import open_index
from retro_peft.storage import atomic_write_json, check_output_file

FORMAT = "retro-peft-domain"
FORMAT_VERSION = 1
AUTO = "auto"  # reserved: "pick the domain for me" wherever a domain name is accepted
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DomainSpec:
    """One registered domain."""

    name: str
    index: str  # an index name under $RETRO_PEFT_HOME/indexes, or an absolute path
    adapter: str | None = None  # absolute path of a PEFT adapter folder; None = base model + retrieval
    description: str | None = None
    kv_cache: str | None = None  # absolute path of the domain's frozen KV cache file; None = full prefill
    created_at: str | None = None
    kv_layout: str | None = None  # how it uses the cache: block (None means block), prefix, blend or deviation
    choices: tuple[str, ...] | None = None  # every answer is one of these (None: free answers)
    abstain_at: float | None = None  # the head's answer rate (None: as calibrated; 0: never abstains by score)
    history: str | None = None  # a follow-up's search query: none, concat or rewrite (None: the adapter's setting)

    @property
    def index_path(self) -> Path:
        return paths.resolve_index_path(self.index)

    @property
    def adapter_path(self) -> Path | None:
        return Path(self.adapter) if self.adapter else None

    def to_dict(self) -> dict:
        return asdict(self)


def domains_dir() -> Path:
    return paths.home() / "domains"


def check_domain_name(name: str) -> str:
    """A domain name becomes a file name: letters, digits, `_`, `.`, `-` only, and not `auto`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise InputError(f"bad domain name {name!r}: use letters, digits, '_', '.' and '-' only")
    if name == AUTO:
        raise InputError(f"{AUTO!r} is reserved (it asks for automatic routing); choose another domain name")
    return name


def check_choices(choices, field: str = "choices") -> tuple[str, ...]:
    """Answer choices as the domain file, `ask` and `serve` take them: two or more different non-empty strings."""
    if (not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) and c.strip() for c in choices)
            or len(set(choices)) < 2 or len(set(choices)) != len(choices)):
        raise InputError(f"{field} must be a list of at least two different non-empty strings, got {choices!r}")
    return tuple(choices)


def check_abstain_at(rate) -> float:
    """A domain's `abstain_at`: an answer rate in (0, 1], or 0 (never abstain by the score)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise InputError(f"abstain_at must be an answer rate in (0, 1] or 0 (off), got {rate!r}")
    return float(rate)


def check_history_strategy(strategy, field: str = "history") -> str:
    """A domain's `history`: how a follow-up's search query is built (`retro_peft.choices.HistoryStrategy`)."""
    if strategy not in HISTORY_STRATEGIES:
        raise InputError(f"{field} must be one of {', '.join(HISTORY_STRATEGIES)}, got {strategy!r}")
    return strategy


def add_domain(name: str, index: str | Path, adapter: str | Path | None = None, description: str | None = None,
               overwrite: bool = False, kv_cache: str | Path | None = None,
               kv_layout: str | None = None, choices: list[str] | tuple[str, ...] | None = None,
               abstain_at: float | None = None, history: str | None = None) -> DomainSpec:
    """Register a domain after checking that its index opens and its adapter folder is complete.

    kv_cache: a file for the domain's frozen KV cache (built on first load if missing); answers then
    change (passages do not attend to each other: BENCHMARKS.md), so it is opt-in.
    choices: the answers its questions choose from by default; abstain_at: the answer rate of its
    adapter's answerability head (the adapter must have one: a rate for no head would be ignored).
    """
    check_domain_name(name)
    file = _file(name)
    if file.exists() and not overwrite:
        raise InputError(f"domain {name!r} already exists: use overwrite (--overwrite) to replace it")
    choices = check_choices(choices) if choices is not None else None
    abstain_at = check_abstain_at(abstain_at) if abstain_at is not None else None
    history = check_history_strategy(history) if history is not None else None
    if abstain_at is not None and adapter is None:
        raise InputError("abstain_at needs an adapter with an answerability head (--adapter)")
    index_text = _check_index(index)
    adapter_text = _check_adapter(adapter, abstain_at) if adapter is not None else None
    if description is not None and not isinstance(description, str):
        raise InputError(f"domain description must be text, got {type(description).__name__}")
    if kv_cache is not None:
        kv_cache = Path(kv_cache).expanduser().resolve()
        check_output_file(kv_cache, "kv cache")
        kv_cache = str(kv_cache)
    if kv_layout is not None:
        if kv_cache is None:
            raise InputError("a KV cache layout needs a KV cache file (--kv-cache)")
        check_kv_layout(kv_layout)
    spec = DomainSpec(name, index_text, adapter_text, description or None, kv_cache, _now(), kv_layout, choices,
                      abstain_at, history)
    atomic_write_json(file, {"format": FORMAT, "format_version": FORMAT_VERSION, **spec.to_dict()})
    return spec


def get_domain(name: str) -> DomainSpec:
    return _read(_existing_file(name))


def list_domains() -> list[DomainSpec]:
    """Every readable domain. An unreadable or newer-format file is skipped with a warning, so that one
    bad file does not break `domain list`, routing or `serve`; `get_domain` of its name raises the error."""
    specs = []
    for file in _files():
        try:
            specs.append(_read(file))
        except RetroPeftError as e:
            log.warning("skipping domain %r: %s", file.stem, e)
    return specs


def remove_domain(name: str) -> DomainSpec | None:
    """Forget a domain (its index and adapter are left untouched).

    Returns what was removed, or None when its file was unreadable: a corrupt or newer-format domain
    must still be removable, so the file is deleted whether or not it parses.
    """
    file = _existing_file(name)
    try:
        spec = _read(file)
    except RetroPeftError:
        spec = None
    file.unlink()
    return spec


def _files() -> list[Path]:
    folder = domains_dir()
    return sorted(f for f in folder.glob("*.json") if _NAME.fullmatch(f.stem)) if folder.is_dir() else []


def _existing_file(name: str) -> Path:
    check_domain_name(name)
    file = _file(name)
    if not file.exists():
        known = [f.stem for f in _files()]  # names only: an unreadable file must not hide this message
        if not known:
            raise InputError(f"unknown domain {name!r}; known domains: none registered yet (add one with "
                             "`retro-peft domain add`, or run `retro-peft demo`)")
        raise InputError(f"unknown domain {name!r}; known domains: {', '.join(known)} (see `retro-peft domain list`)")
    return file


def _file(name: str) -> Path:
    return domains_dir() / f"{name}.json"


def _check_index(index: str | Path) -> str:
    if not str(index).strip():
        raise InputError("a domain needs an index: the index name is empty")
    path = paths.resolve_index_path(index)
    try:
        open_index(path, verify=False).close()
    except RetroPeftError as e:
        raise InputError(f"the domain's index does not open: {e}") from None
    # A bare name stays a name (it lives under $RETRO_PEFT_HOME); a path is stored absolute.
    return str(index) if path == paths.home() / "indexes" / str(index) else str(path)


def _check_adapter(adapter: str | Path, abstain_at: float | None = None) -> str:
    # Imported here: it loads torch, which `domain list` and `show` do not need.
    from retro_peft.adapters.model import load_answerability, read_retro_config

    path = Path(adapter).expanduser().resolve()
    # The checks the domain's loading does (files, retro_config.json, hashes): refused now, not at serve time.
    info = read_retro_config(path)
    if load_answerability(path, info) is None and abstain_at is not None:
        raise InputError(f"abstain_at needs an answerability head, and adapter {path} has none "
                         "(its folder has no answerability.json)")
    return str(path)


def _read(file: Path) -> DomainSpec:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"domain file {file} is unreadable: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{file} is not a retro-peft domain file")
    if not isinstance(data.get("format_version"), int) or data["format_version"] > FORMAT_VERSION:
        raise InputError(f"domain file {file} has format version {data.get('format_version')!r}; "
                         f"this retro-peft reads up to {FORMAT_VERSION}: upgrade retro-peft")
    if data.get("name") != file.stem or not isinstance(data.get("index"), str):
        raise InputError(f"domain file {file} is malformed (its name or index is missing or wrong)")
    if data.get("kv_layout") not in (None, *KV_LAYOUTS) or (data.get("kv_layout") and not data.get("kv_cache")):
        raise InputError(f"domain file {file} is malformed (kv_layout {data.get('kv_layout')!r}: "
                         f"{' or '.join(KV_LAYOUTS)}, with a kv_cache)")
    try:
        if data.get("choices") is not None:
            data["choices"] = check_choices(data["choices"])
        if data.get("abstain_at") is not None:
            check_abstain_at(data["abstain_at"])
        if data.get("history") is not None:
            check_history_strategy(data["history"])
    except InputError as e:
        raise InputError(f"domain file {file} is malformed ({e})") from None
    fields = DomainSpec.__dataclass_fields__
    return DomainSpec(**{k: v for k, v in data.items() if k in fields})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
