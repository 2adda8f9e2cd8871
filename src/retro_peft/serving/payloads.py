"""OpenAI's response bodies, built as the models of `schemas` and serialised from them.

A completion's body is cached without its `id` and `created` (`unstamped`); `stamped` puts them back in
front of the cached bytes, so a response-cache hit costs a concatenation, not a model (see
middleware.RequestContext._cache_hit). Errors are `ApiError.body()`.
"""

from __future__ import annotations

import time

from fastapi.responses import Response

from retro_peft.generation import Answer
from retro_peft.index import Hit
from retro_peft.serving.ids import new_response_id
from retro_peft.serving.schemas import (AssistantMessage, ChatChoice, ChatChunk, ChatChunkChoice, ChatDelta,
                                        ChatLogprobs, ChatResponse, Citation, CompletionChoice, CompletionChunk,
                                        CompletionChunkChoice, CompletionLogprobs, CompletionResponse,
                                        RetrieveResponse, TokenLogprob, TopLogprob, Usage)

_STAMP = {"id", "created"}
DONE = b"data: [DONE]\n\n"  # the last server-sent event of a stream


def kind(chat: bool) -> str:
    """The response's `object`: "chat.completion" or "text_completion" (also the response cache's namespace)."""
    return (ChatResponse if chat else CompletionResponse).model_fields["object"].default


def citations(answer: Answer) -> list[Citation]:
    return [Citation(chunk_id=c[0], doc_id=c[1], title=c[2], score=c[3]) for c in answer.citations]


def answered(answer: Answer) -> dict:
    """What each choice says besides its text: its citations, and whether (and by what score) it abstained."""
    return {"citations": citations(answer), "abstained": answer.abstained, "answerability": answer.answerability}


def usage(answers: list[Answer], chat: bool = False) -> Usage:
    """The token counts; a chat's also says how many earlier turns its prompt left out (`dropped_turns`)."""
    prompt = sum(a.prompt_tokens for a in answers)
    completion = sum(a.completion_tokens for a in answers)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 dropped_turns=sum(a.dropped_turns for a in answers) if chat else None)


def chat_logprobs(answer: Answer, tokenizer) -> ChatLogprobs | None:
    """OpenAI's chat `logprobs`: each token's text, log-probability, UTF-8 bytes and top alternatives."""
    if answer.logprobs is None:
        return None

    def top(token_id: int, logprob: float) -> TopLogprob:
        text = tokenizer.decode([token_id])
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    return ChatLogprobs(content=[TokenLogprob(**top(t, lp).model_dump(), top_logprobs=[top(a, alp) for a, alp in alts])
                                 for t, lp, alts in answer.logprobs])


def completion_logprobs(answer: Answer, tokenizer) -> CompletionLogprobs | None:
    """The legacy completions `logprobs`: tokens, their log-probabilities, top alternatives, text offsets."""
    if answer.logprobs is None:
        return None
    tokens = [tokenizer.decode([t]) for t, _, _ in answer.logprobs]
    offsets = [sum(len(x) for x in tokens[:i]) for i in range(len(tokens))]
    alternatives = [{tokenizer.decode([a]): alp for a, alp in alts} for _, _, alts in answer.logprobs]
    return CompletionLogprobs(tokens=tokens, token_logprobs=[lp for _, lp, _ in answer.logprobs],
                              top_logprobs=alternatives if any(alternatives) else None, text_offset=offsets)


def completion(answers: list[Answer], model: str, chat: bool, tokenizer=None) -> CompletionResponse | ChatResponse:
    """One choice per answer, with its citations and abstention (and, if asked for, its log-probabilities:
    `tokenizer` spells the tokens)."""
    ident, created = new_response_id(chat), int(time.time())
    if chat:
        choices = [ChatChoice(index=i, message=AssistantMessage(content=a.text), finish_reason=a.finish_reason,
                              logprobs=chat_logprobs(a, tokenizer), **answered(a)) for i, a in enumerate(answers)]
        return ChatResponse(id=ident, created=created, model=model, choices=choices, usage=usage(answers, chat))
    choices = [CompletionChoice(index=i, text=a.text, finish_reason=a.finish_reason,
                                logprobs=completion_logprobs(a, tokenizer), **answered(a))
               for i, a in enumerate(answers)]
    return CompletionResponse(id=ident, created=created, model=model, choices=choices, usage=usage(answers))


