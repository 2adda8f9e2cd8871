"""Request and response models: OpenAI's shapes, plus retro-peft's `retrieval` and `citations`.

Bounds that depend on the server's settings (max_tokens, k, stop strings) are
checked in `app.py` against the settings, so the schema stays valid for every
configuration; the fixed ones (temperature, top_p, n) are declared here.
Unknown OpenAI fields (`user`, `logit_bias`, ...) are accepted and ignored,
as OpenAI-compatible servers do; /v1/retrieve is retro-peft's own, so there an
unknown field (a misspelt `filters`) is an error.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RetrievalMode = Literal["hybrid", "dense", "sparse"]
FinishReason = Literal["stop", "length", "cancelled"]
FilterValue = str | int | float | bool


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields this server does not use


class RetrievalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int | None = Field(None, ge=0, description="passages to retrieve (0: none); default: the domain's")
    mode: RetrievalMode | None = None
    filters: dict[str, FilterValue | list[FilterValue]] | None = Field(
        None, description="metadata filters: field -> value or list of accepted values")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(_Request):
    model: str = Field(..., min_length=1, max_length=128, description="a domain name, or `auto`")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    retrieval: RetrievalOptions | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(..., description="a question, or a list of questions (one choice each)")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class Citation(BaseModel):
    chunk_id: str
    doc_id: str
    title: str | None = None
    score: float


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None
    citations: list[Citation] = Field(default_factory=list)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason | None
    citations: list[Citation] = Field(default_factory=list)


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # no client sends extra fields here: one is a typo
    model: str = Field(..., min_length=1, max_length=128, description="a domain name, or `auto`")
    query: str = Field(..., min_length=1)
    k: int = Field(5, ge=1)
    mode: RetrievalMode = "hybrid"
    filters: dict[str, FilterValue | list[FilterValue]] | None = None


class RetrievedPassage(BaseModel):
    chunk_id: str
    doc_id: str
    text: str
    score: float
    metadata: dict[str, Any] = Field(default_factory=dict)


class RetrieveResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[RetrievedPassage]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "retro-peft"
    description: str | None = None
    adapter: bool = False


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "loading", "draining", "failed"]
    domains: dict[str, str] = Field(default_factory=dict, description="domain -> loaded | loading | error message")
