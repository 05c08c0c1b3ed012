"""The fused training path: a Llama-family forward and backward written for (Q)LoRA training.

The plain path runs the Hugging Face model with peft adapters: per projection a 4-bit matmul
(dequantize, matmul) and a LoRA branch (dropout, two matmuls, a scale, an add); norms and the
residual stream upcast to fp32 by ``prepare_model_for_kbit_training``; padded batches; and the
logits of the whole batch materialized in fp32 for the loss. This path computes the same function
with fewer, larger kernels and less memory:

* the examples of a micro-batch are one flat token stream (no padding; attention stays inside
  each example through per-example causal attention, RoPE positions restart per example);
* q/k/v and gate/up are one matmul each over their weights dequantized side by side, with the
  LoRA branches of a group as one down- and one block-diagonal up-projection, inside a custom
  autograd function that saves only what the LoRA gradients need (never a dequantized weight);
* LoRA dropout draws one mask per shared input (q/k/v share one, gate/up another), where peft
  draws one per projection: the same distribution, not the same random numbers;
* the residual stream and its gradient stay fp32, as in the plain QLoRA recipe; the rest runs in
  the compute dtype (bf16);
* the loss is a chunked cross-entropy over the output layer that never holds more than one
  chunk's logits, and computes its input gradient on the way;
* gradient checkpointing is chosen per layer from a memory budget (``plan_memory``), and the
  dequantized weights may be kept when the budget leaves room for them;
* RMSNorm and SwiGLU run inside the projection that follows them and are recomputed in the
  backward pass instead of saved; on CUDA they, RoPE and the dropout arithmetic are compiled
  into fused kernels when ``compile`` is on; AdamW takes its fused kernel.

The LoRA weights stay peft's own parameters, so adapters save and load as peft adapters. Models
other than Llama-style ones (``unsupported_reason``) keep the plain path.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from loratune.training.data import IGNORE_INDEX, TokenizedExample

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
LOSS_CHUNK_TOKENS = 1024  # tokens per chunk of the chunked cross-entropy
GROUPS = (
    ("self_attn", ("q_proj", "k_proj", "v_proj")),
    ("self_attn", ("o_proj",)),
    ("mlp", ("gate_proj", "up_proj")),
    ("mlp", ("down_proj",)),
)


# ---- what the path supports -------------------------------------------------------------
def _inner_model(model):
    """The ``*ForCausalLM`` inside a peft wrapper (or the model itself)."""
    base = getattr(model, "base_model", None)
    if base is not None and hasattr(base, "model") and hasattr(base.model, "lm_head"):
        return base.model
    return model


def _lora_parts(module):
    """(base layer, lora_A, lora_B, scaling, dropout p) of a peft LoRA layer, or (module, None...)."""
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None:
        return module, None, None, None, 0.0
    adapters = list(lora_a.keys())
    if len(adapters) != 1:
        raise ValueError(f"expected one LoRA adapter, found {adapters}")
    name = adapters[0]
    dropout = module.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0
    return module.base_layer, lora_a[name].weight, module.lora_B[name].weight, float(module.scaling[name]), p


def config_unsupported_reason(config) -> str | None:
    """Why the fused path cannot train a model of this ``config`` (None: it can)."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "sliding_window", None):
        return "sliding-window attention"
    if getattr(config, "mlp_bias", False):
        return "MLP biases"
    return None


def unsupported_reason(model) -> str | None:
    """Why the fused path cannot train ``model`` (None: it can)."""
    inner = _inner_model(model)
    reason = config_unsupported_reason(inner.config)
    if reason:
        return reason
    for layer in inner.model.layers:
        for parent, names in GROUPS:
            for name in names:
                module = getattr(getattr(layer, parent), name)
                if getattr(module, "use_dora", {}) and any(module.use_dora.values()):
                    return "DoRA adapters"
                base = _lora_parts(module)[0]
                if not isinstance(base, torch.nn.Linear):
                    return f"{name} is a {type(base).__name__}, not a linear layer"
    if any(p.requires_grad for n, p in inner.named_parameters() if "lora_" not in n):
        return "trainable parameters besides the LoRA weights"
    return None


