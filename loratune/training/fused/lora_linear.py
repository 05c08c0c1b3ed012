"""A frozen (NF4 or plain) linear layer with its LoRA branch as one autograd function, and the
fused projection groups (q|k|v, o, gate|up, down) built from peft layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F

from loratune.training.fused import nf4
from loratune.training.fused.support import lora_parts

if TYPE_CHECKING:
    from loratune.training.fused.kernels import Kernels
    from loratune.training.fused.residual import Stream


BACKWARD_CHUNK_BYTES = 2**26  # a chunk of the prologue's input in the backward pass, at most, when chunked


def is_4bit(linear) -> bool:
    return getattr(linear.weight, "quant_state", None) is not None


class FrozenWeights:
    """The dense weight of a group of frozen linear layers stacked along the output dimension.

    NF4 weights are dequantized on every use (into one buffer on CUDA), or once when cached.
    """

    def __init__(self, linears: Sequence[torch.nn.Linear], dtype: torch.dtype):
        self.linears = list(linears)
        self.dtype = dtype
        self.quantized = any(is_4bit(linear) for linear in self.linears)
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
        # our NF4 kernel (one pass, into a buffer of any width) where it runs, else bitsandbytes'
        self.kernel = self.quantized and nf4.available(self.device) and all(nf4.supports(li) for li in self.linears)
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
    def _dense(self, beside: torch.Tensor | None = None, width: int = 0) -> torch.Tensor:
        """The dense weight stack; with ``beside`` (a row per output), [W | beside | zeros] of
        ``width`` columns."""
        if beside is not None and not self.kernel:
            return _side_by_side(self._dense(), beside, width)
        if self._dequantizes_into_buffers:
            columns = width if beside is not None else self.in_features
            out = torch.empty(sum(self.sizes), columns, dtype=self.dtype, device=self.device)
            self._fill_rows(out[:, : self.in_features])
            if beside is not None:
                _place_beside(out, self.in_features, beside)
            return out
        if len(self.linears) == 1 and not self.quantized:
            weight = self.linears[0].weight
            return weight if weight.dtype == self.dtype else weight.to(self.dtype)
        parts = [self._dequantize(linear) for linear in self.linears]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _dequantize(self, linear, out: torch.Tensor | None = None) -> torch.Tensor:
        if not is_4bit(linear):
            weight = linear.weight.detach().to(self.dtype)
            if out is not None:
                out.copy_(weight)
                return out
            return weight
        import bitsandbytes.functional as bnbf

        weight = bnbf.dequantize_4bit(linear.weight.data, linear.weight.quant_state, out=out)
        return weight if weight.dtype == self.dtype else weight.to(self.dtype)

    def get(self) -> torch.Tensor:
        if self.cache is None:
            return self._dense()
        rows = sum(self.sizes)
        if self.cache.shape[0] > rows:  # a cache with room below
            return self.cache[:rows]
        return self.cache if self.cache.shape[1] == self.in_features else self.cache[:, : self.in_features]

    def stacked(self, a: torch.Tensor, height: int) -> torch.Tensor:
        """[W ; a ; zeros] (``height`` rows): the frozen weight with a LoRA down-weight under it."""
        rows = sum(self.sizes)
        if self.cache is not None and self.cache.shape[0] == height:  # the cache has room: a goes in place
            out = self.cache
        else:
            out = torch.empty(height, self.in_features, dtype=self.dtype, device=self.device)
            self._fill_rows(out[:rows])
        out[rows : rows + a.shape[0]] = a
        out[rows + a.shape[0] :] = 0
        return out

    @property
    def _dequantizes_into_buffers(self) -> bool:
        """Our kernel (into rows of any stride) or, on CUDA, bitsandbytes' (into contiguous rows)."""
        return self.kernel or (self.quantized and self.device.type == "cuda")

    @torch.no_grad()
    def _fill_rows(self, out: torch.Tensor) -> None:
        """``out`` (the weight's shape, rows contiguous; with our kernel, any row stride) := the
        dense weight stack, dequantized linear by linear into its rows."""
        if self.cache is not None or not self._dequantizes_into_buffers:
            out.copy_(self.get())
            return
        row = 0
        for linear, size in zip(self.linears, self.sizes):
            if self.kernel:
                nf4.dequantize(linear, out[row : row + size])
            else:
                self._dequantize(linear, out=out[row : row + size])
            row += size

    def joined(self, b: torch.Tensor, width: int) -> torch.Tensor:
        """[W | b | zeros] (``width`` columns): the frozen weight with a LoRA up-weight beside it."""
        if self.cache is not None and self.cache.shape[1] == width:  # the cache has room: b goes in place
            _place_beside(self.cache, self.in_features, b)
            return self.cache
        if self.cache is not None:
            return _side_by_side(self.cache, b, width)
        return self._dense(b, width)

    @property
    def join_is_free(self) -> bool:
        """Whether the LoRA up-weight can sit beside the frozen weight at no cost: our kernel
        dequantizes on every use into a buffer of any width, and a cache made with room keeps it."""
        if self.cache is None:
            return self.kernel
        return self.cache.shape[1] > self.in_features

    def keep_dequantized(self, keep: bool, room: int | None = None, room_below: int | None = None) -> None:
        """Keep the NF4 weights dequantized (or not); with ``room`` (a joined width, as
        ``joined`` takes), the cache is [W | zeros] of that width, the LoRA up-weight written
        beside W at each use, so that a cached projection joins as an uncached one does; with
        ``room_below`` (a height, as ``stacked`` takes), [W ; zeros], the down-weight written under W."""
        if self.stacked_plain:
            return
        self.cache = None  # (a previous plan's cache goes first)
        if not (keep and self.quantized):
            return
        if room is not None:
            self.cache = self._dense(torch.empty(sum(self.sizes), 0, dtype=self.dtype, device=self.device), room)
        elif room_below is not None:
            cache = torch.zeros(room_below, self.in_features, dtype=self.dtype, device=self.device)
            self._fill_rows(cache[: sum(self.sizes)])
            self.cache = cache
        else:
            self.cache = self._dense()


