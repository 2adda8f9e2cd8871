"""Fast mixed-adapter batches: every row of a batch with its own LoRA adapter, in one pass.

PEFT's own mixed batch (`adapter_names=`) loops, in every LoRA layer, over the
adapters present: select the rows, two small matmuls, scatter back. With 8
adapters that is ~8x the kernel launches of a single-adapter batch, and decode
steps are launch-bound. Here each LoRA layer instead keeps its adapters stacked,
A as [n, r, in] and B (scaling folded in) as [n, out, r], gathers each row's
pair with one index and applies them with two batched matmuls (the BGMV scheme
of Punica/S-LoRA), whatever the number of adapters. Slot 0 is all zeros: rows
that use the base model alone.

The weights stay PEFT's (loaded, saved and swapped by PEFT); this module only
replaces the arithmetic of the mixed-batch forward while a `MixedLoRA.batch`
context is open.
"""

from __future__ import annotations

import contextlib

import torch


def _lora_linears(model):
    from peft.tuners.lora.layer import Linear as LoraLinear

    return [m for m in model.modules() if isinstance(m, LoraLinear)]


class MixedLoRA:
    def __init__(self, model):
        self.model = model
        self.layers = _lora_linears(model)
        self._stacks: dict[tuple[str, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for layer in self.layers:
            if not hasattr(layer, "_retro_forward"):
                layer._retro_forward = layer.forward
                layer._retro_rows = None
                layer.forward = _forward.__get__(layer)

    def supports(self, adapter_name: str) -> bool:
        """Plain LoRA only: no DoRA, no merged weights (AdaLoRA and IA3 use other layers)."""
        return all(
            adapter_name in layer.lora_A and not layer.use_dora.get(adapter_name, False) and not layer.merged
            for layer in self.layers
        ) and bool(self.layers)

    def invalidate(self) -> None:
        """Call after loading or deleting adapters."""
        self._stacks.clear()

    def _stack(self, names: tuple[str, ...]):
        if names not in self._stacks:
            stacks = []
            for layer in self.layers:
                ref = layer.base_layer.weight
                ranks = [layer.lora_A[n].weight.shape[0] if n in layer.lora_A else 0 for n in names]
                r = max(ranks + [1])
                a = ref.new_zeros((len(names) + 1, r, layer.in_features))
                b = ref.new_zeros((len(names) + 1, layer.out_features, r))
                for slot, (n, rank) in enumerate(zip(names, ranks), start=1):
                    if rank:
                        a[slot, :rank] = layer.lora_A[n].weight
                        b[slot, :, :rank] = layer.lora_B[n].weight * layer.scaling[n]
                stacks.append((a, b))
            self._stacks = {names: stacks}  # keep one set: batches reuse the loaded adapters
        return self._stacks[names]

    @contextlib.contextmanager
    def batch(self, row_adapters: list[str | None]):
        """Within the context, row i of every forward uses adapter `row_adapters[i]` (None: base model)."""
        names = tuple(sorted({n for n in row_adapters if n is not None}))
        slot = {n: i for i, n in enumerate(names, start=1)}
        device = self.layers[0].base_layer.weight.device if self.layers else "cpu"
        rows = torch.tensor([slot[n] if n is not None else 0 for n in row_adapters], device=device)
        for layer, stack in zip(self.layers, self._stack(names)):
            layer._retro_rows = (rows, *stack)
        try:
            yield
        finally:
            for layer in self.layers:
                layer._retro_rows = None


def _forward(self, x, *args, **kwargs):
    state = self._retro_rows
    if state is None or kwargs.get("adapter_names") is not None:
        return self._retro_forward(x, *args, **kwargs)
    rows, a, b = state
    if x.shape[0] > rows.shape[0]:  # static decoding pads a batch with copies of its first row (StaticDecode.BATCH_BUCKETS)
        rows = torch.cat([rows, rows[:1].expand(x.shape[0] - rows.shape[0])])
    result = self.base_layer(x, *args, **kwargs)
    xa = torch.bmm(x.to(a.dtype), a[rows].transpose(1, 2))  # [batch, seq, r]
    return result + torch.bmm(xa, b[rows].transpose(1, 2)).to(result.dtype)
