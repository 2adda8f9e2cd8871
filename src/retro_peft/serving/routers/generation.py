"""/v1/completions and /v1/chat/completions: OpenAI's endpoints over the domains. Greedy answers come from
the response cache when they can; `stream: true` answers as server-sent events (`streaming`). A chat's last
user message is the question and the messages before it go into its prompt (`_conversation`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool

from retro_peft.domains.registry import AUTO
from retro_peft.errors import InputError
from retro_peft.generation import SamplingConfig
from retro_peft.generation.grammar import JsonConstraint
from retro_peft.generation.prompt import Turn, with_choices
from retro_peft.serving import jobs, options, payloads
from retro_peft.serving.auth import Principal
from retro_peft.serving.cache import cache_key, semantic_text
from retro_peft.serving.dependencies import State, authorized
from retro_peft.serving.errors import ApiError, RateLimited
from retro_peft.serving.openapi import errors, streamed
from retro_peft.serving.schemas import (ChatChunk, ChatRequest, ChatResponse, CompletionChunk, CompletionRequest,
                                        CompletionResponse)
from retro_peft.serving.state import BASE, ServerState
from retro_peft.serving.streaming import stream

router = APIRouter(tags=["generation"])
Caller = Annotated[Principal, Depends(authorized("generate"))]
_ERRORS = errors(400, 401, 403, 404, 413, 429, 503)


@router.post("/v1/completions", response_model=CompletionResponse, responses={**_ERRORS, 200: streamed(CompletionChunk)})
async def completions(body: CompletionRequest, request: Request, state: State, caller: Caller) -> Response:
    questions = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    return await _generate(state, request, caller, body, questions, chat=False)


@router.post("/v1/chat/completions", response_model=ChatResponse, responses={**_ERRORS, 200: streamed(ChatChunk)})
async def chat_completions(body: ChatRequest, request: Request, state: State, caller: Caller) -> Response:
    question, history = _conversation(body)
    return await _generate(state, request, caller, body, [question], chat=True, history=history)


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _conversation(body: ChatRequest) -> tuple[str, tuple[Turn, ...]]:
    """(the question: the last user message, the turns before it: system and developer messages as the system
    prompt, user and assistant turns as they are), or a 400 naming the message at fault."""
    messages = body.messages
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users:
        raise ApiError(400, "messages: there is no user message to answer", param="messages", code="invalid_value")
    tool = next((i for i, m in enumerate(messages) if m.role == "tool"), None)
    if tool is not None:
        raise ApiError(400, f"messages[{tool}]: tool messages are not supported (this server calls no tools)",
                       param=f"messages[{tool}].role", code="invalid_value")
    texts = []
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if i > users[-1]:
            raise ApiError(400, f"{field}: the messages must end with the question (a user message), not with "
                                f"this {m.role} message", param=f"{field}.role", code="invalid_value")
        content = "\n".join(p.text for p in m.content) if isinstance(m.content, list) else m.content
        if not content or not content.strip():
            raise ApiError(400, f"{field}.content is empty", param=f"{field}.content", code="invalid_value")
        texts.append(content.strip())
    return texts[-1], tuple(Turn(_ROLES[m.role], t) for m, t in zip(messages, texts[:-1]))


async def _generate(state: ServerState, request: Request, caller: Principal, body: CompletionRequest | ChatRequest,
                    questions: list[str], chat: bool, history: tuple[Turn, ...] = ()) -> Response:
    request.state.domain = body.model
    model = state.resolve_domain(body.model)
    _check_questions(state, questions, body.stream, chat)
    sampling = options.sampling(state.settings, body, chat)
    search = options.search(state.settings, body.retrieval)
    choices = options.choices(state.settings, body)
    constraint = await _compiled(state, options.constraint(body))

    # Greedy answers are a function of (domain, question, earlier turns, settings): serve them from the cache.
    key = semantic = None
    if state.response_cache is not None and sampling.greedy and not body.stream:
        # what the answer depends on besides the questions (the semantic tier's bucket)
        shared = [model, state.bank.version(model), sampling.max_new_tokens, sampling.stop, search, choices,
                  [[t.role, t.content] for t in history], sampling.logprobs,
                  None if constraint is None else constraint.describe()]
        key = cache_key(payloads.kind(chat), [questions, shared])
        identity = getattr(request.state, "request_identity", None)  # set by RequestContext
        if identity is not None:
            state.known_requests.put(identity, (key, chat, body.model))
        cached = await state.response_cache.aget(key)
        state.metrics.cache.labels("response", "hit" if cached is not None else "miss").inc()
        if cached is not None:
            request.state.extra_headers["x-cache"] = "hit"
            return payloads.json_response(payloads.restamped(cached, chat))
        semantic = await _semantic_query(state, model, questions, history, cache_key(payloads.kind(chat), shared))
        if semantic is not None:
            near = state.semantic.nearest(semantic[0], questions[0], semantic[1])
            cached = None if near is None else await state.response_cache.aget(near)
            state.metrics.cache.labels("semantic", "hit" if cached is not None else "miss").inc()
            if cached is not None:
                request.state.extra_headers["x-cache"] = "semantic"
                return payloads.json_response(payloads.restamped(cached, chat))

    shown = questions if choices is None else [with_choices(q, choices) for q in questions]  # the prompt lists them
    await _admit_tokens(state, request, caller, shown, sampling, history)
    domains = [await state.route(q) for q in questions] if model == AUTO else [model] * len(questions)
    reported = (domains[0] if model == AUTO else model) or BASE
    if body.stream:
        usage_chunk = bool(body.stream_options and body.stream_options.include_usage)
        return stream(state, questions[0], domains[0], reported, sampling, search, chat, usage_chunk, choices,
                      history, constraint)
    answers = await jobs.wait_all(state, request, jobs.submit_all(state, questions, domains, sampling, search,
                                                                 choices, history, constraint))
    if answers is None:  # the client went away; nobody reads this
        return Response(status_code=499)
    response = payloads.completion(answers, reported, chat, state.bank.tokenizer)
    jobs.count_tokens(state, answers, domains)
    cacheable = payloads.unstamped(response)
    if key is not None:
        await state.response_cache.aset(key, cacheable)
        request.state.extra_headers["x-cache"] = "miss"
        if semantic is not None:
            state.semantic.add(semantic[0], questions[0], semantic[1], key)
    return payloads.json_response(payloads.stamped(cacheable, response.id, response.created))


async def _semantic_query(state: ServerState, model: str, questions: list[str], history: tuple[Turn, ...],
                          bucket: str):
    """(bucket, the question's embedding by its domain's index encoder) for the semantic tier, or None: the tier
    is off, or the request is not one it answers (`auto`, a domain without an index, several prompts, a chat
    follow-up: an earlier turn changes what a question means)."""
    if state.semantic is None or model == AUTO or len(questions) != 1 or history:
        return None
    index = state.bank.domains[model].index
    if index is None:
        return None
    vectors = await run_in_threadpool(index.encoder.encode, [semantic_text(questions[0])])
    return bucket, vectors[0]


async def _compiled(state: ServerState, constraint: JsonConstraint | None) -> JsonConstraint | None:
    """The constraint, once the grammar library has compiled it (a 400 naming the schema if it cannot); compiled
    grammars are cached, so decoding reuses this one."""
    if constraint is not None:
        try:
            await run_in_threadpool(state.bank.grammars.compile, constraint)
        except InputError as e:
            raise ApiError(400, f"response_format.json_schema.schema: {e}", param="response_format.json_schema.schema",
                           code="invalid_value") from None
    return constraint


def _check_questions(state: ServerState, questions: list[str], streamed: bool, chat: bool) -> None:
    limit = state.settings.generation.max_prompts_per_request
    if not questions or len(questions) > limit:
        raise ApiError(400, f"prompt: give 1 to {limit} prompts", param="prompt", code="invalid_value")
    if any(not isinstance(q, str) or not q.strip() for q in questions):
        raise ApiError(400, "the prompt is empty", param="messages" if chat else "prompt", code="invalid_value")
    if streamed and len(questions) > 1:
        raise ApiError(400, "stream: one prompt per streamed request", param="stream", code="invalid_value")


async def _admit_tokens(state: ServerState, request: Request, caller: Principal, questions: list[str],
                        sampling: SamplingConfig, history: tuple[Turn, ...] = ()) -> None:
    """Refuse a prompt over the length limit, and count the tokens the request may use against the caller's
    token limit (prompt + max_tokens per question, as OpenAI counts them before generating). A chat's prompt
    is all its messages: the earlier turns count too (even those its prompt will leave out)."""
    limit = state.settings.generation.max_prompt_tokens

    def tokens(text: str) -> int:
        return len(state.bank.tokenizer(text, add_special_tokens=False).input_ids)

    earlier = sum(tokens(t.content) for t in history)
    counts = [tokens(q) + earlier for q in questions]
    if max(counts) > limit:
        raise ApiError(400, f"the prompt has {max(counts)} tokens; this server allows at most {limit}",
                       param="messages" if history else "prompt", code="context_length_exceeded")
    if state.limiter is not None:
        try:
            request.state.extra_headers.update(
                await state.limiter.hit_tokens(caller.name, sum(counts) + sampling.max_new_tokens * len(questions)))
        except RateLimited:
            state.metrics.rejected.labels("rate_limit").inc()
            raise
