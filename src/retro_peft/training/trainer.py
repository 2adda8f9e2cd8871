"""A compact training loop for retro-peft adapters.

`train()` is the whole loop on one screen: AdamW, linear warm-up then cosine
decay, gradient accumulation, bf16 autocast on CUDA (fp32 on CPU), batches
grouped by length (little padding), evaluation and atomic checkpoints every N
steps, and `resume` that continues with the same data order. The loss stays on
the device between log intervals, so the loop does not wait on the GPU each step.
Under `torchrun` / `accelerate launch` it is data-parallel (see `distributed`): each rank
trains on its share of the same global batches, DistributedDataParallel averages the
gradients, and rank 0 alone writes checkpoints and the adapter.

A checkpoint is a folder `checkpoints/step-NNNNNN/` written as a temporary
folder, fsynced and renamed (so it is complete or absent):
    trainable.safetensors   every trainable parameter, exactly
    optimizer.safetensors   AdamW moments and step counts
    extra.safetensors       RNG states (+ AdaLoRA's importance scores)
    state.json              step, data position, scheduler, losses, run identity
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from retro_peft.adapters.config import RetroAdaLoraConfig, adalora_schedule
from retro_peft.adapters.model import RETRIEVER_FOLDER
from retro_peft.errors import InputError
from retro_peft.hf_compat import cache_kwarg
from retro_peft.kvcache import FrozenKVCache
from retro_peft.kvcache.layout import HEAD, is_chunk, marker_key
from retro_peft.kvcache.rotation import rotary_embedding
from retro_peft.kvcache.soft import SoftTokens, check_soft_count, separator_ids
from retro_peft.kvcache.store import segment_states
from retro_peft.base_model import check_device, quantize_skipped, quantized
from retro_peft.choices import check_quantize, check_quantize_skip
from retro_peft.storage import check_parent_writable, replace_folder
from retro_peft.training import distributed
from retro_peft.training.data import IGNORE, TrainingExample, examples_sha256

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # None: 10% of steps
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 0  # 0: never during training
    checkpoint_every: int = 0  # 0: only the final adapter
    log_every: int = 10
    device: str | None = None  # None: cuda if available, else cpu
    length_window: int = 32  # batches whose examples are sorted by length together
    compile: bool = False  # torch.compile each decoder layer (see compile_layers); pays off on long CUDA runs
    # Recompute each decoder layer's activations in the backward pass instead of keeping them (non-reentrant
    # torch.utils.checkpoint): activation memory of one layer instead of all, for about one more forward.
    # True (1.0): every layer; a fraction in (0, 1): that share of the layers (the first ones), the others keep
    # their activations: memory traded back for speed where the card has room (BENCHMARKS.md, issue 18).
    # "selective": every layer, but the outputs of its large matrix products and of attention are kept, and only
    # the cheap operations between them are recomputed (see SELECTIVE_MIN_REDUCTION).
    gradient_checkpointing: bool | float | str = False
    # "4bit" / "8bit": the model's base was loaded quantized (RetroPeftModel.create(..., quantize=)): QLoRA.
    # Checked against the model and recorded with the checkpoints, so a resume runs on the same base.
    quantize: str | None = None
    # with quantize: the linear layers the base kept unquantized (RetroPeftModel.create(..., quantize_skip=)), by
    # name suffix, e.g. ("down_proj", "v_proj"); checked against the model and recorded with the checkpoints too.
    quantize_skip: tuple[str, ...] = ()
    # Block-attention examples only: each also trains as its full-prefill copy (the same tokens, every passage in
    # view), and `distill` x KL(full || cached) over the answer tokens pulls the cached layout's answer
    # distribution to the full copy's (detached: the teacher is the same adapter in the same step). The
    # Block-Attention recipe (full and block copies, best started from a full-attention adapter) with
    # KVLink-style distillation. 0: the cached copy alone.
    distill: float = 0.0
    # Block-attention examples only: train this many soft tokens stored after each passage (`kvcache.soft`, KV
    # Packet's trailer), the adapter frozen, on KL(the adapter's full prefill || the block layout with them) over
    # the answer tokens alone: the teacher is fixed, the student differs only by the soft tokens. 0: none.
    soft_tokens: int = 0

    def __post_init__(self) -> None:
        self.quantize_skip = check_quantize_skip(self.quantize, self.quantize_skip)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "length_window"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise InputError(f"learning rate must be positive, got {self.lr}")
        for name in ("weight_decay", "max_grad_norm", "distill"):
            if not getattr(self, name) >= 0:  # `not >=` also refuses NaN
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        # numpy's default_rng refuses negative seeds and torch.manual_seed overflows past 64 bits,
        # both only once the model is loaded.
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise InputError(f"seed must be a non-negative integer below 2**63, got {self.seed!r}")
        for name in ("eval_every", "checkpoint_every", "log_every"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0")
        if not (self.gradient_checkpointing == SELECTIVE or (isinstance(self.gradient_checkpointing, (bool, int, float))
                                                             and 0 <= float(self.gradient_checkpointing) <= 1)):
            raise InputError(f"gradient_checkpointing is True/False, the fraction of decoder layers to recompute "
                             f"(0 to 1) or {SELECTIVE!r}, got {self.gradient_checkpointing!r}")
        check_soft_count(self.soft_tokens)
        if self.soft_tokens and self.distill:
            raise InputError("soft_tokens trains the soft tokens alone, by distillation, the adapter frozen; distill "
                             "trains the adapter: one at a time (continue the distilled adapter with soft tokens)")
        check_device(self.device)
        check_quantize(self.quantize)
        self.quantize_skip = check_quantize_skip(self.quantize, self.quantize_skip)


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since the last log)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0  # real (non-padding) tokens processed in this run (all ranks together)
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    trainable_params: int = 0
    resumed_from: int | None = None
    final_ranks: dict | None = None  # AdaLoRA
    retriever_losses: list[tuple[int, float]] = field(default_factory=list)  # joint training
    reembedded: dict | None = None  # joint training: the index's re-embedding at the end

    def to_dict(self) -> dict:
        return asdict(self)


# -- data order ------------------------------------------------------------------------------------

def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, window: int = 32) -> list[list[int]]:
    """One epoch of batches: shuffle, sort each window of `window` batches by length, shuffle the batches.

    Similar lengths share a batch (little padding) while the order stays random.
    A pure function of (seed, epoch): resuming recomputes the same order.
    """
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths)).tolist()
    span = batch_size * window
    batches = []
    for start in range(0, len(perm), span):
        group = sorted(perm[start:start + span], key=lambda i: -lengths[i])
        batches += [group[j:j + batch_size] for j in range(0, len(group), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches)).tolist()]


def batch_stream(lengths: list[int], batch_size: int, seed: int, start: int = 0, window: int = 32):
    """Endless (position, batch) stream over epochs, starting at micro-batch `start`."""
    position, epoch = 0, 0
    while True:
        batches = epoch_batches(lengths, batch_size, seed, epoch, window)
        if position + len(batches) <= start:  # skip whole epochs when resuming
            position += len(batches)
            epoch += 1
            continue
        for batch in batches:
            if position >= start:
                yield position, batch
            position += 1
        epoch += 1


def collate(examples: list[TrainingExample], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded batch, plus what restricts the vocabulary projection to the answer positions.

    Only the answer tokens carry loss, so the LM head (49k x hidden for SmolLM2,
    ~20% of the forward) runs only on positions that predict one: `logits_to_keep`
    picks them and `shift_labels` holds their targets (transformers' loss then
    skips its own shift).
    """
    width = -(-max(len(ex) for ex in examples) // 8) * 8  # a multiple of 8: tensor-core friendly, fewer shapes
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        input_ids[row, :len(ex)] = torch.tensor(ex.input_ids)
        labels[row, :len(ex)] = torch.tensor(ex.labels)
        mask[row, :len(ex)] = 1
    keep = torch.nonzero((labels[:, 1:] != IGNORE).any(0)).squeeze(-1)  # positions that predict an answer token
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
             "logits_to_keep": keep, "shift_labels": labels[:, keep + 1].contiguous()}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_loss(model, examples: list[TrainingExample], pad_id: int, device,
                 num_items: int | None = None, distill: float = 0.0, soft: SoftTokens | None = None) -> torch.Tensor:
    """Mean answer-token loss of a batch: one forward pass, or two in the frozen KV cache's layout.
    num_items: divide the summed loss by this many answer tokens instead (a rank's share of a global batch).
    distill: see TrainConfig.distill; soft: the soft tokens TrainConfig.soft_tokens trains (block-attention
    examples only)."""
    if any(ex.segments for ex in examples):
        cached, cached_labels = block_attention_forward(model, examples, pad_id, device, soft=soft)
        if not distill and soft is None:
            return cached.loss  # (data-parallel training refuses this layout, so there is no share to scale)
        full_inputs = collate([replace(ex, segments=()) for ex in examples], pad_id, device)
        with torch.no_grad() if soft is not None else nullcontext():  # a frozen adapter: a fixed teacher
            full = model(**full_inputs, use_cache=False)
        # the same answer tokens in the same order in both layouts: row by row, position by position
        student = cached.logits[cached_labels != IGNORE].float()
        teacher = full.logits[full_inputs["shift_labels"] != IGNORE].detach().float()
        kl = torch.nn.functional.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1),
                                        log_target=True, reduction="batchmean")
        return kl if soft is not None else (cached.loss + full.loss) / 2 + distill * kl
    extra = {"num_items_in_batch": num_items} if num_items is not None else {}
    # use_cache=False: training has no use for a KV cache, and building one per layer
    # costs kernels (and a recompile per layer when compiled).
    return model(**collate(examples, pad_id, device), use_cache=False, **extra).loss


