"""The memory plan: which layers recompute their activations, and whether NF4 weights stay dequantized."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from loratune.training.fused.loss import LOSS_CHUNK_TOKENS

if TYPE_CHECKING:
    from loratune.training.fused.model import FusedCausalLM


@dataclass
class MemoryPlan:
    """Which layers recompute their activations in the backward pass, and whether NF4 weights stay dequantized."""

    checkpointed: frozenset[int]
    dequant_cache: bool
    budget_gib: float | None = None
    activation_gib_per_layer: float | None = None

    def describe(self, n_layers: int) -> str:
        text = f"gradient checkpointing on {len(self.checkpointed)} of {n_layers} layers"
        text += ", dequantized-weight cache " + ("on" if self.dequant_cache else "off")
        if self.budget_gib is not None:
            text += f" (budget {self.budget_gib:.1f} GiB, ~{self.activation_gib_per_layer:.2f} GiB of activations per layer)"
        return text


@dataclass(frozen=True)
class MemoryRequest:
    """What a trial asks of the memory plan, besides the model: decided once, before training, and
    kept so the plan can be made again when the kernels change (compiled to eager)."""

    tokens_per_micro_batch: int  # the largest micro-batch the trial will see
    dropout: float
    checkpointing: bool | str
    dequant_cache: bool | str
    budget_gib: float | None
    device: torch.device
    trainable_params: int


def plan_memory(fused: FusedCausalLM, request: MemoryRequest) -> MemoryPlan:
    """Checkpoint as few layers as the memory budget allows, then keep NF4 weights dequantized if
    everything else fits.

    ``request.checkpointing``: True (every layer), False (none) or "auto" (from the budget). The
    budget (GiB) defaults to 90% of the GPU's memory; on the CPU "auto" checkpoints nothing and
    caches dequantized weights, memory there being the machine's.
    """
    tokens_per_micro_batch, dropout, device = request.tokens_per_micro_batch, request.dropout, request.device
    checkpointing, dequant_cache, budget_gib = request.checkpointing, request.dequant_cache, request.budget_gib
    n_layers = len(fused.layers)
    quantized = [g.weights for layer in fused.layers for g in layer.groups if g.weights.quantized]
    cache_bytes = sum(w.nbytes for w in quantized)
    if device.type != "cuda":
        checkpointed = frozenset(range(n_layers)) if checkpointing is True else frozenset()
        cache = bool(quantized) and dequant_cache in (True, "auto")
        return MemoryPlan(checkpointed=checkpointed, dequant_cache=cache)
    total = torch.cuda.get_device_properties(device).total_memory
    budget = budget_gib * 2**30 if budget_gib is not None else 0.9 * total
    # Measured on the H200 (8B shape, 8192 tokens, dropout 0.05): 1.26 GiB per layer against 1.33 estimated.
    per_layer = fused.activation_bytes_per_token(dropout) * tokens_per_micro_batch
    if not fused.compiled:  # eager RMSNorm and SwiGLU keep more intermediates (H200: 43.5 against 36.2 GiB)
        per_layer *= 1.3
    hidden_bytes = tokens_per_micro_batch * fused.config.hidden_size * torch.finfo(fused.residual_dtype).bits // 8
    vocab = fused.lm_head.shape[0]
    largest_group = max(g.weights.nbytes for layer in fused.layers for g in layer.groups)
    cached_now = sum(w.nbytes for w in quantized if w.cache is not None)  # a previous plan's cache
    fixed = (
        torch.cuda.memory_allocated(device)
        - cached_now
        + 16 * request.trainable_params  # fp32 gradient, two AdamW moments, a spare
        + min(LOSS_CHUNK_TOKENS, tokens_per_micro_batch) * vocab * 10  # a chunk of logits: bf16, fp32, gradient
        + 2 * largest_group  # dequantized weights in use
        + hidden_bytes * 4  # the loss gradient, residuals
        + 2**29  # allocator slack
    )
    return choose_plan(
        budget=budget,
        fixed=fixed,
        per_layer=per_layer,
        n_layers=n_layers,
        cache_bytes=cache_bytes,
        checkpointing=checkpointing,
        dequant_cache=dequant_cache,
        checkpoint_bytes=hidden_bytes,
    )


def choose_plan(
    *,
    budget: float,
    fixed: float,
    per_layer: float,
    n_layers: int,
    cache_bytes: int,
    checkpointing: bool | str,
    dequant_cache: bool | str,
    checkpoint_bytes: float = 0,
) -> MemoryPlan:
    """The plan for a budget (bytes): keep the activations (``per_layer``) of as many layers as fit
    after ``fixed`` (checkpoint the rest, first layers first, each keeping ``checkpoint_bytes``, its
    input), then cache the dequantized weights (``cache_bytes``; 0 when nothing is quantized) if
    they fit in what is left."""
    if dequant_cache is True:  # asked for: it comes first
        fixed += cache_bytes
    if checkpointing is True:
        keep = 0
    elif checkpointing is False:
        keep = n_layers
    else:
        room = budget - fixed - n_layers * checkpoint_bytes
        keep = max(0, min(n_layers, int(room // (per_layer - checkpoint_bytes))))
    # Checkpoint the first layers: the last layers' activations are the first the backward uses.
    checkpointed = frozenset(range(n_layers - keep))
    left = budget - fixed - keep * per_layer - (n_layers - keep) * checkpoint_bytes
    cache = cache_bytes > 0 and (dequant_cache is True or (dequant_cache == "auto" and left > cache_bytes))
    return MemoryPlan(
        checkpointed=checkpointed,
        dequant_cache=cache,
        budget_gib=budget / 2**30,
        activation_gib_per_layer=per_layer / 2**30,
    )