# ---- frozen weights ---------------------------------------------------------------------
def _is_4bit(linear) -> bool:
    return getattr(linear.weight, "quant_state", None) is not None


class FrozenWeights:
    """The dense weight of a group of frozen linear layers stacked along the output dimension.

    NF4 weights are dequantized on every use (into one buffer on CUDA), or once when cached.
    """

    def __init__(self, linears: Sequence[torch.nn.Linear], dtype: torch.dtype):
        self.linears = list(linears)
        self.dtype = dtype
        self.quantized = any(_is_4bit(linear) for linear in self.linears)
        self.sizes = [linear.out_features for linear in self.linears]
        self.in_features = self.linears[0].in_features
        self.cache: torch.Tensor | None = None
        biases = [linear.bias for linear in self.linears]
        if all(b is None for b in biases):
            self.bias = None
        else:
            self.bias = torch.cat(
                [
                    (b.detach() if b is not None else torch.zeros(n, device=self.device)).to(dtype)
                    for b, n in zip(biases, self.sizes)
                ]
            )
        if not self.quantized and len(self.linears) > 1:
            self.cache = self._dense()  # plain weights: stack them once
        self.stacked_plain = not self.quantized and len(self.linears) > 1

    @property
    def device(self) -> torch.device:
        return self.linears[0].weight.device

    @property
    def nbytes(self) -> int:
        return sum(self.sizes) * self.in_features * torch.finfo(self.dtype).bits // 8

    @torch.no_grad()
    def _dense(self) -> torch.Tensor:
        if len(self.linears) == 1 and not self.quantized:
            weight = self.linears[0].weight
            return weight if weight.dtype == self.dtype else weight.to(self.dtype)
        if self.quantized and self.device.type == "cuda":
            out = torch.empty(sum(self.sizes), self.in_features, dtype=self.dtype, device=self.device)
            row = 0
            for linear, size in zip(self.linears, self.sizes):
                self._dequantize(linear, out=out[row : row + size])
                row += size
            return out
        parts = [self._dequantize(linear) for linear in self.linears]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _dequantize(self, linear, out: torch.Tensor | None = None) -> torch.Tensor:
        if not _is_4bit(linear):
            weight = linear.weight.detach().to(self.dtype)
            if out is not None:
                out.copy_(weight)
                return out
            return weight
        import bitsandbytes.functional as bnbf

        weight = bnbf.dequantize_4bit(linear.weight.data, linear.weight.quant_state, out=out)
        return weight if weight.dtype == self.dtype else weight.to(self.dtype)

    def get(self) -> torch.Tensor:
        return self.cache if self.cache is not None else self._dense()

    def keep_dequantized(self, keep: bool) -> None:
        if self.stacked_plain:
            return
        self.cache = self._dense() if keep and self.quantized else None