def answer_tokens(examples: list[TrainingExample]) -> int:
    """The tokens the loss averages over: those predicted from a previous position that carry a label."""
    return sum(label != IGNORE for ex in examples for label in ex.labels[1:])


def shard_loss(model, examples: list[TrainingExample], batch_ids: list[int], pad_id: int, device,
               distill: float = 0.0, soft: SoftTokens | None = None):
    """(loss, this rank's examples) of one micro-batch `batch_ids` (the global one).

    One process: the batch's mean loss. Data-parallel: this rank's share, its summed loss divided by the
    answer tokens of the whole global batch and multiplied by the ranks (DDP averages the gradients), so the
    update is exactly one process's on the global batch, however the answer tokens fall between the shares.
    A rank whose share is empty (an epoch's last, short batch) runs one example at weight 0: DDP needs every
    rank's backward pass.
    """
    if distributed.world_size() == 1:
        batch = [examples[i] for i in batch_ids]
        return forward_loss(model, batch, pad_id, device, distill=distill, soft=soft), batch
    batch = [examples[i] for i in distributed.shard(batch_ids)]
    total = answer_tokens([examples[i] for i in batch_ids])
    loss = forward_loss(model, batch or [examples[batch_ids[0]]], pad_id, device, num_items=max(total, 1))
    return loss * (distributed.world_size() if batch else 0), batch


