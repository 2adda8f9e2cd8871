"""Choice answers: the answer is exactly one of given strings, the one the model finds most likely.

Each choice is scored by the log-probability the model gives its tokens after the prompt
(the sum, as lm-evaluation-harness's `acc`): the prompts are prefilled once as a batch,
their KV cache is repeated once per choice, and all the choices' tokens run in one more
forward. The same scores serve `ask`, `eval`, the bank and `serve`.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from retro_peft.generation.decode import left_pad
from retro_peft.hf_compat import cache_kwarg


@torch.inference_mode()
def choice_logprobs(model, prompts: list[list[int]], options: list[list[list[int]]], pad_id: int) -> list[list[float]]:
    """For each prompt, the log-probability of each of its options (token lists) following it."""
    device = next(model.parameters()).device
    input_ids, mask = left_pad(prompts, pad_id, device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_kw = cache_kwarg(model)
    cache = DynamicCache()
    first = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                  logits_to_keep=1, **{cache_kw: cache}).logits[:, -1, :]
    first = torch.log_softmax(first.float(), dim=-1)
    rows = [r for r, opts in enumerate(options) for _ in opts]
    flat = [o for opts in options for o in opts]
    index = torch.tensor(rows, device=device)
    cache.batch_select_indices(index)  # each prompt's states once per option
    width = max(len(o) for o in flat)
    ids = torch.full((len(flat), width), pad_id, dtype=torch.long)
    option_mask = torch.zeros((len(flat), width), dtype=torch.long)
    for i, o in enumerate(flat):  # right-padded: padding comes after the tokens it could disturb
        ids[i, :len(o)] = torch.tensor(o)
        option_mask[i, :len(o)] = 1
    ids, option_mask = ids.to(device), option_mask.to(device)
    positions = position_ids[index, -1:] + 1 + torch.arange(width, device=device)
    logits = model(input_ids=ids, attention_mask=torch.cat([mask[index], option_mask], dim=1), position_ids=positions,
                   use_cache=True, **{cache_kw: cache}).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    scores: list[list[float]] = [[] for _ in options]
    for i, (r, o) in enumerate(zip(rows, flat)):
        total = first[r, o[0]] + sum((logp[i, t - 1, o[t]] for t in range(1, len(o))), torch.zeros((), device=device))
        scores[r].append(float(total))
    return scores
