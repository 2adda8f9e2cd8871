"""Structured answers: JSON enforced while decoding, one token mask per constrained row and step.

The grammar library is xgrammar (MLC's; the structured-output backend of vLLM, SGLang and TensorRT-LLM).
Chosen over outlines-core and llguidance because it compiles a JSON Schema into a pushdown automaton with
the vocabulary's context-independent tokens precomputed, so a step's mask costs microseconds on a CPU (the
decode loop's cost is the forward, not the mask: measured in BENCHMARKS.md), it keeps one matcher per row
(rows of one batch may each have their own schema, or none), and it ships CPU wheels. It is installed with
`--no-deps`: it declares `triton`, which only its CUDA kernels use and which is hundreds of MB.

A `JsonConstraint` says what a row must produce: any JSON object, or a document of one JSON Schema. The
matcher allows the stop tokens only once the document is complete, so a constrained answer ends when its
JSON does. Whitespace between tokens is not free (`any_whitespace=False`): a small model otherwise fills its
budget with newlines. The budget is kept too: a row whose remaining max_tokens are no more than the tokens its
document needs to close (the shortest way out found by `Closing`: the grammar's forced text, then JSON's
shortest ends, e.g. `"` `}`) is given that way out token by token, so an answer that reaches max_tokens is
still a whole document, not half of one (it ends with the stop token the grammar then allows; only a budget
below the schema's shortest document still cuts one, with finish reason `length`, as OpenAI's).

Choice answers (`guided_choice`, a domain's choices) are not a grammar here: they are scored whole
(`constrained.choice_logprobs`), which compares the choices' full likelihoods in one forward, where a
token-by-token mask would commit to the likeliest first token ("n" of "no" over "maybe").
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

import torch

from retro_peft.errors import InputError

# `json_object`: any JSON object (xgrammar's built-in JSON grammar would also allow a bare string or number)
JSON_OBJECT_SCHEMA = '{"type": "object"}'
# JSON's shortest ends, tried in this order where the grammar forces nothing: close a string, an object, an
# array; the shortest value (a number, null, an empty string or container); a comma before a required key;
# then the same after the space xgrammar's separators put before a value (`": "`, `", "`).
CLOSERS = ('"', "}", "]", "0", "null", '""', "[]", "{}", ",", ' "', " 0", " null", ' ""', " []", " {}", " ")
# the closing path is looked for only this near the end of the budget (it costs a few grammar steps per row)
CLOSING_HORIZON = 48
# tokens to spare when closing starts: a path found again after a forced token may be a token longer (the
# forced text tokenized afresh), and closing a little early costs nothing
CLOSING_SLACK = 2
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # xgrammar's "[03:07:38] /project/cpp/file.cc:5082: "


@dataclass(frozen=True)
class JsonConstraint:
    """The answer is one JSON document: of `schema` (canonical JSON text of a JSON Schema), or any object.
    strict: no properties beyond those the schema names, unless it allows them (xgrammar's strict mode)."""

    schema: str | None = None
    strict: bool = True

    @classmethod
    def of(cls, schema: dict | None, strict: bool = True) -> JsonConstraint:
        """From a parsed schema (None: any JSON object). Its keys keep their order: properties are generated in
        the order the schema lists them."""
        if schema is None:
            return cls()
        if not isinstance(schema, dict):
            raise InputError(f"a JSON schema is a JSON object, got {type(schema).__name__}")
        return cls(json.dumps(schema, separators=(",", ":"), ensure_ascii=False), strict)

    def describe(self) -> list:
        """What the response cache's key holds of it."""
        return ["json", self.schema, self.strict]


@functools.lru_cache(maxsize=8)
def _compiler(tokenizer, vocab_size: int, stop_ids: tuple[int, ...]):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_ids))
    return xgr.GrammarCompiler(info, max_threads=1)  # compiled grammars are cached by the compiler