def block_attention_forward(model, examples: list[TrainingExample], pad_id: int, device,
                            soft: SoftTokens | None = None):
    """The forward pass as the frozen KV cache runs it, with gradients through every passage.

    1. The batch's segments, each once (head, markers, passages), as `FrozenKVCache.build` computes them:
       every passage after the head and "[1]", attending to neither the other passages nor the question
       (and followed by the soft tokens, if any).
    2. Each row's context assembled from them (keys rotated to their positions), as at query time.
    3. The tails (question, instruction, answer) through the model on top, loss on the answer.
    A row without segments (no passage fitted) has an empty context: its tail is the whole prompt.
    Returns (the model's output, the targets of its kept logits: `collate`'s shift_labels).
    """

    head, segments, rows, tails = None, {}, [], []
    for ex in examples:
        start, keys = 0, []
        for key, length in ex.segments:
            ids = ex.input_ids[start:start + length]
            if key == HEAD:
                head = ids
            else:
                segments.setdefault(key, ids)
            keys.append(key)
            start += length
        rows.append(keys)
        tails.append(replace(ex, input_ids=ex.input_ids[start:], labels=ex.labels[start:], segments=()))
    lead = {key: segments[marker_key(1)] for key in segments if is_chunk(key)}
    states = segment_states(model, head, segments, lead=lead, batch_size=len(segments), soft=soft)
    context, context_mask = FrozenKVCache(*states, meta={}).attach(model, check=False).assemble(rows, device)
    inputs = collate(tails, pad_id, device)
    inputs["attention_mask"] = torch.cat([context_mask, inputs["attention_mask"]], dim=1)
    # each row's tail continues after its own context (left padding holds no positions)
    inputs["position_ids"] = context_mask.sum(1, keepdim=True) + torch.arange(inputs["input_ids"].shape[1], device=device)
    return model(**inputs, use_cache=True, **{cache_kwarg(model): context}), inputs["shift_labels"]


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


# -- the loop --------------------------------------------------------------------------------------