def unstamped(response: CompletionResponse | ChatResponse) -> bytes:
    """The response's JSON without `id` and `created`: what the response cache keeps."""
    return response.model_dump_json(exclude=_STAMP).encode()


def stamped(body: bytes, ident: str, created: int) -> bytes:
    """`body` (from `unstamped`) with `id` and `created` put back, first, as OpenAI sends them."""
    return b'{"id":"%s","created":%d,' % (ident.encode(), created) + body[1:]


def restamped(body: bytes, chat: bool) -> bytes:
    """A cached body as a new response: a new id, created now."""
    return stamped(body, new_response_id(chat), int(time.time()))


def json_response(body: bytes) -> Response:
    return Response(body, media_type="application/json")


def retrieval(model: str, hits: list[Hit]) -> bytes:
    """The passages found; metadata values JSON cannot hold are given as strings."""
    return RetrieveResponse(model=model, data=[h.to_dict() for h in hits]).model_dump_json(fallback=str).encode()


def event(data: bytes) -> bytes:
    """One server-sent event."""
    return b"data: " + data + b"\n\n"


class Chunks:
    """The server-sent events of one streamed answer, in OpenAI's chunk format (`CompletionChunk`, `ChatChunk`)."""

    def __init__(self, model: str, chat: bool, tokenizer=None):
        self.model, self.chat, self.tokenizer = model, chat, tokenizer  # the tokenizer spells logprobs' tokens
        self.id, self.created = new_response_id(chat), int(time.time())

    def opening(self) -> list[bytes]:
        """What a chat stream starts with: the role, with empty content (a completion stream, nothing)."""
        if not self.chat:
            return []
        return [self._event([ChatChunkChoice(index=0, delta=ChatDelta(role="assistant", content=""))])]

    def piece(self, text: str, logprobs: list | None = None) -> bytes:
        """A piece of the text; `logprobs`: (token id, log p, alternatives) of the tokens decoded with it."""
        if logprobs is None:
            return self._event([self._choice(text)])
        answer = Answer(text=text, logprobs=logprobs)
        spelt = (chat_logprobs if self.chat else completion_logprobs)(answer, self.tokenizer)
        return self._event([self._choice(text, logprobs=spelt)])

    def last(self, answer: Answer, usage_chunk: bool) -> list[bytes]:
        """The finish reason, the citations, the abstention and the usage; with `usage_chunk` the usage again,
        without choices (OpenAI's `stream_options.include_usage`). Then [DONE]."""
        used = usage([answer], self.chat)
        events = [self._event([self._choice(None, answer.finish_reason, answered(answer))], used)]
        if usage_chunk:
            events.append(self._event([], used))
        return events + [DONE]

    def _choice(self, text: str | None, finish_reason: str | None = None, last: dict | None = None,
                logprobs=None) -> CompletionChunkChoice | ChatChunkChoice:
        """A chunk's choice; `last` (from `answered`): the fields only the last chunk has."""
        if self.chat:
            return ChatChunkChoice(index=0, delta=ChatDelta(content=text), finish_reason=finish_reason,
                                   logprobs=logprobs, **(last or {}))
        return CompletionChunkChoice(index=0, text=text or "", finish_reason=finish_reason, logprobs=logprobs,
                                     **(last or {}))

    def _event(self, choices: list, used: Usage | None = None) -> bytes:
        chunk = (ChatChunk if self.chat else CompletionChunk)(id=self.id, created=self.created, model=self.model,
                                                              choices=choices, usage=used)
        return event(chunk.model_dump_json().encode())