def _side_by_side(left: torch.Tensor, beside: torch.Tensor, width: int) -> torch.Tensor:
    """[left | beside | zeros] of ``width`` columns, as a new tensor of ``left``'s dtype."""
    out = torch.empty(left.shape[0], width, dtype=left.dtype, device=left.device)
    out[:, : left.shape[1]] = left
    _place_beside(out, left.shape[1], beside)
    return out


def _place_beside(out: torch.Tensor, start: int, beside: torch.Tensor) -> None:
    """Columns ``start`` on of ``out`` := [beside | zeros]."""
    end = start + beside.shape[1]
    out[:, start:end] = beside
    if out.shape[1] > end:
        out[:, end:] = 0


def joined_width(in_features: int, rank: int) -> int:
    """The columns of [x | z] and [W | B]: rows of 16-byte multiples keep cuBLAS on its fast kernels."""
    return -(-(in_features + rank) // 8) * 8


class FrozenLinearLora(torch.autograd.Function):
    """y = x W^T (+ b) + (dropout(x) A^T) B^T with x = prologue(u), for a frozen W.

    The prologue (the RMSNorm before q/k/v and gate/up, the SwiGLU before down) is cheap
    elementwise work: the function saves its input u and the dropout mask, and recomputes x and
    dropout(x) in the backward pass rather than keeping them (28% less activation memory per
    layer, so fewer layers need checkpointing). It never saves a dequantized weight; the input
    gradient takes the LoRA branch's share through the mask in one pass.

    With ``join``, the forward is one matmul [x | z] [W | B]^T (z = dropout(x) A^T): our NF4
    kernel dequantizes W into a buffer with room for B, and the rank-r pass over the output
    (``y += z B^T``, 2 x tokens x out_features of memory traffic) goes away for the price of a
    copy of x. Folding B A into W instead would round small LoRA updates away in bf16.
    """

    @staticmethod
    def forward(
        ctx,
        u,
        lora_a,
        lora_b,
        weights: FrozenWeights,
        dropout: float,
        kernels: Kernels,
        prologue: Callable | None,
        chunk_bytes: int | None = None,
        output: bool = True,
        join: bool = False,
        stack: bool = False,
    ):
        x = prologue(u) if prologue is not None else u
        ctx.weights, ctx.kernels, ctx.prologue, ctx.chunk_bytes = weights, kernels, prologue, chunk_bytes
        stream = getattr(prologue, "stream", None)
        if stream is not None:  # said before the residual add that also reads u runs its forward
            stream.fused = bool(ctx.needs_input_grad[0]) and not chunk_bytes
        ctx.has_lora = lora_a is not None
        ctx.dropout = dropout
        ctx.joined_width = None  # joined: the backward's input gradient takes z's gradient beside it
        mask = z = a = b = None
        if ctx.has_lora:
            x_dropped = x
            if dropout > 0:
                x_dropped, mask = torch.native_dropout(x, dropout, True)
            a = lora_a.to(x.dtype)
            b = lora_b.to(x.dtype)
            z = x_dropped @ a.t()
            ctx.lora_dtypes = (lora_a.dtype, lora_b.dtype)
        # the backward's input gradient as one matmul [grad_y | grad_z] [W ; A]: only without a mask
        ctx.stack = stack and ctx.has_lora and mask is None
        if not output:  # a recomputation for the backward: only what is saved counts, y is a placeholder
            y = x.new_zeros(()).expand(x.shape[0], sum(weights.sizes))
        elif join and ctx.has_lora:  # [x | z] [W | B]^T: the LoRA up-projection inside the one matmul
            width = ctx.joined_width = joined_width(x.shape[1], z.shape[1])
            joined = _side_by_side(x, z, width)
            y = F.linear(joined, weights.joined(b, width), weights.bias)
            del joined
        else:
            y = F.linear(x, weights.get(), weights.bias)
            if ctx.has_lora:
                y.addmm_(z, b.t())
        ctx.save_for_backward(u, z, a, b, mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        grad_y = grad_y.contiguous()
        u, z, a, b, mask = ctx.saved_tensors
        needs_input = ctx.needs_input_grad[0]
        scale = 1.0 / (1.0 - ctx.dropout) if mask is not None else 1.0
        grad_z = grad_a = grad_b = grad_u = None
        joined = needs_input and ctx.joined_width is not None
        if ctx.has_lora:
            if not joined:  # (joined: grad_y [W | B] gives the input's and z's gradients in one matmul)
                grad_z = grad_y @ b  # (T, r)
            grad_b = (grad_y.t() @ z).to(ctx.lora_dtypes[1])
        weight = None
        if needs_input and not ctx.stack:  # (stacked: the weight comes under A, in _input_gradient)
            weight = ctx.weights.joined(b, ctx.joined_width) if joined else ctx.weights.get()
        # With ``chunk_bytes`` (the memory plan's), the prologue's recomputation and its gradient go
        # through the tokens in equal chunks: the down projection's SwiGLU output and its gradient
        # are then a chunk's, not 2 x 224 MiB (8B shape, 8,192 tokens).
        rows = u.shape[0]
        if ctx.prologue is not None and ctx.chunk_bytes:
            pieces = -(-u.numel() * u.element_size() // ctx.chunk_bytes)
            rows = -(-u.shape[0] // pieces)
        if rows < u.shape[0] and needs_input:
            grad_u = torch.empty_like(u)
        for start in range(0, u.shape[0], rows):
            part = slice(start, start + rows)
            grad_u_part, grad_a_part = _backward_rows(
                ctx,
                u[part],
                grad_y[part],
                grad_z[part] if grad_z is not None else None,
                mask[part] if mask is not None else None,
                weight,
                a,
                scale,
                needs_input,
            )
            if grad_a_part is not None:
                grad_a = grad_a_part.float() if grad_a is None else grad_a.add_(grad_a_part)
            if grad_u is None:
                grad_u = grad_u_part
            elif grad_u_part is not None:
                grad_u[part] = grad_u_part
        if grad_a is not None:
            grad_a = grad_a.to(ctx.lora_dtypes[0])
        return grad_u, grad_a, grad_b, None, None, None, None, None, None, None, None


def _backward_rows(ctx, u, grad_y, grad_z, mask, weight, a, scale: float, needs_input: bool):
    """The input gradient (or None) and lora_a's gradient (or None) of some rows (tokens).
    ``grad_z`` None with LoRA: ``weight`` is [W | B | zeros], which gives it beside the input's."""
    with_grad = getattr(ctx.prologue, "with_grad", None)
    if with_grad is not None and needs_input:  # the prologue and its gradient in one pass over u
        grad_x, grad_z = _input_gradient(ctx, grad_y, grad_z, mask, weight, a, scale)
        x, grad_u = with_grad(u, grad_x)
        grad_a = None
        if ctx.has_lora:
            grad_a = grad_z.t() @ (x if mask is None else ctx.kernels.masked_scale(x, mask, scale))
        return grad_u, grad_a
    if ctx.prologue is None:
        x = u
    else:
        with torch.set_grad_enabled(needs_input):
            u = u.detach().requires_grad_(needs_input)
            x = ctx.prologue(u)
    grad_u = grad_x = None
    if needs_input:
        grad_x, grad_z = _input_gradient(ctx, grad_y, grad_z, mask, weight, a, scale)
    grad_a = None
    if ctx.has_lora:
        x_dropped = x.detach() if mask is None else ctx.kernels.masked_scale(x.detach(), mask, scale)
        grad_a = grad_z.t() @ x_dropped
        del x_dropped
    if needs_input:
        grad_u = grad_x if ctx.prologue is None else torch.autograd.grad(x, u, grad_x)[0]
    return grad_u, grad_a


def _input_gradient(ctx, grad_y, grad_z, mask, weight, a, scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradient of the projection's input x (the frozen weight's share and the LoRA branch's,
    through the dropout mask, in one tensor) and z's gradient: given, or (``grad_z`` None with
    LoRA) the columns beside the input's of grad_y [W | B | zeros]."""
    if ctx.has_lora and grad_z is None:
        both = grad_y @ weight
        in_features = a.shape[1]
        grad_x, grad_z = both[:, :in_features], both[:, in_features : in_features + a.shape[0]]
    elif ctx.stack:  # the LoRA share inside the one matmul
        height = joined_width(grad_y.shape[1], a.shape[0])
        return _side_by_side(grad_y, grad_z, height) @ ctx.weights.stacked(a, height), grad_z
    else:
        grad_x = grad_y @ weight
    if ctx.has_lora:
        if mask is None:
            grad_x.addmm_(grad_z, a)
        else:
            grad_x = ctx.kernels.masked_accumulate(grad_x, grad_z @ a, mask, scale)
    return grad_x, grad_z


@dataclass(frozen=True)
class Prologue:
    """Elementwise work before a projection: ``forward(u)`` is its input x; ``with_grad(u,
    grad_x)``, where given, returns x and the gradient of u in one pass (else autograd's).
    ``stream``: u is a residual tensor whose residual-path gradient ``with_grad`` can take from
    that ``residual.Stream`` (where the projection's backward runs over all tokens at once)."""

    forward: Callable
    with_grad: Callable | None = None
    stream: Stream | None = None

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return self.forward(u)


@dataclass
class Group:
    """One fused projection: a frozen weight stack and the LoRA weights of its members."""

    weights: FrozenWeights
    lora_a: list[torch.Tensor | None]
    lora_b: list[torch.Tensor | None]
    scales: list[float]
    dropout: float
    backward_chunk_bytes: int | None = None  # the memory plan's: chunk the backward's recomputation
    join_lora: bool | None = None  # the LoRA up-projection inside the frozen matmul; None: where it pays

    def __call__(
        self,
        u: torch.Tensor,
        training: bool,
        kernels: Kernels,
        prologue: Callable | None = None,
        output: bool = True,
    ) -> torch.Tensor:
        """The projection of ``prologue(u)`` (or of ``u``); with ``output`` False (a checkpointed
        layer's recomputation, which needs only what the projection saves) the frozen matmul is
        skipped and the result is a placeholder of the right shape."""
        chunk = self.backward_chunk_bytes
        if all(a is None for a in self.lora_a):
            return FrozenLinearLora.apply(u, None, None, self.weights, 0.0, kernels, prologue, None, output)
        a, b = self._stacked()
        dropout = self.dropout if training else 0.0
        join = self.join_pays if self.join_lora is None else self.join_lora
        stack = self.stack_pays and not join
        return FrozenLinearLora.apply(u, a, b, self.weights, dropout, kernels, prologue, chunk, output, join, stack)

    def keep_dequantized(self, keep: bool) -> None:
        """The frozen weights dequantized between uses (or not): with room for the LoRA
        up-weight where this group joins it to the frozen matmul."""
        room = room_below = None
        ranks = sum(a.shape[0] for a in self.lora_a if a is not None)
        if keep and ranks and self.join_lora is not False and self.weights.kernel and self._joins_by_shape:
            room = joined_width(self.weights.in_features, ranks)
        elif keep and ranks and self.stack_pays:
            room_below = joined_width(sum(self.weights.sizes), ranks)
        self.weights.keep_dequantized(keep, room, room_below)

    @property
    def _joins_by_shape(self) -> bool:
        return sum(self.weights.sizes) > self.weights.in_features

    @property
    def stack_pays(self) -> bool:
        """The backward's input gradient as one matmul [grad_y | grad_z] [W ; A] (no dropout: with
        a mask the LoRA share is masked apart): it copies grad_y (tokens x out_features) into a
        wider buffer and saves the rank-r pass over the input gradient (tokens x in_features), so it
        pays where the input is the wider side (the down projection), with our NF4 kernel (memory
        passes are what the GPU waits on)."""
        if self.join_lora is not None or self.dropout > 0 or all(a is None for a in self.lora_a):
            return False
        return self.weights.kernel and self.weights.in_features > sum(self.weights.sizes)

    @property
    def join_pays(self) -> bool:
        """Joining copies the input (tokens x in_features) into a wider buffer and saves the
        rank-r pass over the output (tokens x out_features): it pays for q|k|v and gate|up."""
        return self.weights.join_is_free and self._joins_by_shape

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


def make_group(layer_part, names: Sequence[str], dtype: torch.dtype) -> Group:
    parts = [lora_parts(getattr(layer_part, name)) for name in names]
    dropouts = {p for _, a, _, _, p in parts if a is not None}
    if len(dropouts) > 1:
        raise ValueError(f"LoRA dropout differs within {names}: {sorted(dropouts)}")
    return Group(
        weights=FrozenWeights([base for base, *_ in parts], dtype),
        lora_a=[a for _, a, _, _, _ in parts],
        lora_b=[b for _, _, b, _, _ in parts],
        scales=[s or 0.0 for _, _, _, s, _ in parts],
        dropout=dropouts.pop() if dropouts else 0.0,
    )