def train(model, examples: list[TrainingExample], config: TrainConfig, *, out_dir=None,
          eval_examples: list[TrainingExample] | None = None, resume: bool = False, index=None,
          data_sha256: str | None = None, on_step: Callable[[int, float | None], None] | None = None,
          progress: bool = True, before_save: Callable[[], None] | None = None,
          retriever=None) -> TrainResult:
    """Train `model` (a `RetroPeftModel`) on `examples`; save checkpoints and the final adapter under `out_dir`.

    before_save(): runs after the last step, before the adapter is written (e.g. fitting the answerability
    head that is saved with it, so the folder never exists without it).
    retriever: a `training.joint.RetrieverObjective` trained in the same steps (joint training); its encoder
    is saved in the adapter folder and `index` is re-embedded with it at the end."""
    from tqdm.auto import tqdm

    config.validate()
    if not examples:
        raise InputError("no training examples")
    if resume and out_dir is None:
        raise InputError("resume needs the output folder that holds the checkpoints")
    if out_dir is not None:
        check_output_dir(out_dir, resume=resume)
    device = distributed.local_device(check_device(config.device))
    world = distributed.world_size()
    adalora = isinstance(model.config, RetroAdaLoraConfig)
    if world > 1:
        _check_data_parallel(config, examples, adalora, retriever)
    peft_model, pad_id = _placed(model.model, config, device), model.tokenizer.pad_token_id
    if any(ex.segments for ex in examples):  # block attention: refuse a model the frozen cache cannot serve
        rotary_embedding(peft_model)
        if config.gradient_checkpointing:
            # transformers turns the KV cache off under checkpointing, and this layout is built from KV caches
            raise InputError("gradient checkpointing cannot train in the block-attention layout (it needs the "
                             "passages' KV caches, which checkpointing turns off): drop one of the two")
    elif config.distill or config.soft_tokens:
        raise InputError(f"{'distill' if config.distill else 'soft_tokens'} pulls the frozen KV cache's layout toward "
                         "the full prefill: it needs block-attention examples (RetrievalConfig.block_attention / "
                         "--block-attention)")
    soft, frozen = _soft_tokens(model, config, device)
    if adalora and soft is None:
        _fit_adalora_schedule(peft_model, config.steps)
    params = [p for p in peft_model.parameters() if p.requires_grad] if soft is None else [soft.embeddings]
    groups = [{"params": params}]
    if retriever is not None:
        if out_dir is not None and index is None:
            raise InputError("joint training re-embeds the index at the end: give the index")
        retriever.to(device)
        groups.append({"params": retriever.parameters(), "lr": retriever.config.lr, "weight_decay": 0.0})
    # fused: one kernel for all ~400 adapter tensors instead of several per tensor (CUDA only)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=device.type == "cuda")
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, config.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, config.steps))
    identity = {"data_sha256": examples_sha256(examples), "batch_size": config.batch_size,
                "grad_accum": config.grad_accum, "seed": config.seed, "steps": config.steps,
                "method": model.config.method, "base_model": model.info.get("base_model"),
                "trained_from": model.info.get("trained_from"),  # a resume continues from the same start
                "quantize": config.quantize,  # (older checkpoints lack the key: None, full precision, as they were)
                "quantize_skip": sorted(config.quantize_skip) or None,  # (older checkpoints lack the key: None, none)
                "world_size": world,  # a resume must split each global batch the same way
                "soft_tokens": config.soft_tokens or None,  # (older checkpoints lack the key: None, none)
                "retriever": retriever.identity() if retriever is not None else None}
    start_step, position, result = 0, 0, TrainResult(steps=0, final_loss=None)
    created_group = distributed.init(device)
    torch.manual_seed(config.seed)
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is not None:
            start_step, position, result = load_checkpoint(ckpt, peft_model, optimizer, scheduler, identity, adalora,
                                                           retriever, soft)
            result.resumed_from = start_step
    result.trainable_params = sum(p.numel() for p in params)
    # every rank draws the same global batches (batch_size per rank) and trains on its share
    stream = batch_stream([len(ex) for ex in examples], config.batch_size * world, config.seed, position,
                          config.length_window)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    loss_sum, loss_count, tokens, t0 = torch.zeros((), device=device), 0, 0, time.perf_counter()
    retriever_sum = torch.zeros((), device=device)
    bar = tqdm(total=config.steps, initial=start_step, disable=not progress or not distributed.is_main(),
               desc=f"train {model.config.method}")
    uncheckpoint = ((lambda: None) if not config.gradient_checkpointing else
                    checkpoint_layers(peft_model, selective=True) if config.gradient_checkpointing == SELECTIVE else
                    checkpoint_layers(peft_model, float(config.gradient_checkpointing)))
    uncompile = compile_layers(peft_model) if config.compile else (lambda: None)
    # a frozen adapter (soft tokens) runs as it answers, without dropout: the teacher and student see the same one
    training_mode = soft is None
    peft_model.train(training_mode)
    ddp = distributed.wrap(peft_model, device)  # the model itself in one process
    try:
        for step in range(start_step, config.steps):
            for micro in range(config.grad_accum):
                position, batch_ids = next(stream)
                with distributed.no_sync(ddp, last_micro_batch=micro == config.grad_accum - 1):
                    with autocast:
                        loss, batch = shard_loss(ddp, examples, batch_ids, pad_id, device, config.distill, soft)
                        loss = loss / config.grad_accum
                        if retriever is not None:
                            extra = retriever.loss([ex.item_id for ex in batch], peft_model, pad_id)
                            if extra is not None:
                                retriever_sum += extra.detach() / config.grad_accum
                                loss = loss + retriever.config.weight * extra / config.grad_accum
                    loss.backward()
                tokens += sum(len(ex) for ex in batch)  # host-side count: no device sync
                loss_sum += loss.detach()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            if retriever is not None and retriever.config.max_grad_norm:  # on its own: one norm would mix the two
                torch.nn.utils.clip_grad_norm_(retriever.parameters(), retriever.config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            if adalora and soft is None:  # after the update, before zero_grad: it scores |w * grad|, prunes ranks
                peft_model.base_model.update_and_allocate(step + 1)
            optimizer.zero_grad(set_to_none=True)
            loss_count += 1
            done = step + 1
            logged = None
            if done % max(config.log_every, 1) == 0 or done == config.steps:
                logged = distributed.mean(loss_sum / loss_count).item()  # the one host sync, at log intervals
                result.losses.append((done, logged))
                if retriever is not None:
                    result.retriever_losses.append((done, (retriever_sum / loss_count).item()))
                    retriever_sum.zero_()
                loss_sum.zero_()
                loss_count = 0
                bar.set_postfix(loss=f"{logged:.4f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
            bar.update(1)
            if config.eval_every and eval_examples and done % config.eval_every == 0:
                result.eval_losses.append((done, evaluate_loss(peft_model, eval_examples, config.batch_size, pad_id, device)))
                peft_model.train(training_mode)
            result.steps = done
            if out_dir is not None and config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
                save_checkpoint(out_dir, done, position + 1, peft_model, optimizer, scheduler, identity, result, adalora,
                                retriever, soft)
            if on_step is not None:
                on_step(done, logged)
    finally:
        uncompile()
        uncheckpoint()
        if soft is not None:
            model.soft_tokens = soft.cpu()  # saved with the adapter, whose weights it was trained on
        for p in frozen:
            p.requires_grad_(True)
    bar.close()
    result.seconds = time.perf_counter() - t0
    all_tokens = distributed.mean(torch.tensor(float(tokens), dtype=torch.float64, device=device)) * world
    result.tokens = round(all_tokens.item())
    result.tokens_per_s = result.tokens / result.seconds if result.seconds > 0 else 0.0
    result.final_loss = result.losses[-1][1] if result.losses else None
    result.final_ranks = model.final_ranks()
    if before_save is not None and distributed.is_main():
        before_save()
    if out_dir is not None and distributed.is_main():
        # The trained encoder goes into the adapter folder, which records the index as it will be once
        # re-embedded; then the index is re-embedded (atomically: until then it answers as before).
        model.save(out_dir, index=index, training_data_sha256=data_sha256,
                   extra={"training": {"config": asdict(config), "result": result.to_dict()}},
                   retriever=retriever.write if retriever is not None else None)
        if retriever is not None:
            stats = index.reembed(str(Path(out_dir).absolute() / RETRIEVER_FOLDER))
            result.reembedded = {k: stats[k] for k in ("chunks", "embedded", "changed", "generation")}
    distributed.barrier()  # no rank leaves before the adapter is complete
    distributed.cleanup(created_group)
    return result


@torch.inference_mode()
def evaluate_loss(model, examples: list[TrainingExample], batch_size: int, pad_id: int, device) -> float:
    """Mean answer-token loss over `examples`."""
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    for start in range(0, len(order), batch_size):
        batch = [examples[i] for i in order[start:start + batch_size]]
        n = sum(label != IGNORE for ex in batch for label in ex.labels[1:])  # tokens the loss averages over
        with autocast:
            total += forward_loss(model, batch, pad_id, device).float().item() * n
        count += n
    return total / max(count, 1)


def _soft_tokens(model, config: TrainConfig, device) -> tuple[SoftTokens | None, list[torch.nn.Parameter]]:
    """The soft tokens to train (the adapter's own, continued, or new ones) on `device`, and the adapter's weights
    this froze (to be unfrozen after training)."""
    if not config.soft_tokens:
        return None, []
    soft = model.soft_tokens
    if soft is not None and soft.count != config.soft_tokens:
        raise InputError(f"the adapter has {soft.count} soft tokens per passage; soft_tokens={config.soft_tokens} "
                         "would replace them: train them from the adapter they were fitted on, or keep the count")
    if soft is None:
        soft = SoftTokens.initial(model.model, config.soft_tokens, separator_ids(model.tokenizer, model.config.retrieval))
    frozen = [p for p in model.model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    return soft.to(device), frozen


def _check_data_parallel(config: TrainConfig, examples: list[TrainingExample], adalora: bool, retriever) -> None:
    """Refuse what data-parallel training cannot do exactly as one process would."""
    if adalora:
        raise InputError("AdaLoRA cannot train data-parallel yet: its orthogonality penalty is added inside the "
                         "forward pass, where the per-rank loss scaling would count it once per rank; train it "
                         "in one process, or use --method lora")
    if retriever is not None:
        raise InputError("joint retriever training cannot train data-parallel yet (the encoder is outside "
                         "DistributedDataParallel, its gradients would not be averaged): train it in one process")
    if any(ex.segments for ex in examples):
        raise InputError("block-attention training cannot train data-parallel yet (its passages' forward passes "
                         "run outside DistributedDataParallel): train it in one process")


def _placed(peft_model, config: TrainConfig, device: torch.device):
    """The model on `device`; a quantized one must have been loaded there (bitsandbytes places it when loading)."""
    found = quantized(peft_model)
    if found != config.quantize:
        raise InputError(f"TrainConfig.quantize is {config.quantize!r} but the model's base is "
                         f"{f'quantized to {found}' if found else 'not quantized'}: load it with "
                         f"RetroPeftModel.create(..., quantize={config.quantize!r}) or set the same quantize")
    kept = quantize_skipped(peft_model)
    if found and kept is not None and set(kept) != set(config.quantize_skip):
        raise InputError(f"TrainConfig.quantize_skip is {list(config.quantize_skip)!r} but the model's base kept "
                         f"{list(kept)!r} unquantized: load it with RetroPeftModel.create(..., "
                         f"quantize_skip={list(config.quantize_skip)!r}) or set the same quantize_skip")
    if not found:
        return peft_model.to(device)
    on = {p.device for p in peft_model.parameters()}
    if on != {device} and not (device.type == "cuda" and device.index is None and {d.type for d in on} == {"cuda"}):
        raise InputError(f"the quantized model is on {', '.join(sorted(map(str, on)))}, not on {device}: load it "
                         f"with device={str(device)!r} (a quantized model cannot be moved after loading)")
    return peft_model


SELECTIVE = "selective"  # TrainConfig.gradient_checkpointing: keep the expensive outputs, recompute the rest
# Selective checkpointing keeps a matrix product's output when each of its elements sums at least this many
# products (the base model's projections, LoRA's down-projection A), and recomputes those that sum fewer (LoRA's
# rank-r up-projection B), which cost little to recompute for outputs as large as the projections'.
SELECTIVE_MIN_REDUCTION = 256


def _keep_expensive(ctx, op, *args, **kwargs):
    """The selective-checkpointing policy (torch.utils.checkpoint): what a layer's recomputation takes from memory
    instead of computing again. Recomputing a layer then costs its norms, activations, rotary and dropout (and,
    where bitsandbytes dequantizes a 4-bit weight before a plain matmul, as on CUDA, that dequantization) instead
    of another forward. Works under --compile too (checked on the CPU: the same gradients)."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten, name = torch.ops.aten, str(op)
    left = (args[1] if op is aten.addmm.default else
            args[0] if op in (aten.mm.default, aten.bmm.default) or name.startswith("bitsandbytes.gemm") else None)
    if left is not None:  # bitsandbytes.gemm_4bit: a 4-bit base's product where it does not dequantize first
        return CheckpointPolicy.MUST_SAVE if left.shape[-1] >= SELECTIVE_MIN_REDUCTION else \
            CheckpointPolicy.PREFER_RECOMPUTE
    if "scaled_dot_product" in name and "backward" not in name:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_layers(peft_model, fraction: float = 1.0, selective: bool = False) -> Callable[[], None]:
    """Gradient checkpointing on the base model's decoder layers (transformers' own, non-reentrant, so it works
    with frozen base weights and PEFT adapters, and under torch.compile); returns the undo. fraction < 1: only
    the first round(fraction * layers) layers recompute (at least one); the rest keep their activations.
    selective: every layer, recomputing only what `_keep_expensive` does not keep (PyTorch's selective
    activation checkpointing)."""
    base = peft_model.get_base_model()
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise InputError(f"gradient checkpointing: {type(base).__name__} does not support it")
    # Non-reentrant: gradients reach the adapters inside a layer even though its input (from the frozen
    # embedding) does not require grad, and the RNG state is replayed, so dropout draws the same masks.
    kwargs = {"use_reentrant": False}
    if selective:
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_expensive)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if fraction < 1:  # transformers checks each layer's own flag (`every_n_layers` is not in every version)
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
        for layer in layers[max(1, round(fraction * len(layers))):]:
            layer.gradient_checkpointing = False
    use_cache = getattr(base.config, "use_cache", None)

    def undo() -> None:
        base.gradient_checkpointing_disable()
        if use_cache is not None:
            base.config.use_cache = use_cache  # transformers turns the KV cache off while checkpointing

    return undo


def compile_layers(peft_model) -> Callable[[], None]:
    """torch.compile every decoder layer in place; returns the undo (back to eager).

    Small models on a GPU are launch-bound: eager PyTorch spends more time issuing
    the ~100 small kernels of a layer (norms, rotary, LoRA dropout/scale/add) than
    running them. Compiling the repeated layer ("regional compilation") fuses them,
    and all layers share one compiled graph, so the compile takes seconds, not
    minutes. Undone after training so generation runs the plain modules.
    """
    lists = [m for m in peft_model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise InputError("compile: the model has no list of layers to compile")
    layers = max(lists, key=len)
    # The first layer's input (from the frozen embedding) would not require grad and the others' would:
    # two graphs. Making the embedding output require grad gives every layer the same one.
    peft_model.enable_input_require_grads()
    for layer in layers:
        layer.compile(dynamic=True)  # sequence lengths change every batch

    def undo() -> None:
        peft_model.disable_input_require_grads()
        for layer in layers:
            layer._compiled_call_impl = None  # the slot nn.Module.compile() fills; None means eager again

    return undo


def _fit_adalora_schedule(peft_model, steps: int) -> None:
    """AdaLoRA's budget schedule must match the run's length, or ranks are never (or too early) pruned."""
    cfg = peft_model.peft_config[peft_model.active_adapter]
    if cfg.total_step != steps:
        log.info("AdaLoRA schedule fitted to %d steps (was %s)", steps, cfg.total_step)
        for key, value in adalora_schedule(steps).items():
            setattr(cfg, key, value)  # the rank allocator holds this same config object


# -- checkpoints -----------------------------------------------------------------------------------

def check_output_dir(out_dir, *, resume: bool = False) -> None:
    """Refuse, before any work, an output folder the run could not write or whose old checkpoints it would spoil.

    Otherwise the first checkpoint (or the final save) fails after the training, or a file
    there is silently replaced by the adapter folder.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder {out} is an existing file; choose a folder")
    check_parent_writable(out, "output folder")  # the adapter is built next to `out` and renamed into place
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"output folder {out} is not writable")
    folder = out / CHECKPOINTS
    # Pruning keeps the highest step numbers whatever run wrote them: a new run's checkpoints
    # would be deleted in favour of the old run's, and a later resume refused.
    if not resume and folder.is_dir() and any(p.name.startswith("step-") for p in folder.iterdir()):
        raise InputError(f"{folder} holds checkpoints of an earlier run: resume it (--resume) "
                         "or choose another output folder (--out)")


def latest_checkpoint(out_dir) -> Path | None:
    folder = Path(out_dir) / CHECKPOINTS
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file())
    return done[-1] if done else None


