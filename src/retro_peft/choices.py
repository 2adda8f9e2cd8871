"""The fixed sets of choices that several layers name (index, adapters, kvcache, CLI, server), each once.

Kept free of heavy imports: the CLI's argument parser and the server's settings read these
without importing torch. Each is a `Literal` (what pydantic validates and documents) and the
tuple of its values (what argparse's `choices=` and error messages list).
"""

from __future__ import annotations

import importlib.util
from typing import Literal, get_args

from retro_peft.errors import InputError

SearchMode = Literal["dense", "sparse", "hybrid"]  # the two single modes, then their fusion (the report order)
SEARCH_MODES: tuple[str, ...] = get_args(SearchMode)

# How a prompt uses a frozen KV cache's stored states (see `retro_peft.kvcache`):
#   block:  head and every passage from the store; the passages do not attend to each other (answers change)
#   prefix: the ordinary prompt, its head, "[1]" and first passage from the store, the rest prefilled
#           attending to all of it: a full prefill's computation, so the same answers
#   blend:  the block layout, then the first tokens of every later passage recomputed attending to all
#           before them (kvcache/blend.py: EPIC-style selective recompute)
#   deviation: the block layout, then the share of later passages' tokens whose states deviate most from a
#           full prefill's at an early layer recomputed (kvcache/blend.py: CacheBlend's selection)
KVLayout = Literal["block", "prefix", "blend", "deviation"]
KV_LAYOUTS: tuple[str, ...] = get_args(KVLayout)
DEFAULT_KV_LAYOUT: KVLayout = "block"


def check_kv_layout(layout: str | None) -> str:
    """The layout to use (None: the default), or a clear error for an unknown one."""
    if layout is None:
        return DEFAULT_KV_LAYOUT
    if layout not in KV_LAYOUTS:
        raise InputError(f"unknown frozen KV cache layout {layout!r}; choose one of {', '.join(KV_LAYOUTS)}")
    return layout

PeftMethod = Literal["lora", "adalora", "ia3"]
PEFT_METHODS: tuple[str, ...] = get_args(PeftMethod)

PromptTemplate = Literal["chat", "plain"]
PROMPT_TEMPLATES: tuple[str, ...] = get_args(PromptTemplate)

DType = Literal["auto", "float32", "bfloat16", "float16"]
DTYPE_NAMES: tuple[str, ...] = get_args(DType)

# How the base model's linear layers are held in memory (bitsandbytes; the settings: base_model.quantization_config):
#   4bit: NF4 with double quantization (QLoRA)   8bit: LLM.int8()
# The adapters stay in full precision either way.
Quantize = Literal["4bit", "8bit"]
QUANTIZE_MODES: tuple[str, ...] = get_args(Quantize)

QUANTIZE_PIP = "pip install 'retro-peft[quantize]'  (or: pip install bitsandbytes)"


def check_quantize(quantize: str | None) -> str | None:
    """`quantize` if bitsandbytes can be used for it; refused before any loading otherwise."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE_MODES:
        raise InputError(f"unknown quantization {quantize!r}: use {', '.join(QUANTIZE_MODES)}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(f"--quantize {quantize} needs the bitsandbytes package, which is not installed; "
                         f"install it with: {QUANTIZE_PIP}")
    return quantize


def check_quantize_skip(quantize: str | None, skip) -> tuple[str, ...]:
    """`skip` (--quantize-skip: suffixes of the linear layers to keep unquantized) as a tuple of names, each once;
    refused without `quantize`. Whether the model has such layers is checked when it is loaded
    (`base_model.quantization_config`)."""
    if isinstance(skip, str):  # a lone name would otherwise become its letters
        raise InputError(f"quantize_skip is a list of layer names, got the string {skip!r}")
    names = tuple(dict.fromkeys(str(name).strip().strip(".") for name in skip or ()))
    if any(not name for name in names):
        raise InputError(f"--quantize-skip: an empty layer name in {list(skip)!r}")
    if names and not quantize:
        raise InputError(f"--quantize-skip needs --quantize: it names the linear layers to keep unquantized "
                         f"({', '.join(names)})")
    return names


# What a QA item's answer is: a span copied from a passage (SQuAD), free text of its own, or one of given choices.
AnswerKind = Literal["span", "free", "choice"]
ANSWER_KINDS: tuple[str, ...] = get_args(AnswerKind)

# Which passages count as an item's gold ones (training's oracle/distractor split, recall, citations):
#   doc:  the chunks of its gold documents, whatever the answer's wording
#   span: chunks that contain the answer's words (and, when known, come from a gold document): the old rule
#   auto: doc for items with gold documents, span for the others
Grounding = Literal["auto", "doc", "span"]
GROUNDINGS: tuple[str, ...] = get_args(Grounding)

# How a follow-up's search query is built from the conversation (see generation.history):
#   none:    the question alone
#   concat:  the question with the previous user turns and answer, the newest weighted most
#   rewrite: the question condensed into a standalone one by the generator (its base model)
HistoryStrategy = Literal["none", "concat", "rewrite"]
HISTORY_STRATEGIES: tuple[str, ...] = get_args(HistoryStrategy)

# The roles of a conversation's earlier turns.
Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = get_args(Role)

# How the retriever is trained (train-retriever --supervision, train --train-retriever): against each question's
# gold chunk, or toward the generator's preference among the retrieved chunks (REPLUG's LM-supervised retrieval).
RetrieverSupervision = Literal["contrastive", "lsr"]
RETRIEVER_SUPERVISIONS: tuple[str, ...] = get_args(RetrieverSupervision)
