"""The memory plan: which layers recompute their activations, where their inputs wait, how large the
cross-entropy's chunks are, and whether NF4 weights stay dequantized.

The planner models the peak memory of a step analytically (``Footprint``, from the model's config
and the largest micro-batch), enumerates the plans its levers allow, and takes the fastest that
fits the budget by a simple cost model in units of one layer's training time. The levers:

* gradient checkpointing per layer (recompute a layer's activations in the backward pass: about a
  third of the layer's time, less the down projection's frozen matmul, which the recomputation
  skips; the first layers recompute, the last layers' activations are the first the backward needs);
* offloading the checkpointed layers' inputs (the fp32 residual stream, 128 MiB per layer at the
  8B shape and 8,192 tokens) to pinned host memory in the compute dtype (64 MiB), copied on a side
  stream while the GPU computes, each brought back one layer ahead of its backward;
* smaller cross-entropy chunks (the logits of a 1,024-token chunk of a 128k vocabulary take 1.2
  GiB with their fp32 copy and gradient; 256 tokens take a quarter of that);
* the backward pass's recomputation of a projection's prologue (SwiGLU before the down
  projection) in chunks of tokens, so that its output and gradient are a chunk's (0.4 GiB less);
* the input embedding (frozen, 1 GiB at a 128k vocabulary) in host memory: the lookup of a
  micro-batch's tokens runs there and sends the GPU 64 MiB (untied embeddings only);
* the dequantized-weight cache, when everything else fits: of every layer, or of as many of the
  last layers (those that keep their activations) as the room left over holds (0.44 GiB a layer
  at the 8B shape: each saves its two NF4 dequantizations a step, and the cache has room for the
  LoRA up-weight beside the frozen weight, so the projection still joins it).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from loratune.training.fused.lora_linear import BACKWARD_CHUNK_BYTES
from loratune.training.fused.loss import LOSS_CHUNK_TOKENS

if TYPE_CHECKING:
    from loratune.training.fused.model import FusedCausalLM

# Tokens per chunk of the chunked cross-entropy the planner may choose, the fastest first.
LOSS_CHUNKS = (LOSS_CHUNK_TOKENS, 256)
# The cost model, in units of one layer's forward and backward time (8B shape, H200: 17 ms), fitted
# to the step times of the four plans measured in bench/results/train_speed_peers_h200_2026-12-01_f2d31a7.md
# (0, 13, 23 and 32 layers recomputed: 0.545, 0.651, 0.716 and 0.795 s), the small-chunk cost assumed.
# Since, the recomputation skips the down projection's frozen matmul (0.96 TFLOP at 8,192 tokens,
# 1.26 ms at the 763 TFLOP/s of the forward projections in the 40 GiB profile of 72aaf14: 0.07).
RECOMPUTE_COST = 0.37 - 0.07
OFFLOAD_COST = 0.02  # per offloaded input: the copies overlap the compute; what is left is synchronization
SMALL_CHUNK_COST = 0.05  # 4x as many (still large) cross-entropy matmuls
EMBED_HOST_COST = 1.1  # measured with the lookup behind a synchronization (since: pinned, none)
CHUNKED_BACKWARD_COST = 1.05  # smaller matmuls and more launches in every layer's backward
EAGER_ACTIVATION_FACTOR = 1.3  # eager RMSNorm and SwiGLU keep more intermediates (H200: 43.5 against 36.2 GiB)
# Above the modelled peak (torch's peak allocation): the transients the model leaves out (the
# kernels' workspaces, the optimizer's foreach temporaries). The allocator's own reserve is not
# part of that peak; a budget is of allocated memory, as the peers' peaks are.
SAFETY_MARGIN = 2**28


@dataclass(frozen=True)
class MemoryPlan:
    """Which layers recompute their activations in the backward pass, whether their inputs wait in
    host memory, the cross-entropy's chunk, whether the input embedding waits in host memory and
    the backward recomputes in chunks, and whether NF4 weights stay dequantized."""

    checkpointed: frozenset[int]
    dequant_cache: bool
    offload: bool = False
    loss_chunk: int = LOSS_CHUNKS[0]
    embed_on_host: bool = False
    chunked_backward: bool = False
    budget_gib: float | None = None
    estimate_gib: float | None = None  # the planner's estimate of the step's peak
    cached_layers: int = 0  # without the whole cache: the last layers whose NF4 weights stay dequantized

    def cached_layer_indices(self, n_layers: int) -> frozenset[int]:
        """The layers whose NF4 weights stay dequantized: every one with the cache, else the last
        ``cached_layers`` (never a recomputed one: those are the first layers)."""
        if self.dequant_cache:
            return frozenset(range(n_layers))
        return frozenset(range(n_layers - min(self.cached_layers, n_layers), n_layers))

    def describe(self, n_layers: int) -> str:
        text = f"gradient checkpointing on {len(self.checkpointed)} of {n_layers} layers"
        if self.checkpointed and self.offload:
            text += " (inputs in host memory)"
        text += f", cross-entropy chunks of {self.loss_chunk} tokens"
        text += ", input embedding in host memory" if self.embed_on_host else ""
        text += ", backward recomputation in chunks" if self.chunked_backward else ""
        if self.dequant_cache or not self.cached_layers:
            text += ", dequantized-weight cache " + ("on" if self.dequant_cache else "off")
        else:
            text += f", dequantized weights of the last {self.cached_layers} layers cached"
        if self.budget_gib is not None:
            text += f" (budget {self.budget_gib:.1f} GiB, estimated peak {self.estimate_gib:.1f} GiB)"
        return text


@dataclass(frozen=True)
class MemoryRequest:
    """What a trial asks of the memory plan, besides the model: decided once, before training
    (``Trainer.memory_request``), and kept so the plan can be made again when the kernels change
    (compiled to eager)."""

    tokens_per_micro_batch: int  # the largest micro-batch the trial will see
    dropout: float
    checkpointing: bool | str
    dequant_cache: bool | str
    budget_gib: float | None
    device: torch.device
    trainable_params: int


@dataclass(frozen=True)
class Footprint:
    """The sizes (bytes) a plan trades against each other, for one model and micro-batch size."""

    n_layers: int
    tokens: int
    # Always there: weights, LoRA weights with gradients and AdamW moments, the safety margin.
    fixed: float
    per_layer: float  # activations a layer keeps for its backward when not checkpointed
    layer_input: float  # what a checkpointed layer keeps instead: its input (the fp32 residual stream)
    offloaded_input: float  # the same input as it waits in host memory and comes back (compute dtype)
    at_loss: float  # at the loss: the last hidden state (fp32), its norm and the norm's gradient
    in_backward: (
        float  # in a layer's backward: the residual stream's gradient (fp32, bf16), the dequantized down projection
    )
    scratch: float  # the transients of one layer's backward (the MLP's: SwiGLU recomputed, its gradients)
    chunked_scratch: float  # the same, the recomputation in chunks of tokens
    logits_per_token: float  # a cross-entropy chunk's logits (bf16, fp32) and logsumexp's fp32 temporary
    cache: float  # every NF4 weight dequantized, with room for the LoRA up-weights (0: nothing quantized)
    embedding: float  # the input embedding, if it can wait in host memory (0: tied to the output layer)

    def peak(self, plan: MemoryPlan) -> float:
        """The step's peak for ``plan``, the larger of two moments (calibrated against the H200's
        peaks, bench/results/train_speed_peers_h200_2026-12-01_f2d31a7.md): the end of the
        forward (the kept layers' activations, a loss chunk) and the last layer's backward (its
        activations, recomputed if checkpointed, with the backward's transients)."""
        checkpointed = len(plan.checkpointed)
        kept = self.n_layers - checkpointed
        # The checkpointed layers' inputs; offloaded, only the one prefetched (in the compute dtype)
        # and, when every layer is checkpointed, the one in use (restored to the residual dtype).
        if plan.offload:
            inputs = min(checkpointed, 1) * self.offloaded_input + (0 if kept else self.layer_input)
        else:
            inputs = checkpointed * self.layer_input
        loss = min(plan.loss_chunk, self.tokens) * self.logits_per_token
        at_loss = kept * self.per_layer + self.at_loss + loss
        # A recomputed layer's activations include its input, already counted among the inputs.
        activations = kept * self.per_layer if kept else self.per_layer - self.layer_input
        scratch = self.chunked_scratch if plan.chunked_backward else self.scratch
        in_backward = activations + self.in_backward + scratch
        peak = self.fixed + inputs + max(at_loss, in_backward)
        cache = self.cache if plan.dequant_cache else self.cache * min(plan.cached_layers, self.n_layers) / self.n_layers
        return peak + cache - (self.embedding if plan.embed_on_host else 0)


def footprint(
    config,
    request: MemoryRequest,
    *,
    resident_bytes: float,
    quantized: bool,
    compiled: bool,
    compute_bits: int = 16,
    residual_bits: int = 32,
) -> Footprint:
    """The footprint of a Llama-family model of ``config`` for ``request``; ``resident_bytes``: what
    the model takes before training (on CUDA: what torch has allocated, without a dequantized cache)."""
    tokens = request.tokens_per_micro_batch
    hidden, intermediate, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    size, residual = compute_bits // 8, residual_bits // 8
    # Kept per token and layer: the two residual-stream inputs of the norm prologues, q, k, v, the
    # attention output, gate|up (the SwiGLU prologue's input); each LoRA input's dropout mask.
    per_token = (2 * q + 2 * kv + 2 * intermediate) * size + 2 * hidden * residual + 64
    if request.dropout > 0:
        per_token += 2 * hidden + q + intermediate
    # The down projection's backward: gate|up's gradient, and SwiGLU's output recomputed with its
    # gradient, of all tokens or (chunked) of a chunk of them (``BACKWARD_CHUNK_BYTES`` of its input).
    gate_up = tokens * 2 * intermediate * size
    chunked = gate_up + 3 * min(BACKWARD_CHUNK_BYTES, gate_up)
    factor = 1.0 if compiled else EAGER_ACTIVATION_FACTOR
    linear_params = config.num_hidden_layers * hidden * (2 * q + 2 * kv + 3 * intermediate)
    return Footprint(
        n_layers=config.num_hidden_layers,
        tokens=tokens,
        fixed=resident_bytes + 16 * request.trainable_params + SAFETY_MARGIN,  # fp32 gradient, AdamW moments, a spare
        per_layer=factor * per_token * tokens,
        layer_input=tokens * hidden * residual,
        offloaded_input=tokens * hidden * size,
        at_loss=tokens * hidden * (residual + 2 * size),
        in_backward=tokens * hidden * (residual + size)
        + intermediate * hidden * size,  # down's backward is the largest
        scratch=factor * 2 * gate_up,
        chunked_scratch=factor * chunked,
        logits_per_token=vocab * (2 + 4 + 4),
        cache=(linear_params + request.trainable_params) * size if quantized else 0,
        embedding=0 if getattr(config, "tie_word_embeddings", False) else vocab * hidden * size,
    )


def model_bytes(config, *, quantized: bool, trainable_params: int, compute_bits: int = 16) -> float:
    """What loading a Llama-family model with its LoRA weights (fp32) allocates: NF4 linear layers
    (half a byte a weight, double-quantized block scales), embeddings, output layer and norms in
    the compute dtype. For planning without the model (tests, the bench's estimate)."""
    hidden, intermediate = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q, kv = heads * head_dim, config.num_key_value_heads * head_dim
    linear = config.num_hidden_layers * hidden * (2 * q + 2 * kv + 3 * intermediate)
    embeddings = config.vocab_size * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    norms = (2 * config.num_hidden_layers + 1) * hidden
    size = compute_bits // 8
    linear_bytes = linear * (0.5 + 1 / 64 + 4 / (64 * 256)) if quantized else linear * size
    return linear_bytes + (embeddings + norms) * size + 4 * trainable_params


def plan_memory(fused: FusedCausalLM, request: MemoryRequest) -> MemoryPlan:
    """The fastest plan that fits ``request.budget_gib`` (default: 90% of the GPU's memory).

    ``request.checkpointing``: True (every layer), False (none) or "auto" (from the budget). On the
    CPU "auto" checkpoints nothing and caches dequantized weights, memory there being the machine's.
    """
    device = request.device
    if device.type != "cuda":
        checkpointed = frozenset(range(len(fused.layers))) if request.checkpointing is True else frozenset()
        cache = fused.quantized and request.dequant_cache in (True, "auto")
        return MemoryPlan(checkpointed=checkpointed, dequant_cache=cache)
    total = torch.cuda.get_device_properties(device).total_memory
    budget = request.budget_gib * 2**30 if request.budget_gib is not None else 0.9 * total
    weights = [g.weights for layer in fused.layers for g in layer.groups if g.weights.quantized]
    cached_now = sum(w.nbytes for w in weights if w.cache is not None)  # a previous plan's cache
    embed = fused.embed
    on_host = embed.nbytes if embed.device.type == "cpu" else 0  # a previous plan's host embedding
    sizes = footprint(
        fused.config,
        request,
        resident_bytes=torch.cuda.memory_allocated(device) - cached_now + on_host,
        quantized=fused.quantized,
        compiled=fused.compiled,
        compute_bits=torch.finfo(fused.dtype).bits,
        residual_bits=torch.finfo(fused.residual_dtype).bits,
    )
    return choose_plan(sizes, request, budget=budget, can_offload=True)


def plan_cost(plan: MemoryPlan) -> float:
    """The plan's extra time a step, in units of one layer's training time (the cost model above)."""
    checkpointed = len(plan.checkpointed)
    cost = checkpointed * (RECOMPUTE_COST + (OFFLOAD_COST if plan.offload else 0))
    cost += EMBED_HOST_COST if plan.embed_on_host else 0
    cost += CHUNKED_BACKWARD_COST if plan.chunked_backward else 0
    return cost + (SMALL_CHUNK_COST if plan.loss_chunk < LOSS_CHUNKS[0] else 0)


def choose_plan(sizes: Footprint, request: MemoryRequest, *, budget: float, can_offload: bool) -> MemoryPlan:
    """The fastest plan for a budget (bytes) by ``plan_cost`` among those whose ``sizes.peak`` fits;
    when none fits, the plan of the lowest peak. Each combination of the levers keeps the
    activations of as many (last) layers as fit; the dequantized-weight cache comes on when asked
    (first, before the activations) or, with "auto", when it fits after them."""
    n_layers = sizes.n_layers
    if request.checkpointing is True:
        keeps = [0]
    elif request.checkpointing is False:
        keeps = [n_layers]
    else:
        keeps = range(n_layers, -1, -1)
    forced_cache = request.dequant_cache is True and sizes.cache > 0
    candidates = []
    host = (False, True) if can_offload else (False,)
    embeds = host if sizes.embedding else (False,)
    for offload, embed_on_host, chunked, chunk in itertools.product(host, embeds, (False, True), LOSS_CHUNKS):
        for keep in keeps:  # the most kept layers that fit (else, with "auto", all checkpointed)
            plan = MemoryPlan(
                checkpointed=frozenset(range(n_layers - keep)),
                dequant_cache=forced_cache,
                offload=offload and keep < n_layers,
                loss_chunk=chunk,
                embed_on_host=embed_on_host,
                chunked_backward=chunked,
            )
            if sizes.peak(plan) <= budget:
                break
        candidates.append(plan)
    fitting = [p for p in candidates if sizes.peak(p) <= budget]
    if fitting:
        best = min(fitting, key=lambda p: (plan_cost(p), sizes.peak(p)))
    else:
        best = min(candidates, key=lambda p: (sizes.peak(p), plan_cost(p)))
    cached = replace(best, dequant_cache=True)
    if request.dequant_cache == "auto" and sizes.cache > 0 and sizes.peak(cached) <= budget:
        best = cached
    elif request.dequant_cache == "auto" and sizes.cache > 0 and sizes.peak(best) <= budget:
        # the room left over: as many of the layers that keep their activations as it holds
        per_layer = sizes.cache / sizes.n_layers
        room = int((budget - sizes.peak(best)) // per_layer)
        best = replace(best, cached_layers=max(0, min(room, sizes.n_layers - len(best.checkpointed))))
    return replace(best, budget_gib=budget / 2**30, estimate_gib=sizes.peak(best) / 2**30)