def rng_states() -> dict[str, torch.Tensor]:
    states = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def rank_prefix(rank: int) -> str:
    """Rank 0's RNG states keep the one-process names; another rank's are prefixed (each has its own stream)."""
    return f"rank{rank}." if rank else ""


def save_checkpoint(out_dir, step: int, position: int, model, optimizer, scheduler, identity: dict,
                    result: TrainResult, adalora: bool, retriever=None, soft: SoftTokens | None = None) -> Path:
    """Called by every rank (it gathers their RNG states); rank 0 writes."""
    states = distributed.gather(rng_states())
    folder = Path(out_dir) / CHECKPOINTS
    final = folder / f"step-{step:06d}"
    if not distributed.is_main():
        distributed.barrier()  # returns once rank 0 has written it
        return final
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".step-", dir=folder))
    try:
        save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad},
                  tmp / "trainable.safetensors")
        opt = optimizer.state_dict()
        save_file({f"{i}.{k}": v.contiguous().cpu() for i, s in opt["state"].items() for k, v in s.items()},
                  tmp / "optimizer.safetensors")
        extra = {rank_prefix(r) + k: v for r, s in enumerate(states) for k, v in s.items()}
        rank_pattern = None
        if adalora:
            alloc = model.base_model.rankallocator
            for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                extra.update({f"{kind}.{n}": t.contiguous().cpu() for n, t in getattr(alloc, kind).items()})
            rank_pattern = model.peft_config[model.active_adapter].rank_pattern
        save_file(extra, tmp / "extra.safetensors")
        if retriever is not None:
            save_file(retriever.state_dict(), tmp / "retriever.safetensors")
        if soft is not None:
            soft.save(tmp)
        state = {"step": step, "position": position, "identity": identity,
                 "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(),
                 "result": result.to_dict(), "rank_pattern": _bools(rank_pattern)}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_json_default))
        replace_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(p for p in folder.iterdir() if p.name.startswith("step-"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, identity: dict, adalora: bool, retriever=None,
                    soft: SoftTokens | None = None):
    state = json.loads((path / "state.json").read_text())
    saved = {"world_size": 1, **state["identity"]}  # (older checkpoints lack the key: one process)
    for key in identity:
        if saved.get(key) != identity[key]:
            what = {"data_sha256": "training data", "base_model": "base model",
                    "quantize": "base model's quantization",
                    "quantize_skip": "base model's linear layers kept unquantized (quantize_skip)",
                    "world_size": "number of training processes (torchrun --nproc_per_node; resume on as many)",
                    }.get(key, key)
            raise InputError(f"cannot resume from {path}: the {what} differs from that run "
                             f"(saved {str(saved.get(key))[:60]!r}, now {str(identity[key])[:60]!r})")
    weights = load_file(path / "trainable.safetensors")
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(named):
        raise InputError(f"cannot resume from {path}: its adapter parameters do not match this model's")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(weights[n])
    device = str(next(model.parameters()).device)
    if retriever is not None:
        retriever.load_state_dict(load_file(path / "retriever.safetensors", device=device))
    if soft is not None:
        with torch.no_grad():
            soft.embeddings.copy_(SoftTokens.load(path).embeddings)
    flat = load_file(path / "optimizer.safetensors", device=device)
    opt_state: dict[int, dict] = {}
    for key, tensor in flat.items():
        i, name = key.split(".", 1)
        opt_state.setdefault(int(i), {})[name] = tensor if name != "step" else tensor.cpu()
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    extra = load_file(path / "extra.safetensors")
    mine = rank_prefix(distributed.rank())
    torch.set_rng_state(extra[mine + "rng.cpu"])
    if torch.cuda.is_available():
        cuda = [extra[k] for k in sorted(k for k in extra if k.startswith(mine + "rng.cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    if adalora:
        alloc = model.base_model.rankallocator
        device = next(iter(named.values())).device
        for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(alloc, kind, {k[len(kind) + 1:]: v.to(device) for k, v in extra.items() if k.startswith(kind + ".")})
        if state.get("rank_pattern"):
            model.peft_config[model.active_adapter].rank_pattern = state["rank_pattern"]
    r = state["result"]
    result = TrainResult(steps=state["step"], final_loss=r.get("final_loss"),
                         losses=[tuple(x) for x in r.get("losses", [])],
                         eval_losses=[tuple(x) for x in r.get("eval_losses", [])],
                         retriever_losses=[tuple(x) for x in r.get("retriever_losses", [])],
                         trainable_params=r.get("trainable_params", 0))
    return state["step"], state["position"], result


def _bools(pattern):
    if not pattern:
        return None
    return {k: [bool(x) for x in (v.tolist() if hasattr(v, "tolist") else v)] for k, v in pattern.items()}


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
