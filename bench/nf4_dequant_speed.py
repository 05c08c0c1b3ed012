"""Speed of NF4 dequantization on a GPU: bitsandbytes' dequantize_4bit against our Triton kernel
(loratune.training.fused.nf4), for the projection shapes of Llama-3-8B (double-quantized, as the
QLoRA recipe stores them). Prints one JSON line per shape: microseconds a call and the memory
traffic's rate (0.5 byte read + 2 bytes written a weight).

Usage (on the GPU machine, bench/gpu/setup.sh sourced): python3 bench/nf4_dequant_speed.py > out.jsonl
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


def main() -> None:
    import types

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
