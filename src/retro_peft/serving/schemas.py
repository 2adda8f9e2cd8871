"""Request and response models: OpenAI's shapes, plus retro-peft's `retrieval`, `guided_choice` (vLLM's name)
and, on each choice, `citations`, `abstained` and `answerability`.

Bounds that depend on the server's settings (max_tokens, k, stop strings) are
checked in `options.py` and the routers against the settings, so the schema stays
valid for every configuration; the fixed ones (temperature, top_p, n) are declared here.
`response_format` (`json_object`, `json_schema`) is enforced while decoding (`generation.grammar`).
No field is silently ignored: OpenAI fields this server does not implement (`tools`,
`logit_bias`, ...) are accepted only at their no-op value
(null, false, 0, empty) and otherwise refused with a 400 naming the field; `user`,
`metadata`, `store` and `service_tier` are accepted and documented as having no effect;
any other field is refused as unknown (a misspelt `max_token` would otherwise be
ignored).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from retro_peft.choices import HistoryStrategy, SearchMode

FinishReason = Literal["stop", "length", "cancelled"]
_LOGPROBS = ("the log-probability of each generated token under the model (before temperature and top-p), "
             "citation markers included; null for a guided_choice or abstained answer; streamed: each chunk "
             "carries the tokens decoded since the previous one")
_NOT_IMPLEMENTED = "not implemented: only its no-op value (null, false, 0, empty) is accepted, any other is a 400"
FilterValue = str | int | float | bool


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field the server would not use is refused, not ignored


class RetrievalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int | None = Field(None, ge=0, description="passages to retrieve (0: none); default: the domain's")
    mode: SearchMode | None = None
    filters: dict[str, FilterValue | list[FilterValue]] | None = Field(
        None, description="metadata filters: field -> value or list of accepted values")
    history: HistoryStrategy | None = Field(
        None, description="chat: how a follow-up's search query is built from the earlier turns (none: the last "
                          "user message alone; concat: with the previous turns, the newest weighted most; rewrite: "
                          "condensed into a standalone question by the base model); default: the domain's")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    # `schema` is the field's name in OpenAI's API; pydantic's BaseModel has a `schema` method, hence the alias
    json_schema: dict[str, Any] = Field(..., alias="schema", description="a JSON Schema (the answer is a document "
                                                                         "of it)")
    strict: bool | None = Field(None, description="true or null: no properties beyond the schema's (xgrammar's "
                                                  "strict mode); false: additional properties allowed where the "
                                                  "schema does not forbid them")


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: `text` (free), `json_object` (any JSON object) or `json_schema` (a document
    of the given schema), enforced token by token while decoding; a schema the grammar library cannot compile
    is a 400 before any generation."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, description="with type json_schema: the schema")

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type json_schema, and only then")
        return self


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
    # vLLM's extension, under its name: the answer is exactly one of these strings (scored, not decoded)
    guided_choice: list[str] | None = Field(
        None, description="the answer is one of these (two or more different non-empty strings; at most "
                          "`http.max_choices`), or the abstention phrase; default: the domain's choices, if any")

    # Accepted and without effect (OpenAI bookkeeping a self-hosted server has no use for).
    user: str | None = Field(None, description="accepted, no effect")
    metadata: dict[str, str] | None = Field(None, description="accepted, no effect")
    store: bool | None = Field(None, description="accepted, no effect (nothing is stored)")
    service_tier: str | None = Field(None, description="accepted, no effect")

    response_format: ResponseFormat | None = Field(
        None, description="the answer's format: text, json_object or json_schema (enforced while decoding; not with "
                          "guided_choice)")

    # OpenAI fields this server does not implement: their no-op value (null, false, 0, empty) is accepted, any
    # other refused with a 400 naming the field.
    tools: Any = Field(None, description=_NOT_IMPLEMENTED + " (this server calls no tools)")
    tool_choice: Any = Field(None, description=_NOT_IMPLEMENTED)
    parallel_tool_calls: Any = Field(None, description=_NOT_IMPLEMENTED)
    functions: Any = Field(None, description=_NOT_IMPLEMENTED)
    function_call: Any = Field(None, description=_NOT_IMPLEMENTED)
    logit_bias: Any = Field(None, description=_NOT_IMPLEMENTED)
    presence_penalty: Any = Field(None, description=_NOT_IMPLEMENTED)
    frequency_penalty: Any = Field(None, description=_NOT_IMPLEMENTED)
    best_of: Any = Field(None, description=_NOT_IMPLEMENTED + " (1 is accepted)")
    echo: Any = Field(None, description=_NOT_IMPLEMENTED)
    suffix: Any = Field(None, description=_NOT_IMPLEMENTED)
    modalities: Any = Field(None, description=_NOT_IMPLEMENTED + " (['text'] is accepted)")
    audio: Any = Field(None, description=_NOT_IMPLEMENTED)
    prediction: Any = Field(None, description=_NOT_IMPLEMENTED)
    reasoning_effort: Any = Field(None, description=_NOT_IMPLEMENTED)

    @field_validator("tools", "tool_choice", "parallel_tool_calls",
                     "functions", "function_call", "logit_bias", "presence_penalty", "frequency_penalty", "best_of",
                     "echo", "suffix", "modalities", "audio", "prediction", "reasoning_effort")
    @classmethod
    def _not_implemented(cls, value, info):
        if value is None or value is False or value in (0, "", [], {}, ["text"]) \
                or (info.field_name == "best_of" and value == 1) \
                or (info.field_name == "tool_choice" and value == "none"):
            return None
        raise ValueError(f"{info.field_name} is not implemented by this server; leave it out (or send its "
                         "no-op value)")


# Requests any server answers (`auto` routes to one of its domains, or to none): the documentation's examples,
# which schemathesis also sends, so that its checks reach answers and not only refusals.
_QUESTION = "Who invented the piano?"


class CompletionRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "auto", "prompt": _QUESTION}, {"model": "auto", "prompt": _QUESTION, "stream": True}]})
    prompt: str | list[str] = Field(..., description="a question, or a list of questions (one choice each)")
    logprobs: int | None = Field(None, ge=0, le=5, description=_LOGPROBS + "; the number is how many most likely "
                                                                           "alternatives per token (0-5)")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """The last user message is the question; the messages before it (system and developer ones as the system
    prompt) go into its prompt. `tool` messages are refused (400): this server calls no tools."""
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "auto", "messages": [{"role": "user", "content": _QUESTION}]},
        {"model": "auto", "messages": [{"role": "user", "content": _QUESTION}], "stream": True,
         "stream_options": {"include_usage": True}}]})
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool | None = Field(None, description=_LOGPROBS)
    top_logprobs: int | None = Field(None, ge=0, le=20, description="with logprobs: the most likely alternatives "
                                                                    "per token (0-20)")
    max_completion_tokens: int | None = Field(None, ge=1)


class Citation(BaseModel):
    chunk_id: str
    doc_id: str
    title: str | None = None
    score: float


def _absent(value) -> bool:
    return value is None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    dropped_turns: int | None = Field(
        None, exclude_if=_absent,
        description="chat only: the earlier user/assistant messages left out of the prompt (the oldest) to fit the "
                    "domain's prompt budget")


# Sent only in a stream's last chunk (None elsewhere: the key is left out, as OpenAI's streams do).
_IN_LAST_CHUNK = {"default": None, "exclude_if": _absent}
_ANSWERABILITY = ("the calibrated answerability score the answer was given or abstained by (`abstained`: below "
                  "its threshold); null (in a stream: absent) when the domain's adapter has no answerability head")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None
    citations: list[Citation] = Field(default_factory=list)
    abstained: bool = False
    answerability: float | None = Field(None, description=_ANSWERABILITY)


class CompletionChunkChoice(CompletionChoice):
    """A piece of the text; the last piece (empty) has the finish reason, the citations and the abstention."""
    finish_reason: FinishReason | None = None
    citations: list[Citation] | None = Field(**_IN_LAST_CHUNK)
    abstained: bool | None = Field(**_IN_LAST_CHUNK)
    answerability: float | None = Field(**_IN_LAST_CHUNK, description=_ANSWERABILITY)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None
    citations: list[Citation] = Field(default_factory=list)
    abstained: bool = False
    answerability: float | None = Field(None, description=_ANSWERABILITY)


class ChatDelta(BaseModel):
    """What a chunk adds to the message: the role first (with empty content), then pieces of content."""
    role: Literal["assistant"] | None = Field(None, exclude_if=_absent)
    content: str | None = Field(None, exclude_if=_absent)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    citations: list[Citation] | None = Field(**_IN_LAST_CHUNK)
    abstained: bool | None = Field(**_IN_LAST_CHUNK)
    answerability: float | None = Field(**_IN_LAST_CHUNK, description=_ANSWERABILITY)


class _Completion(BaseModel):
    """What every completion response and streamed chunk carries; each narrows `object` (which keeps its place
    in the JSON) and adds its `choices` and `usage`."""
    id: str
    object: str
    created: int
    model: str


class CompletionResponse(_Completion):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class ChatResponse(_Completion):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunk(_Completion):
    """One server-sent event of a streamed completion (OpenAI streams completions under the same `object`)."""
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChunkChoice]
    usage: Usage | None = Field(**_IN_LAST_CHUNK)


class ChatChunk(_Completion):
    """One server-sent event of a streamed chat completion. With `stream_options.include_usage` one more
    chunk, without choices, repeats the usage."""
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(**_IN_LAST_CHUNK)


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid",  # no client sends extra fields here: one is a typo
                              json_schema_extra={"examples": [{"model": "auto", "query": _QUESTION, "k": 2}]})
    model: str = Field(..., min_length=1, max_length=128, description="a domain name, or `auto`")
    query: str = Field(..., min_length=1)
    k: int = Field(5, ge=1)
    mode: SearchMode = "hybrid"
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
