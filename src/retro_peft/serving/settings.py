"""Server settings: one object, read from a YAML/TOML file and the environment.

Precedence (highest first): explicit arguments (the CLI flags) > environment
variables > the config file > the defaults here. Environment variables use the
prefix `RETRO_PEFT_` and `__` between nested names, e.g.
`RETRO_PEFT_BATCHING__MAX_BATCH_SIZE=16` or `RETRO_PEFT_AUTH__JWT__SECRET=...`.
`RETRO_PEFT_API_KEYS` (comma-separated, see `auth.parse_key_list`) adds API keys.

With `domains` unset the server serves every registered domain
(`retro-peft domain add`), read when the server starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource,
                               YamlConfigSettingsSource)

from retro_peft.choices import DType, HistoryStrategy, KVLayout, Quantize, check_quantize, check_quantize_skip
from retro_peft.errors import InputError

# uvicorn's event loop. Not uvloop: under 200 connections on 2 cores uvloop left some connections
# unanswered for seconds while serving the others (cached requests: max latency 2.0-6.8 s, p99 up to
# 4.7 s), where asyncio's loop stayed within 127 ms at 5-20% fewer requests/s (BENCHMARKS.md, Serving).
EVENT_LOOP = "asyncio"

# The semantic tier's default cosine (with the same content words in order, serving/cache.py): 0 false hits on
# SQuAD's distinct questions about one paragraph, and ~98% of the paraphrases benchmarks/semantic_cache.py makes
# hit (0.95: ~50%); by the cosine alone no threshold below 0.998 gets to 0 (BENCHMARKS.md, Semantic cache).
SEMANTIC_THRESHOLD = 0.9

Scope = Literal["generate", "retrieve", "admin"]
SCOPES: tuple[str, ...] = ("generate", "retrieve", "admin")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not silently ignored


class DomainConfig(_Section):
    name: str
    index: str  # index name under $RETRO_PEFT_HOME/indexes, or a path
    adapter: str | None = None
    description: str | None = None
    kv_cache: str | None = None  # the domain's frozen KV cache file (built on first load); None: full prefill
    kv_layout: KVLayout | None = None  # with kv_cache: block (default), prefix (same answers), blend or deviation
    choices: list[str] | None = None  # default answer choices (a request's `guided_choice` comes first)
    abstain_at: float | None = Field(None, ge=0.0, le=1.0)  # the head's answer rate; 0: never abstain by score
    history: HistoryStrategy | None = None  # a follow-up's search query (a request's `retrieval.history` first)

    @model_validator(mode="after")
    def _layout_needs_a_cache(self):
        if self.kv_layout is not None and self.kv_cache is None:
            raise ValueError(f"domain {self.name!r}: kv_layout needs kv_cache (the frozen KV cache file)")
        return self


class GenerationConfig(_Section):
    default_max_tokens: int = Field(64, ge=1)
    max_tokens_limit: int = Field(512, ge=1, description="the largest max_tokens a request may ask for")
    max_prompt_tokens: int = Field(2048, ge=1, description="the longest prompt (question) in tokens")
    # The library's default (greedy); OpenAI's would be 1.0. Greedy answers are what a
    # retrieval QA server is for, and they are the ones that can be cached.
    default_temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_prompts_per_request: int = Field(16, ge=1, description="completions: the longest list of prompts")


class BatchingConfig(_Section):
    mode: Literal["passes", "continuous"] = Field(
        "passes", description="passes: each batch decoded to completion (serving/batcher.py); continuous: rows "
                              "join and leave one running batch at every decode step (serving/scheduler.py)")
    max_batch_size: int = Field(32, ge=1, description="1 turns batching off")
    max_wait_ms: float = Field(50.0, ge=0,
                               description="a pass waits up to this, or 10% of a mean pass, for the requests it expects")
    max_queue: int = Field(256, ge=1, description="requests waiting beyond this get 503 + Retry-After")
    request_timeout_s: float = Field(120.0, gt=0, description="queue wait + generation; then 503 + Retry-After")


class ApiKeyConfig(_Section):
    name: str
    key: SecretStr | None = None  # plain key: hashed when read, never kept
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    scopes: list[Scope] = Field(default_factory=lambda: ["generate", "retrieve"])

    @model_validator(mode="after")
    def _one_key(self):
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError(f"API key {self.name!r}: give exactly one of key and key_sha256")
        return self


class JwtConfig(_Section):
    secret: SecretStr | None = None  # HS256/384/512
    public_key_file: str | None = None  # RS*/ES* (needs the `cryptography` package)
    algorithms: list[str] = Field(default_factory=lambda: ["HS256"])
    audience: str | None = "retro-peft"
    issuer: str | None = None
    leeway_s: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.secret is not None or self.public_key_file is not None


class AuthConfig(_Section):
    keys: list[ApiKeyConfig] = Field(default_factory=list)
    jwt: JwtConfig = Field(default_factory=JwtConfig)
    # No keys and no JWT secret is refused unless asked for here (or with --no-auth).
    allow_unauthenticated: bool = False


class LimitsConfig(_Section):
    enabled: bool = True
    requests_per_minute: int = Field(600, ge=1)
    tokens_per_minute: int = Field(200_000, ge=1, description="prompt tokens + max_tokens, counted at admission")
    storage_uri: str = Field("memory://", description="memory:// or redis://host:port/db (several replicas)")
    strategy: Literal["moving-window", "fixed-window", "sliding-window-counter"] = "moving-window"


class CacheConfig(_Section):
    enabled: bool = True
    ttl_s: float = Field(600.0, gt=0)
    max_entries: int = Field(10_000, ge=1, description="in-memory bound; Redis is bounded by its maxmemory policy")
    redis_url: str | None = Field(None, description="redis://host:port/db to share the caches between replicas")
    retrieval: bool = True  # also cache /v1/retrieve results
    disk_dir: str | None = Field(None, description="a folder for the disk tier (between memory and Redis): "
                                                   "entries survive restarts; None: no disk tier")
    disk_bytes: int = Field(1 << 30, ge=1 << 20, description="the disk tier's bound per cache (responses, "
                                                             "retrieval); the oldest entries go first")
    semantic: bool = Field(False, description="answer a question from the cached answer of a near-identical "
                                              "earlier one (same domain, settings, index version); `x-cache: "
                                              "semantic`")
    semantic_threshold: float = Field(SEMANTIC_THRESHOLD, gt=0.0, le=1.0,
                                      description="the cosine (by the domain's index encoder) a question needs to "
                                                  "an earlier one for a semantic hit")


class HttpConfig(_Section):
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_k: int = Field(50, ge=1)
    max_stop: int = Field(4, ge=0)
    max_choices: int = Field(32, ge=2, description="the most `guided_choice` strings a request may give")
    cors_origins: list[str] = Field(default_factory=list)


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RETRO_PEFT_", env_nested_delimiter="__", extra="ignore")

    model: str = "smollm2-135m"
    device: str | None = None
    dtype: DType = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on a CPU; bfloat16 halves CPU prefill on CPUs with "
                            "native bf16 (AVX512-BF16, AMX)")
    quantize: Quantize | None = Field(
        None, description="load the base model 4bit (NF4) or 8bit by bitsandbytes (pip install "
                          "'retro-peft[quantize]'); every domain's adapter answers on it")
    quantize_skip: list[str] = Field(
        default_factory=list, description="with quantize: the linear layers kept unquantized, by the end of their "
                                          "name, e.g. [down_proj] (more memory, closer to the full model's "
                                          "answers)")
    compile_decode: bool = Field(
        False, description="CUDA only: prefill short prompts (a frozen KV cache's question) and run every decode "
                           "step as CUDA graphs (the first request of each shape compiles; a graph that fails "
                           "falls back to eager decoding with one warning)")
    max_adapters: int = Field(8, ge=1)
    domains: list[DomainConfig] | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    graceful_shutdown_s: float = Field(30.0, ge=0)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"  # logging and uvicorn both know these
    log_json: bool = True
    api_keys: SecretStr | None = None  # RETRO_PEFT_API_KEYS

    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)

    @model_validator(mode="after")
    def _quantize_needs_bitsandbytes(self):
        # at start-up, with the pip command, rather than as a failed model load once the server runs
        check_quantize(self.quantize)
        self.quantize_skip = list(check_quantize_skip(self.quantize, self.quantize_skip))
        return self


def load_settings(config_file: str | Path | None = None, **overrides) -> ServeSettings:
    """Settings from `config_file` (.yaml/.yml/.toml), the environment and `overrides`."""
    path = Path(config_file) if config_file else None
    if path is not None:
        if not path.is_file():
            raise InputError(f"config file {path} does not exist")
        if path.suffix.lower() not in (".yaml", ".yml", ".toml"):
            raise InputError(f"config file {path}: use .yaml, .yml or .toml")

    class _FromFile(ServeSettings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings: PydanticBaseSettingsSource,
                                       env_settings, dotenv_settings, file_secret_settings):
            sources = [init_settings, env_settings]
            if path is not None:
                source = TomlConfigSettingsSource if path.suffix.lower() == ".toml" else YamlConfigSettingsSource
                sources.append(source(settings_cls, path))
            return tuple(sources)

    from pydantic import ValidationError

    try:
        return _FromFile(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        raise InputError(f"bad server settings{f' in {path}' if path else ''}:\n{e}") from None
