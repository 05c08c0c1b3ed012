"""NF4 dequantization as one Triton kernel.

bitsandbytes dequantizes a double-quantized NF4 weight in two kernels (the block scales, then the
weight) at about 40% of the H200's memory bandwidth (profile in bench/results). This kernel reads
the packed weight and the quantized scales once and writes the dense weight, bit for bit as
bitsandbytes does, into any buffer whose rows are contiguous: a slice of a wider buffer too, so
that a projection's LoRA up-weight can sit beside its frozen weight (``lora_linear``).

The layout is bitsandbytes' own: the weight flattened row-major, two 4-bit codes a byte (the first
in the high nibble), one absmax per block of ``blocksize`` values; with nested statistics the
absmaxes are 8-bit codes of a 256-value map, one fp32 scale per 256 of them, plus an offset.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds (and this module's callers there) go without
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None


def available(device: torch.device) -> bool:
    """Whether the kernel can run on ``device``: Triton importable and a CUDA device, or any
    device under Triton's interpreter (``TRITON_INTERPRET=1``: slow, for tests on a CPU)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def supports(linear) -> bool:
    """Whether ``linear``'s 4-bit weight is in the layout this kernel reads (NF4, bitsandbytes)."""
    state = getattr(linear.weight, "quant_state", None)
    if state is None or getattr(state, "quant_type", None) != "nf4":
        return False
    if state.nested and state.state2.blocksize != 256:
        return False
    return state.shape[0] * state.shape[1] % 2 == 0


if triton is not None:

    @triton.jit
    def _dequantize(
        packed,
        absmax,
        code2,
        absmax2,
        offset,
        code,
        out,
        rows_total,
        cols_total,
        stride_out,
        BLOCKSIZE: tl.constexpr,
        NESTED: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_COLS: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        inside = (rows[:, None] < rows_total) & (cols[None, :] < cols_total)
        flat = rows[:, None].to(tl.int64) * cols_total + cols[None, :]
        byte = tl.load(packed + flat // 2, mask=inside, other=0).to(tl.int32)
        nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
        value = tl.load(code + nibble, mask=inside, other=0.0)
        block = flat // BLOCKSIZE
        if NESTED:
            quantized_scale = tl.load(absmax + block, mask=inside, other=0).to(tl.int32)
            scale = tl.load(code2 + quantized_scale, mask=inside, other=0.0) * tl.load(
                absmax2 + block // 256, mask=inside, other=0.0
            )
            scale = scale + offset
        else:
            scale = tl.load(absmax + block, mask=inside, other=0.0)
        weight = value * scale
        tl.store(out + rows[:, None] * stride_out + cols[None, :], weight.to(out.dtype.element_ty), mask=inside)


def dequantize(linear, out: torch.Tensor) -> torch.Tensor:
    """``out`` (rows x in_features, each row contiguous; its row stride may be larger, as in a
    slice of a wider buffer) := the dense NF4 weight of ``linear``."""
    state = linear.weight.quant_state
    rows_total, cols_total = state.shape
    if out.shape != (rows_total, cols_total) or out.stride(1) != 1:
        raise ValueError(f"out must be a {rows_total}x{cols_total} buffer with contiguous rows, got {tuple(out.shape)}")
    if state.nested:
        absmax, code2, absmax2, offset = state.absmax, state.state2.code, state.state2.absmax, float(state.offset)
    else:
        absmax, code2, absmax2, offset = state.absmax, state.code, state.absmax, 0.0
    grid = (triton.cdiv(rows_total, 32), triton.cdiv(cols_total, 128))
    _dequantize[grid](
        linear.weight.data,
        absmax,
        code2,
        absmax2,
        offset,
        state.code,
        out,
        rows_total,
        cols_total,
        out.stride(0),
        BLOCKSIZE=state.blocksize,
        NESTED=bool(state.nested),
        BLOCK_ROWS=32,
        BLOCK_COLS=128,
        num_warps=4,
    )
    return out
