"""The residual stream's gradient, handed from a residual add to the RMSNorm that reads the same
tensor, so that the backward adds the two gradients of a residual tensor and casts their sum for
the layer below in the norm's one pass.

Each residual tensor h (fp32) has two readers: the next residual add (h + delta) and the RMSNorm
before a projection (q|k|v or gate|up). Left to autograd, the backward adds their two fp32
gradients in a pass of its own, and each residual add casts its output's gradient to bf16 for
delta in another: 2 x 2 passes over tokens x hidden fp32 a layer, about 8 ms a step of the
8B shape (H200 profile in bench/results). Here the residual add hands its output's gradient to
h's ``Stream`` instead of to autograd; the norm's backward takes it, adds it inside its one pass
and writes the sum's bf16 copy beside it into the stream that produced h, where the residual add
above takes it as delta's gradient. The arithmetic is autograd's: the same fp32 sum, the same cast.
"""

from __future__ import annotations

from typing import Callable

import torch


class Stream:
    """A residual tensor's gradient as it is handed over.

    ``fused``: the norm that reads the tensor takes the residual path's gradient (its forward says
    so, before the residual add's forward reads it); ``skip``: that gradient, from the residual add
    to the norm's backward; ``low``: the tensor's whole gradient in the compute dtype, from the
    norm's backward to the residual add that produced the tensor.
    """

    __slots__ = ("fused", "skip", "low")

    def __init__(self) -> None:
        self.fused = False
        self.skip: torch.Tensor | None = None
        self.low: torch.Tensor | None = None

    def take_skip(self) -> torch.Tensor:
        skip, self.skip = self.skip, None
        if skip is None:
            raise RuntimeError("the residual add's gradient was not handed over before the norm's backward")
        return skip

    def take_low(self) -> torch.Tensor | None:
        low, self.low = self.low, None
        return low


class ResidualAdd(torch.autograd.Function):
    """``add(hidden, delta)`` (the fp32 residual stream plus a compute-dtype layer output) whose
    backward hands hidden's gradient to ``into`` where the norm that reads hidden takes it, and
    takes delta's gradient from ``out`` where the norm that reads the result left it."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, delta: torch.Tensor, add: Callable, into: Stream, out: Stream):
        ctx.delta_dtype, ctx.into, ctx.out = delta.dtype, into, out
        ctx.hand_over = into.fused
        return add(hidden, delta)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_delta = ctx.out.take_low()
        if grad_delta is None:  # the result's reader was not a fused norm (the model's last norm)
            grad_delta = grad.to(ctx.delta_dtype)
        grad_hidden = grad
        if ctx.hand_over and ctx.needs_input_grad[0]:
            ctx.into.skip, grad_hidden = grad, None
        return grad_hidden, grad_delta, None, None, None
