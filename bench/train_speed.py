"""Training speed of loratune's trainer against the plain transformers+peft+bitsandbytes loop.

Same run, same GPU, same Llama-3-8B-shaped model with random weights, seq 2048, batch 4, LoRA
r=16 on every linear layer, NF4 4-bit with gradient checkpointing. The baseline is
../shared/bench/hf_qlora_baseline.py (pass its path). Prints one JSON line per measurement:
tokens/s, peak GiB and useful TFLOP/s (4·N FLOP per token for a frozen base).

    python bench/train_speed.py --baseline ../shared/bench/hf_qlora_baseline.py --out bench/results/train_speed.jsonl
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import shutil
import time
from pathlib import Path

import torch


def _load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("hf_qlora_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _emit(record: dict, out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with out.open("a") as handle:
            handle.write(line + "\n")


def measure_loratune(model_dir: str, n_params: int, *, quantization: str, checkpointing: bool, batch: int,
                     seq: int, rank: int, steps: int, warmup: int) -> dict:
    from loratune.training.data import TokenizedExample
    from loratune.training.models import add_lora, load_base_model
    from loratune.training.settings import ALL_LINEAR_LAYERS, LoraHyperparameters, TrainingSettings
    from loratune.training.trainer import Progress, train

    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    generator = torch.Generator().manual_seed(0)
    examples = [
        TokenizedExample(ids, list(ids))
        for ids in torch.randint(0, 128000, (64, seq), generator=generator).tolist()
    ]
    lora = LoraHyperparameters(lora_rank=rank, lora_alpha=2 * rank, learning_rate=2e-4, lora_dropout=0.05)
    model = load_base_model(model_dir, quantization=quantization, dtype=torch.bfloat16, device=device,
                            gradient_checkpointing=checkpointing)
    model = add_lora(model, rank=rank, alpha=2 * rank, dropout=0.05, target_modules=ALL_LINEAR_LAYERS)
    results = {}
    for phase, n_steps in (("warmup", warmup), ("timed", steps)):
        settings = TrainingSettings(quantization=quantization, max_steps=n_steps, batch_size=batch,
                                    max_seq_length=seq, gradient_checkpointing=checkpointing,
                                    warmup_ratio=0.0, scheduler="constant", log_every=1000)
        progress = Progress()
        torch.cuda.synchronize()
        train(model, examples, settings, lora, pad_id=0, device=device, dtype=torch.bfloat16, seed=0,
              progress=progress)
        torch.cuda.synchronize()
        results[phase] = progress
    timed = results["timed"]
    tokens_per_s = timed.train_tokens / timed.train_time
    record = dict(
        trainer="loratune", quant=quantization, grad_ckpt=checkpointing, rank=rank, bs=batch, seqlen=seq,
        tokens_per_s=round(tokens_per_s), useful_4N_tflops=round(4 * n_params * tokens_per_s / 1e12, 1),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
        loss_first=round(results["warmup"].loss_curve[0], 3), loss_last=round(timed.loss_curve[-1], 3),
    )
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="path of hf_qlora_baseline.py")
    parser.add_argument("--root", default="/tmp/anchor_models")
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()

    baseline = _load_baseline(args.baseline)
    path = str(Path(args.root) / args.shape)
    baseline.materialize(args.shape, path)
    n_params = baseline.n_params(args.shape)
    _emit({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "shape": args.shape,
           "n_params_4N": n_params}, args.out)
    started = time.time()
    if not args.skip_baseline:
        record = baseline.run(args.shape, path, True, 16, True, 4, 2048, steps=args.steps, warmup=args.warmup)
        _emit({"trainer": "hf_baseline", **record}, args.out)
    record = measure_loratune(path, n_params, quantization="nf4", checkpointing=True, batch=4, seq=2048,
                              rank=16, steps=args.steps, warmup=args.warmup)
    _emit(record, args.out)
    _emit({"event": "done", "seconds": round(time.time() - started, 1)}, args.out)


if __name__ == "__main__":
    main()