class _FrozenLinearLora(torch.autograd.Function):
    """y = x W^T (+ b) + (dropout(x) A^T) B^T with x = prologue(u), for a frozen W.

    The prologue (the RMSNorm before q/k/v and gate/up, the SwiGLU before down) is cheap
    elementwise work: the function saves its input u and the dropout mask, and recomputes x and
    dropout(x) in the backward pass rather than keeping them (28% less activation memory per
    layer, so fewer layers need checkpointing). It never saves a dequantized weight; the input
    gradient takes the LoRA branch's share through the mask in one pass.
    """

    @staticmethod
    def forward(
        ctx, u, lora_a, lora_b, weights: FrozenWeights, dropout: float, kernels: "Kernels", prologue: Callable | None
    ):
        x = prologue(u) if prologue is not None else u
        y = F.linear(x, weights.get(), weights.bias)
        ctx.weights, ctx.kernels, ctx.prologue = weights, kernels, prologue
        ctx.has_lora = lora_a is not None
        ctx.dropout = dropout
        mask = z = a = b = None
        if ctx.has_lora:
            x_dropped = x
            if dropout > 0:
                x_dropped, mask = torch.native_dropout(x, dropout, True)
            a = lora_a.to(x.dtype)
            b = lora_b.to(x.dtype)
            z = x_dropped @ a.t()
            y.addmm_(z, b.t())
            ctx.lora_dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.save_for_backward(u, z, a, b, mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        grad_y = grad_y.contiguous()
        u, z, a, b, mask = ctx.saved_tensors
        needs_input = ctx.needs_input_grad[0]
        if ctx.prologue is None:
            x = u
        else:
            with torch.set_grad_enabled(needs_input):
                u = u.detach().requires_grad_(needs_input)
                x = ctx.prologue(u)
        grad_u = grad_a = grad_b = None
        scale = 1.0 / (1.0 - ctx.dropout) if mask is not None else 1.0
        if ctx.has_lora:
            x_dropped = x.detach() if mask is None else ctx.kernels.masked_scale(x.detach(), mask, scale)
            grad_z = grad_y @ b  # (T, r)
            grad_b = (grad_y.t() @ z).to(ctx.lora_dtypes[1])
            grad_a = (grad_z.t() @ x_dropped).to(ctx.lora_dtypes[0])
            del x_dropped
        if needs_input:
            grad_x = grad_y @ ctx.weights.get()
            if ctx.has_lora:
                if mask is None:
                    grad_x.addmm_(grad_z, a)
                else:
                    grad_x = ctx.kernels.masked_accumulate(grad_x, grad_z @ a, mask, scale)
            grad_u = grad_x if ctx.prologue is None else torch.autograd.grad(x, u, grad_x)[0]
        return grad_u, grad_a, grad_b, None, None, None, None


@dataclass
class _Group:
    """One fused projection: a frozen weight stack and the LoRA weights of its members."""

    weights: FrozenWeights
    lora_a: list[torch.Tensor | None]
    lora_b: list[torch.Tensor | None]
    scales: list[float]
    dropout: float

    def __call__(
        self, u: torch.Tensor, training: bool, kernels: "Kernels", prologue: Callable | None = None
    ) -> torch.Tensor:
        """The projection of ``prologue(u)`` (or of ``u``)."""
        if all(a is None for a in self.lora_a):
            return _FrozenLinearLora.apply(u, None, None, self.weights, 0.0, kernels, prologue)
        a, b = self._stacked()
        dropout = self.dropout if training else 0.0
        return _FrozenLinearLora.apply(u, a, b, self.weights, dropout, kernels, prologue)

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        present = [i for i, a in enumerate(self.lora_a) if a is not None]
        if len(self.lora_a) == 1:
            return self.lora_a[0], self.lora_b[0] * self.scales[0]
        a = torch.cat([self.lora_a[i] for i in present])
        ranks = [self.lora_a[i].shape[0] for i in present]
        blocks = []
        for i, size in enumerate(self.weights.sizes):  # block-diagonal B with the scales folded in
            if i in present:
                k = present.index(i)
                left, right = sum(ranks[:k]), sum(ranks[k + 1 :])
                b = self.lora_b[i] * self.scales[i]
                blocks.append(F.pad(b, (left, right)))
            else:
                blocks.append(a.new_zeros(size, a.shape[0]))
        return a, torch.cat(blocks)


def _group(layer_part, names: Sequence[str], dtype: torch.dtype) -> _Group:
    parts = [_lora_parts(getattr(layer_part, name)) for name in names]
    dropouts = {p for _, a, _, _, p in parts if a is not None}
    if len(dropouts) > 1:
        raise ValueError(f"LoRA dropout differs within {names}: {sorted(dropouts)}")
    return _Group(
        weights=FrozenWeights([base for base, *_ in parts], dtype),
        lora_a=[a for _, a, _, _, _ in parts],
        lora_b=[b for _, _, b, _, _ in parts],
        scales=[s or 0.0 for _, _, _, s, _ in parts],
        dropout=dropouts.pop() if dropouts else 0.0,
    )


# ---- elementwise pieces (compiled on CUDA) -----------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalize in fp32, round to the weight's (compute) dtype, then scale.

    ``x`` may be the fp32 residual stream; the output is always in the compute dtype.
    """
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(weight.dtype)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (T, heads, head_dim) with cos/sin of shape (T, head_dim), halves rotated."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def split_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """Split a fused q|k|v projection (T, ...) into heads, RoPE on q and k: one kernel when compiled."""
    total = qkv.shape[0]
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    q = qkv[:, :q_size].reshape(total, heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].reshape(total, kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].reshape(total, kv_heads, head_dim)
    return rotary(q, cos, sin), rotary(k, cos, sin), v.contiguous()


def masked_scale(x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Dropout with a known mask: x·mask·scale."""
    return x * mask * scale


def residual_add(hidden: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The fp32 residual stream plus a compute-dtype layer output."""
    return hidden + delta


def masked_accumulate(total: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """total + delta·mask·scale: a dropout's backward added into an input gradient, in one pass."""
    return total + delta * mask * scale


def swiglu(gate_up: torch.Tensor, intermediate: int) -> torch.Tensor:
    gate, up = gate_up[:, :intermediate], gate_up[:, intermediate:]
    return F.silu(gate) * up


@dataclass
class Kernels:
    rms_norm: Callable = rms_norm
    split_rotary: Callable = split_rotary
    swiglu: Callable = swiglu
    residual_add: Callable = residual_add
    masked_scale: Callable = masked_scale
    masked_accumulate: Callable = masked_accumulate


def is_compile_error(error: BaseException) -> bool:
    """Whether ``error`` came from torch.compile's machinery (no C compiler on the node, a
    Triton or Inductor failure, ...) rather than from the computation itself."""
    module = type(error).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "triton"))


