"""The elementwise pieces of a layer (RMSNorm, RoPE, SwiGLU, dropout arithmetic) and of the loss's
chunks, eager or compiled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from loratune.training.fused.loss import cross_entropy_chunk


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalize in fp32, round to the weight's (compute) dtype, then scale.

    ``x`` may be the fp32 residual stream; the output is always in the compute dtype.
    """
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(weight.dtype)


def rms_norm_with_grad(u: torch.Tensor, weight: torch.Tensor, eps: float, grad: torch.Tensor):
    """RMSNorm's output and the gradient of its input ``u`` for the output's gradient ``grad``, in
    one pass (fp32 inside; the norm's weight is frozen). ``grad`` may be a strided view (the
    columns of a wider matmul output): autograd's backward of the compiled norm copied it first."""
    u32 = u.float()
    rstd = torch.rsqrt(u32.pow(2).mean(-1, keepdim=True) + eps)
    normed = u32 * rstd
    scaled = grad.float() * weight.float()
    grad_u = rstd * (scaled - normed * (scaled * normed).mean(-1, keepdim=True))
    return weight * normed.to(weight.dtype), grad_u.to(u.dtype)


def rms_norm_with_grad_onto(u: torch.Tensor, weight: torch.Tensor, eps: float, grad: torch.Tensor, skip: torch.Tensor):
    """As ``rms_norm_with_grad``, with the residual path's gradient ``skip`` added to u's in the same
    pass (``residual``): x, u's whole gradient, and that gradient in the compute dtype."""
    u32 = u.float()
    rstd = torch.rsqrt(u32.pow(2).mean(-1, keepdim=True) + eps)
    normed = u32 * rstd
    scaled = grad.float() * weight.float()
    grad_u = skip.float() + rstd * (scaled - normed * (scaled * normed).mean(-1, keepdim=True))
    return weight * normed.to(weight.dtype), grad_u.to(u.dtype), grad_u.to(weight.dtype)


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


def swiglu_with_grad(gate_up: torch.Tensor, grad: torch.Tensor, intermediate: int):
    """SwiGLU's output and the gradient of its input for the output's gradient ``grad``, in one
    pass (fp32 inside): the backward's recomputation and autograd's backward read gate|up twice
    and ran at 40% of the H200's bandwidth."""
    gate, up = gate_up[:, :intermediate].float(), gate_up[:, intermediate:].float()
    sigmoid = torch.sigmoid(gate)
    silu = gate * sigmoid
    g = grad.float()
    grad_gate = g * up * sigmoid * (1 + gate * (1 - sigmoid))
    return (silu * up).to(gate_up.dtype), torch.cat([grad_gate, g * silu], dim=1).to(gate_up.dtype)


@dataclass
class Kernels:
    rms_norm: Callable = rms_norm
    rms_norm_with_grad: Callable = rms_norm_with_grad
    rms_norm_with_grad_onto: Callable = rms_norm_with_grad_onto
    split_rotary: Callable = split_rotary
    swiglu: Callable = swiglu
    swiglu_with_grad: Callable = swiglu_with_grad
    residual_add: Callable = residual_add
    masked_scale: Callable = masked_scale
    masked_accumulate: Callable = masked_accumulate
    cross_entropy_chunk: Callable = cross_entropy_chunk


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
    names = (
        "rms_norm",
        "rms_norm_with_grad",
        "rms_norm_with_grad_onto",
        "split_rotary",
        "swiglu",
        "swiglu_with_grad",
        "residual_add",
        "masked_scale",
        "masked_accumulate",
        "cross_entropy_chunk",
    )
    compiled = {name: torch.compile(globals()[name]) for name in names}
    compiled["swiglu_with_grad"] = _one_pass_where_it_runs(compiled["swiglu_with_grad"])
    return Kernels(**compiled)


def _one_pass_where_it_runs(compiled: Callable) -> Callable:
    """SwiGLU's backward as our one-pass Triton kernel (``swiglu``) where it runs, else ``compiled``."""
    from loratune.training.fused import swiglu

    def swiglu_with_grad(gate_up: torch.Tensor, grad: torch.Tensor, intermediate: int):
        if swiglu.runs(gate_up, grad):
            return swiglu.swiglu_with_grad(gate_up, grad, intermediate)
        return compiled(gate_up, grad, intermediate)

    return swiglu_with_grad
