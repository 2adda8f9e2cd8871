"""A request's generation options as the library's configs, bounded by the server's settings
(bounds that depend on the settings are checked here rather than declared in the schema)."""

from __future__ import annotations

from retro_peft.domains.registry import check_choices
from retro_peft.errors import InputError
from retro_peft.generation import SamplingConfig, SearchOptions
from retro_peft.generation.grammar import JsonConstraint
from retro_peft.serving.errors import ApiError
from retro_peft.serving.schemas import ChatRequest, CompletionRequest, RetrievalOptions
from retro_peft.serving.settings import ServeSettings


def sampling(settings: ServeSettings, body: CompletionRequest | ChatRequest, chat: bool) -> SamplingConfig:
    limits = settings.generation
    max_tokens = (body.max_completion_tokens if chat else None) or body.max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens_limit:
        raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens_limit}",
                       param="max_tokens", code="invalid_value")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > settings.http.max_stop or any(not s for s in stop):
        raise ApiError(400, f"stop: at most {settings.http.max_stop} non-empty strings", param="stop",
                       code="invalid_value")
    temperature = limits.default_temperature if body.temperature is None else body.temperature
    try:
        return SamplingConfig(max_new_tokens=max_tokens, temperature=temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, stop=tuple(stop), seed=body.seed or 0,
                              logprobs=logprobs(body, chat))
    except InputError as e:
        raise ApiError(400, str(e), code="invalid_value") from None


def logprobs(body: CompletionRequest | ChatRequest, chat: bool) -> int | None:
    """How many alternatives per token to report (None: no log-probabilities), or a 400 naming the field."""
    if chat:
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        wanted = (body.top_logprobs or 0) if body.logprobs else None
    else:
        wanted = body.logprobs
    return wanted


def search(settings: ServeSettings, options: RetrievalOptions | None) -> SearchOptions | None:
    """The request's `retrieval` options; None: the domain's own."""
    if options is None:
        return None
    if options.k is not None and options.k > settings.http.max_k:
        raise ApiError(400, f"retrieval.k is at most {settings.http.max_k}", param="retrieval.k",
                       code="invalid_value")
    found = SearchOptions.of(options.k, options.mode, options.filters, options.history)
    return None if found == SearchOptions() else found


def choices(settings: ServeSettings, body: CompletionRequest | ChatRequest) -> tuple[str, ...] | None:
    """The request's `guided_choice` (checked as a domain's choices are); None: the domain's own, if any."""
    if body.guided_choice is None:
        return None
    if len(body.guided_choice) > settings.http.max_choices:
        raise ApiError(400, f"guided_choice: at most {settings.http.max_choices} choices", param="guided_choice",
                       code="invalid_value")
    try:
        return check_choices(body.guided_choice, "guided_choice")
    except InputError as e:
        raise ApiError(400, str(e), param="guided_choice", code="invalid_value") from None


def constraint(body: CompletionRequest | ChatRequest) -> JsonConstraint | None:
    """The request's `response_format` as a JSON constraint (None: free text), or a 400 naming the field. The
    schema is compiled (and refused if the grammar library cannot) by the router, before any generation."""
    form = body.response_format
    if form is None or form.type == "text":
        return None
    if body.guided_choice is not None:
        raise ApiError(400, "response_format: give a JSON response_format or guided_choice, not both",
                       param="response_format", code="invalid_value")
    if form.type == "json_object":
        return JsonConstraint()
    return JsonConstraint.of(form.json_schema.json_schema, strict=form.json_schema.strict is not False)
