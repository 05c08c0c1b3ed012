"""Speed of NF4 dequantization on a GPU: bitsandbytes' dequantize_4bit against our Triton kernel
(loratune.training.fused.nf4), for the projection shapes of Llama-3-8B (double-quantized, as the
QLoRA recipe stores them). Prints one JSON line per shape: microseconds a call and the memory
traffic's rate (0.5 byte read + 2 bytes written a weight).

Usage (on the GPU machine, bench/gpu/setup.sh sourced): python3 bench/nf4_dequant_speed.py > out.jsonl
With ``--tiles``: our kernel's tiles (``nf4.Tile``) against each other, one line per shape and tile,
the GPU's own time per call (20 calls replayed as one CUDA graph: no launch overhead) beside the
time a call takes launched one by one from Python.
"""

from __future__ import annotations

import json

import torch


def timed(function, repeats: int = 50) -> float:
    for _ in range(5):
        function()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / repeats


def graph_timed(function, calls: int = 20, repeats: int = 20) -> float:
    """Microseconds a call of the GPU's own time: ``calls`` calls captured in one CUDA graph."""
    function()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        function()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            function()
    return timed(graph.replay, repeats) / calls


def sweep_tiles() -> None:
    import itertools
    import types

    import bitsandbytes.functional as bnb

    from loratune.training.fused import nf4

    shapes = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
    tiles = [nf4.TILE] + [
        nf4.Tile(rows, block_bytes, warps, by_block)
        for by_block, rows, block_bytes, warps in itertools.product(
            (False, True), (4, 8, 16, 32), (64, 128, 256, 512), (2, 4, 8)
        )
        if rows * block_bytes <= 8192 and rows * block_bytes >= 512
    ]
    for name, (rows, cols) in shapes.items():
        generator = torch.Generator("cuda").manual_seed(rows + cols)
        weight = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16, generator=generator)
        packed, state = bnb.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
        linear = types.SimpleNamespace(weight=types.SimpleNamespace(data=packed, quant_state=state))
        expected = bnb.dequantize_4bit(packed, state)
        out = torch.empty(rows, cols, device="cuda", dtype=torch.bfloat16)
        for tile in tiles:
            nf4.dequantize(linear, out, tile)
            exact = torch.equal(out, expected)
            gpu = graph_timed(lambda: nf4.dequantize(linear, out, tile))
            launched = timed(lambda: nf4.dequantize(linear, out, tile))
            record = dict(shape=name, tile=tile.__dict__, default=tile == nf4.TILE, exact=exact)
            record.update(gpu_us=round(gpu, 2), launched_us=round(launched, 2))
            record["gpu_tb_s"] = round(rows * cols * 2.5 / gpu / 1e6, 2)
            print(json.dumps(record), flush=True)


def main() -> None:
    import sys
    import types

    if "--tiles" in sys.argv:
        sweep_tiles()
        return

    import bitsandbytes.functional as bnb

    from loratune.training.fused import nf4

    shapes = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
    for name, (rows, cols) in shapes.items():
        generator = torch.Generator("cuda").manual_seed(rows + cols)
        weight = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16, generator=generator)
        packed, state = bnb.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
        linear = types.SimpleNamespace(weight=types.SimpleNamespace(data=packed, quant_state=state))
        out = torch.empty(rows, cols, device="cuda", dtype=torch.bfloat16)
        ours = timed(lambda: nf4.dequantize(linear, out))
        theirs = timed(lambda: bnb.dequantize_4bit(packed, state, out=out))
        mismatches = (nf4.dequantize(linear, out.clone()) != bnb.dequantize_4bit(packed, state)).sum().item()
        traffic = rows * cols * 2.5
        print(
            json.dumps(
                {
                    "shape": name,
                    "rows": rows,
                    "cols": cols,
                    "ours_us": round(ours, 1),
                    "bitsandbytes_us": round(theirs, 1),
                    "ours_tb_s": round(traffic / ours / 1e6, 2),
                    "bitsandbytes_tb_s": round(traffic / theirs / 1e6, 2),
                    "values_that_differ": mismatches,
                    "device": torch.cuda.get_device_name(),
                }
            )
        )


if __name__ == "__main__":
    main()
