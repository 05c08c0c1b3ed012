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
    # whole bytes per row, whole 4-bit blocks per byte pair; an int32 index
    return state.shape[1] % 2 == 0 and state.blocksize % 2 == 0 and state.shape[0] * state.shape[1] < 2**31


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
        row_bytes,
        stride_out,
        BLOCKSIZE: tl.constexpr,
        NESTED: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_BYTES: tl.constexpr,
    ):
        # a tile of BLOCK_ROWS x BLOCK_BYTES packed bytes: each byte two outputs, high nibble first
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        columns = tl.program_id(1) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
        inside = (rows[:, None] < rows_total) & (columns[None, :] < row_bytes)
        index = rows[:, None] * row_bytes + columns[None, :]
        byte = tl.load(packed + index, mask=inside, other=0).to(tl.int32)
        block = index // (BLOCKSIZE // 2)
        if NESTED:
            quantized_scale = tl.load(absmax + block, mask=inside, other=0).to(tl.int32)
            scale = tl.load(code2 + quantized_scale, mask=inside, other=0.0) * tl.load(
                absmax2 + block // 256, mask=inside, other=0.0
            )
            scale = scale + tl.load(offset)
        else:
            scale = tl.load(absmax + block, mask=inside, other=0.0)
        high = tl.load(code + (byte >> 4), mask=inside, other=0.0) * scale
        low = tl.load(code + (byte & 15), mask=inside, other=0.0) * scale
        weight = tl.interleave(high, low)
        out_columns = tl.program_id(1) * 2 * BLOCK_BYTES + tl.arange(0, 2 * BLOCK_BYTES)
        stored = (rows[:, None] < rows_total) & (out_columns[None, :] < 2 * row_bytes)
        tl.store(
            out + rows[:, None] * stride_out + out_columns[None, :], weight.to(out.dtype.element_ty), mask=stored
        )


def dequantize(linear, out: torch.Tensor) -> torch.Tensor:
    """``out`` (rows x in_features, each row contiguous; its row stride may be larger, as in a
    slice of a wider buffer) := the dense NF4 weight of ``linear``. No host synchronization
    (the nested scales' offset stays on the device): the host keeps running ahead."""
    state = linear.weight.quant_state
    rows_total, cols_total = state.shape
    if out.shape != (rows_total, cols_total) or out.stride(1) != 1:
        raise ValueError(f"out must be a {rows_total}x{cols_total} buffer with contiguous rows, got {tuple(out.shape)}")
    if state.nested:
        absmax, code2, absmax2, offset = state.absmax, state.state2.code, state.state2.absmax, state.offset
    else:
        absmax, code2, absmax2, offset = state.absmax, state.code, state.absmax, state.absmax
    grid = (triton.cdiv(rows_total, BLOCK_ROWS), triton.cdiv(cols_total // 2, BLOCK_BYTES))
    _dequantize[grid](
        linear.weight.data,
        absmax,
        code2,
        absmax2,
        offset,
        state.code,
        out,
        rows_total,
        cols_total // 2,
        out.stride(0),
        BLOCKSIZE=state.blocksize,
        NESTED=bool(state.nested),
        BLOCK_ROWS=BLOCK_ROWS,
        BLOCK_BYTES=BLOCK_BYTES,
        num_warps=4,
    )
    return out


BLOCK_ROWS, BLOCK_BYTES = 16, 128  # a program's tile: 16 rows of 256 outputs