class Grammars:
    """Constraints compiled for one tokenizer and model vocabulary (the logits' width) and stop tokens."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids):
        self.compiler = _compiler(tokenizer, int(vocab_size), tuple(sorted(stop_ids)))
        self.vocab_size = int(vocab_size)
        self.closers = [ids[0] for ids in (tokenizer.encode(c, add_special_tokens=False) for c in CLOSERS)
                        if len(ids) == 1]

    def compile(self, constraint: JsonConstraint):
        """The compiled grammar, or an InputError saying why the library cannot compile the schema (or that it
        admits no document: `{"anyOf": []}` compiles to a grammar no token can start)."""
        import xgrammar as xgr

        try:
            compiled = self.compiler.compile_json_schema(constraint.schema or JSON_OBJECT_SCHEMA, any_whitespace=False,
                                                         strict_mode=constraint.strict)
        except (RuntimeError, ValueError, TypeError) as e:
            lines = [line for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
            reason = _LOG_PREFIX.sub("", lines[0]).removeprefix("Check failed: (error.empty()) is false: ")
            raise InputError(f"the JSON schema cannot be compiled: {reason}") from None
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        xgr.GrammarMatcher(compiled).fill_next_token_bitmask(bitmask, 0)
        if not bool(bitmask.any()):
            raise InputError("the JSON schema admits no document")
        return compiled

    def masks(self, constraints: list[JsonConstraint | None], budget: int | None = None) -> RowMasks | None:
        """The decode loop's logits processor for a batch (None: no row is constrained). budget: the tokens each
        row may generate (max_tokens), so that a document still open near the end is closed in time."""
        if all(c is None for c in constraints):
            return None
        closing = None if budget is None else Closing(self.closers, self.vocab_size)
        return RowMasks([None if c is None else self.compile(c) for c in constraints], self.vocab_size,
                        budget=budget, closing=closing)


class Closing:
    """The shortest way found to complete a matcher's document: the grammar's forced tokens where it forces
    some (`find_jump_forward_tokens`: a required key's `, "name": `), else the first of JSON's shortest ends it
    allows (CLOSERS). Greedy, so at worst longer than the shortest (the row is closed a few tokens early);
    None where no closer applies (e.g. inside one of several enum strings): the row is left to the model."""

    def __init__(self, closers: list[int], vocab_size: int):
        import xgrammar as xgr

        self.closers = closers
        self.scratch = xgr.allocate_token_bitmask(1, vocab_size)

    def allows(self, token: int) -> bool:
        return bool((int(self.scratch[0, token >> 5]) >> (token & 31)) & 1)  # 32 tokens per int32 of the bitmask

    def path(self, matcher, limit: int) -> list[int] | None:
        """The tokens that complete the document (at most `limit`; [] if it is complete), or None."""
        trial, path = matcher.fork(), []
        while len(path) <= limit:
            trial.fill_next_token_bitmask(self.scratch, 0)
            if any(self.allows(t) for t in trial.stop_token_ids):
                return path
            forced = trial.find_jump_forward_tokens()
            if forced:
                if not all(trial.accept_token(t) for t in forced):
                    return None
                path += forced
                continue
            closer = next((t for t in self.closers if self.allows(t)), None)
            if closer is None or not trial.accept_token(closer):
                return None
            path.append(closer)
        return None


class RowMasks:
    """Per row of a batch, a grammar matcher (None: a free row); each step masks the constrained rows' logits to
    the tokens their grammar allows next, then advances their matchers by the tokens chosen."""

    def __init__(self, compiled: list, vocab_size: int, budget: int | None = None, closing: Closing | None = None):
        import xgrammar as xgr

        self._xgr = xgr
        self.matchers = [None if g is None else xgr.GrammarMatcher(g) for g in compiled]
        self.rows = [i for i, m in enumerate(self.matchers) if m is not None]
        self.bitmask = xgr.allocate_token_bitmask(len(self.matchers), vocab_size)
        self.budget, self.closing, self.steps = budget, closing, 0

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with each constrained row's disallowed tokens at -inf (a copy: the model's own stay, for
        the log-probabilities reported)."""
        live = [i for i in self.rows if not self.matchers[i].is_terminated()]
        if not live:
            return logits
        for i in live:
            self.matchers[i].fill_next_token_bitmask(self.bitmask, i)
        masked = logits.float().clone()
        self._xgr.apply_token_bitmask_inplace(masked, self.bitmask.to(masked.device), indices=live)
        left = None if self.budget is None else self.budget - self.steps  # tokens this row may still add
        if left is not None and self.closing is not None and left <= CLOSING_HORIZON:
            for i in live:
                # searched past `left` too: a document the model opened too far is still closed as far as it goes
                way_out = self.closing.path(self.matchers[i], CLOSING_HORIZON)
                if way_out and len(way_out) + CLOSING_SLACK >= left:  # no token to spare: close the document now
                    keep = masked[i, way_out[0]].clone()
                    masked[i] = -torch.inf
                    masked[i, way_out[0]] = keep if torch.isfinite(keep) else 0.0
        return masked.to(logits.dtype)

    def advance(self, tokens: list[int], done: list[bool]) -> None:
        """Feed each live constrained row its token (rows already done got padding: nothing to feed)."""
        self.steps += 1
        for i in self.rows:
            matcher = self.matchers[i]
            if not done[i] and not matcher.is_terminated() and not matcher.accept_token(tokens[i]):
                # only a grammar that reached a state no token continues gets here (its mask was all -inf)
                raise InputError("the JSON schema leaves the answer no way to go on (a dead end in its grammar)")


def json_strings(text: str) -> list[str]:
    """The string values of a JSON document (not its keys), in order; [] if it does not parse (e.g. cut by
    max_tokens): what a JSON answer says in words, to find its citations by."""
    try:
        document = json.loads(text)
    except ValueError:
        return []
    found: list[str] = []

    def walk(value) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(document)
    return found