def make_kernels(compile: bool) -> Kernels:
    """Eager elementwise functions, or the same functions compiled into fused kernels."""
    if not compile:
        return Kernels()
    # Default dynamism: a first compile for the first shapes, one more with only the dimensions
    # that changed (the token count) symbolic. dynamic=True made every dimension symbolic, and its
    # index arithmetic ran the SwiGLU backward at a third of the memory bandwidth (H200 profile).
    names = ("rms_norm", "split_rotary", "swiglu", "residual_add", "masked_scale", "masked_accumulate")
    return Kernels(**{name: torch.compile(globals()[name]) for name in names})


# ---- attention over a flat stream of examples --------------------------------------------
@dataclass
class PackedBatch:
    """The examples of one micro-batch as one flat token stream, with next-token targets."""

    input_ids: torch.Tensor  # (T,)
    targets: torch.Tensor  # (T,): the label of the next token of the same example, or IGNORE_INDEX
    position_ids: torch.Tensor  # (T,): restart at 0 for each example
    lengths: list[int]
    cu_seqlens: torch.Tensor  # (n + 1,) int32, on the device

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


def pack(examples: Sequence[TokenizedExample], device: torch.device) -> PackedBatch:
    """Concatenate ``examples``; position t is trained to predict token t+1 of the same example."""
    ids, targets, positions, lengths = [], [], [], []
    for example in examples:
        n = len(example.input_ids)
        ids.extend(example.input_ids)
        targets.extend(list(example.labels[1:]) + [IGNORE_INDEX])
        positions.extend(range(n))
        lengths.append(n)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long).to(device, non_blocking=True),
        targets=torch.tensor(targets, dtype=torch.long).to(device, non_blocking=True),
        position_ids=torch.tensor(positions, dtype=torch.long).to(device, non_blocking=True),
        lengths=lengths,
        cu_seqlens=torch.tensor(cu, dtype=torch.int32).to(device, non_blocking=True),
    )


_VARLEN: dict[str, object] = {}


