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
from dataclasses import dataclass

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
    def _block_scale(absmax, code2, absmax2, offset, block, mask, NESTED: tl.constexpr):
        # the fp32 scale of 4-bit block ``block``: double-quantized (an 8-bit code of the block's
        # absmax, scaled by its group of 256 blocks' absmax, plus the offset) or as stored
        if NESTED:
            quantized_scale = tl.load(absmax + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(code2 + quantized_scale, mask=mask, other=0.0) * tl.load(
                absmax2 + block // 256, mask=mask, other=0.0
            )
            scale = scale + tl.load(offset)
        else:
            scale = tl.load(absmax + block, mask=mask, other=0.0)
        return scale

    @triton.jit
    def _store_rows(out, weight, rows, rows_total, row_bytes, stride_out, BLOCK_BYTES: tl.constexpr):
        # a tile's 2 x BLOCK_BYTES outputs a row into ``out``, rows and columns past the end masked
        out_columns = tl.program_id(1) * 2 * BLOCK_BYTES + tl.arange(0, 2 * BLOCK_BYTES)
        stored = (rows[:, None] < rows_total) & (out_columns[None, :] < 2 * row_bytes)
        tl.store(
            out + rows[:, None] * stride_out + out_columns[None, :], weight.to(out.dtype.element_ty), mask=stored
        )

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
        scale = _block_scale(absmax, code2, absmax2, offset, index // (BLOCKSIZE // 2), inside, NESTED)
        high = tl.load(code + (byte >> 4), mask=inside, other=0.0) * scale
        low = tl.load(code + (byte & 15), mask=inside, other=0.0) * scale
        _store_rows(out, tl.interleave(high, low), rows, rows_total, row_bytes, stride_out, BLOCK_BYTES)

    @triton.jit
    def _dequantize_by_block(
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
        # as _dequantize, for rows of whole 4-bit blocks and tiles of whole blocks: each block's
        # scale is read and decoded once (not once an output) and broadcast over its bytes
        HALF: tl.constexpr = BLOCKSIZE // 2
        BLOCKS: tl.constexpr = BLOCK_BYTES // HALF
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        columns = tl.program_id(1) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
        block_columns = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
        row_inside = rows[:, None] < rows_total
        inside = row_inside & (columns[None, :] < row_bytes)
        block_inside = row_inside & (block_columns[None, :] < row_bytes // HALF)
        byte = tl.load(packed + rows[:, None] * row_bytes + columns[None, :], mask=inside, other=0).to(tl.int32)
        block = rows[:, None] * (row_bytes // HALF) + block_columns[None, :]
        scale = _block_scale(absmax, code2, absmax2, offset, block, block_inside, NESTED)
        byte = tl.reshape(byte, (BLOCK_ROWS, BLOCKS, HALF))
        high = tl.load(code + (byte >> 4)) * scale[:, :, None]
        low = tl.load(code + (byte & 15)) * scale[:, :, None]
        weight = tl.reshape(tl.interleave(high, low), (BLOCK_ROWS, 2 * BLOCK_BYTES))
        _store_rows(out, weight, rows, rows_total, row_bytes, stride_out, BLOCK_BYTES)


def dequantize(linear, out: torch.Tensor, tile: Tile | None = None) -> torch.Tensor:
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
    tile = tile or TILE
    row_bytes, half = cols_total // 2, state.blocksize // 2
    by_block = tile.by_block and row_bytes % half == 0 and tile.block_bytes % half == 0
    kernel = _dequantize_by_block if by_block else _dequantize
    grid = (triton.cdiv(rows_total, tile.block_rows), triton.cdiv(row_bytes, tile.block_bytes))
    kernel[grid](
        linear.weight.data,
        absmax,
        code2,
        absmax2,
        offset,
        state.code,
        out,
        rows_total,
        row_bytes,
        out.stride(0),
        BLOCKSIZE=state.blocksize,
        NESTED=bool(state.nested),
        BLOCK_ROWS=tile.block_rows,
        BLOCK_BYTES=tile.block_bytes,
        num_warps=tile.warps,
    )
    return out


@dataclass(frozen=True)
class Tile:
    """A program's share of the weight: ``block_rows`` rows of ``block_bytes`` packed bytes (twice
    as many outputs), ``warps`` warps; ``by_block``: each 4-bit block's scale decoded once, where
    the rows and the tile hold whole blocks."""

    block_rows: int = 16
    block_bytes: int = 128
    warps: int = 4
    by_block: bool = False


# The default tile: bench/nf4_dequant_speed.py --tiles compared 80 tiles on the H200 for the four
# projection shapes of Llama-3-8B (bench/results/nf4_dequant_tiles_h200_2026-12-04_71530be.jsonl):
# 4 rows x 256 bytes, 4 warps, scales decoded once a block, took 182 us of GPU time for one
# layer's seven weights against 243 us for the earlier 16 x 128 tile (3.1 of the H200's 4.8 TB/s).
TILE = Tile(block_rows=4, block_bytes=256, warps=4, by_block=True)