def _varlen_attention():
    """torch's variable-length flash attention with a causal mask, if this torch has one whose
    forward and backward run here (probed once on a tiny input); else None."""
    if "fn" in _VARLEN:
        return _VARLEN["fn"]
    fn = None
    try:
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        if "window_size" in params:
            causal = {"window_size": (-1, 0)}
        elif "is_causal" in params:
            causal = {"is_causal": True}
        else:
            raise ImportError("no causal option")

        def fn(q, k, v, cu, longest, scale):
            return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, **causal)

        q = torch.randn(6, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cu = torch.tensor([0, 2, 6], device="cuda", dtype=torch.int32)
        fn(q, q, q, cu, 4, 0.125).sum().backward()
    except Exception as error:  # no such function, no kernel for this GPU, no backward, ...
        log.info("variable-length attention unavailable (%s); attending example by example", error)
        fn = None
    _VARLEN["fn"] = fn
    return fn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Causal attention within each example of the stream; q (T, Hq, D), k/v (T, Hkv, D) → (T, Hq·D)."""
    total, heads, dim = q.shape
    scale = 1.0 / math.sqrt(dim)
    gqa = k.shape[1] != heads
    lengths = batch.lengths
    if len(set(lengths)) == 1:  # equal lengths: one batched call of the fastest SDPA kernel
        n, length = len(lengths), lengths[0]

        def split(t):
            return t.view(n, length, t.shape[1], dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(total, heads * dim)
    varlen = _varlen_attention() if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) else None
    if varlen is not None:
        if gqa:  # this kernel wants as many key/value heads as query heads
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        return varlen(q, k, v, batch.cu_seqlens, max(lengths), scale).reshape(total, heads * dim)
    outs = []
    start = 0
    for length in lengths:
        s = slice(start, start + length)
        part = F.scaled_dot_product_attention(
            q[s].transpose(0, 1)[None],
            k[s].transpose(0, 1)[None],
            v[s].transpose(0, 1)[None],
            is_causal=True,
            scale=scale,
            enable_gqa=gqa,
        )
        outs.append(part[0].transpose(0, 1).reshape(length, heads * dim))
        start += length
    return torch.cat(outs)


# ---- the loss -----------------------------------------------------------------------------
class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed next-token cross-entropy of ``hidden @ weight.T`` without holding all the logits.

    The output weight is frozen; the input gradient is computed chunk by chunk in the forward
    (the loss is a sum, so the backward only scales it), so at most one chunk of fp32 logits
    exists at a time.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        total = hidden.new_zeros((), dtype=torch.float32)
        need_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            logits = (h @ weight.t()).float()
            valid = t != IGNORE_INDEX
            safe = torch.where(valid, t, 0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[:, None])[:, 0]
            total += ((lse - picked) * valid).sum()
            if need_grad:
                probs = torch.exp_(logits.sub_(lse[:, None]))
                probs.scatter_add_(1, safe[:, None], -valid[:, None].float())
                probs.mul_(valid[:, None])
                grad_hidden[start : start + chunk] = probs.to(hidden.dtype) @ weight
        if need_grad:
            ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None


def chunked_cross_entropy(hidden, weight, targets, chunk: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk)


# ---- the model --------------------------------------------------------------------------
class _Layer:
    def __init__(self, layer, dtype: torch.dtype, config):
        self.norm_in = layer.input_layernorm.weight
        self.norm_post = layer.post_attention_layernorm.weight
        self.eps = float(config.rms_norm_eps)
        self.qkv = _group(layer.self_attn, ("q_proj", "k_proj", "v_proj"), dtype)
        self.o = _group(layer.self_attn, ("o_proj",), dtype)
        self.gate_up = _group(layer.mlp, ("gate_proj", "up_proj"), dtype)
        self.down = _group(layer.mlp, ("down_proj",), dtype)
        self.groups = (self.qkv, self.o, self.gate_up, self.down)

    def forward(self, hidden, cos, sin, batch: PackedBatch, kernels: Kernels, shape, training: bool):
        heads, kv_heads, head_dim, intermediate = shape
        qkv = self.qkv(hidden, training, kernels, lambda u: kernels.rms_norm(u, self.norm_in, self.eps))
        q, k, v = kernels.split_rotary(qkv, cos, sin, heads, kv_heads, head_dim)
        hidden = kernels.residual_add(hidden, self.o(attention(q, k, v, batch), training, kernels))
        gate_up = self.gate_up(hidden, training, kernels, lambda u: kernels.rms_norm(u, self.norm_post, self.eps))
        return kernels.residual_add(
            hidden, self.down(gate_up, training, kernels, lambda u: kernels.swiglu(u, intermediate))
        )


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


class FusedCausalLM:
    """Loss of a (peft-wrapped) Llama-family model through the fused path; see the module docstring."""

    def __init__(self, model, *, compile: bool = False, residual_dtype: torch.dtype = torch.float32):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"training.fused_kernels: cannot fuse this model: {reason}")
        self.model = model
        inner = _inner_model(model)
        config = inner.config
        self.config = config
        self.embed = inner.model.embed_tokens.weight
        self.dtype = self.embed.dtype
        self.norm = inner.model.norm.weight
        self.eps = float(config.rms_norm_eps)
        self.lm_head = inner.lm_head.weight
        self.rotary_emb = inner.model.rotary_emb
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.shape = (heads, config.num_key_value_heads, head_dim, config.intermediate_size)
        self.layers = [_Layer(layer, self.dtype, config) for layer in inner.model.layers]
        self.kernels = make_kernels(compile)
        self.compiled = compile
        # The residual stream (and its gradient) stays fp32, as the plain QLoRA recipe keeps it: in
        # bf16, 30 layers of rounded adds doubled the LoRA gradients' error (SmolLM2, tests).
        self.residual_dtype = residual_dtype
        self.plan = MemoryPlan(checkpointed=frozenset(), dequant_cache=False)

    def fall_back_to_eager(self, error: BaseException) -> bool:
        """After ``error``: if it is a failure of torch.compile's own machinery (no C compiler on
        the node, say), switch to the eager kernels (same results) and return True; for any other
        error, or kernels already eager, return False."""
        if not self.compiled or not is_compile_error(error):
            return False
        self.kernels = make_kernels(False)
        self.compiled = False
        return True

    @property
    def quantized(self) -> bool:
        return any(group.weights.quantized for layer in self.layers for group in layer.groups)

    def apply_plan(self, plan: MemoryPlan) -> None:
        self.plan = plan
        for layer in self.layers:
            for group in layer.groups:
                group.weights.keep_dequantized(plan.dequant_cache)

    def activation_bytes_per_token(self, dropout: float) -> int:
        """Bytes the backward pass keeps per token and layer when the layer is not checkpointed."""
        heads, kv_heads, head_dim, intermediate = self.shape
        hidden, kv = self.config.hidden_size, kv_heads * head_dim
        q = heads * head_dim
        size = torch.finfo(self.dtype).bits // 8
        residual = torch.finfo(self.residual_dtype).bits // 8
        # The two residual-stream inputs of the norm prologues, q, k, v, the attention output,
        # gate|up (the SwiGLU prologue's input); each LoRA input's dropout mask (a byte each).
        elements = 2 * q + 2 * kv + 2 * intermediate
        extra = 2 * hidden * residual
        if dropout > 0:
            extra += 2 * hidden + q + intermediate
        return elements * size + extra + 64

    def loss(self, batch: PackedBatch, *, training: bool) -> torch.Tensor:
        """Summed cross-entropy over ``batch.targets`` (the caller divides by the count)."""
        hidden = F.embedding(batch.input_ids, self.embed).to(self.residual_dtype)
        cos, sin = self.rotary_emb(hidden, batch.position_ids[None])
        cos, sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
        checkpointed = self.plan.checkpointed if training and torch.is_grad_enabled() else frozenset()
        for index, layer in enumerate(self.layers):
            if index in checkpointed:
                hidden = torch.utils.checkpoint.checkpoint(
                    layer.forward, hidden, cos, sin, batch, self.kernels, self.shape, training, use_reentrant=False
                )
            else:
                hidden = layer.forward(hidden, cos, sin, batch, self.kernels, self.shape, training)
        hidden = self.kernels.rms_norm(hidden, self.norm, self.eps)
        return chunked_cross_entropy(hidden, self.lm_head.to(self.dtype), batch.targets)


def plan_memory(
    fused: FusedCausalLM,
    *,
    tokens_per_micro_batch: int,
    dropout: float,
    checkpointing: bool | str,
    dequant_cache: bool | str,
    budget_gib: float | None,
    device: torch.device,
    trainable_params: int,
) -> MemoryPlan:
    """Checkpoint as few layers as the memory budget allows, then keep NF4 weights dequantized if
    everything else fits.

    ``checkpointing``: True (every layer), False (none) or "auto" (from the budget). The budget
    (GiB) defaults to 90% of the GPU's memory; on the CPU "auto" checkpoints nothing and caches
    dequantized weights, memory there being the machine's.
    """
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
        + 16 * trainable_params  # fp32 gradient, two AdamW moments, a spare
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
