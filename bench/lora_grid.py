"""Measure a grid of real LoRA trials (rank x alpha x learning rate) for the `lora_table` benchmark.

Each grid point is one real QLoRA trial of loratune's trainer: by default SmolLM2-135M-Instruct
(NF4; `--model` names another, e.g. builtin:gemma3-270m) on the 175 self-instruct seed tasks, with
held-out eval loss. The table lets searches over a real LoRA response surface cost nothing
(benchmark problem `lora_table`, nearest grid point).

    python bench/lora_grid.py --data ../shared/data/self_instruct_seed_tasks.jsonl --out bench/data/lora_grid.tsv

Rows are appended as trials finish, so a run cut short keeps what it measured; a rerun skips
grid points already in the table.

With an output file ending in ``.jsonl`` it writes a *learning-curve table* instead (the `table`
benchmark problem's format): one row per (trial, evaluation step) with the trial's parameters,
`seed`, `step`, `max_steps`, `eval_loss`, `train_loss` (mean so far), `train_time` (training seconds
so far), `trainable_params`, `peak_memory_gib` and `status` (`ok`, or `diverged` on the row where
the loss went non-finite). `--eval-every` sets how often a trial evaluates its held-out loss.

    python bench/lora_grid.py --data builtin:instructions --out bench/data/curves_instructions.jsonl \
        --ranks 4,16,64,256 --alphas 4,16,64,256 --lrs 1e-5,3e-5,1e-4,3e-4,1e-3,3e-3,1e-2 --eval-every 10

A run stopped by SIGTERM (``timeout``) ends its trials in flight and keeps the rows of those finished.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

RANKS = (4, 16, 64, 256)
ALPHAS = (4, 16, 64, 256)
LEARNING_RATES = (1e-5, 1e-4, 1e-3, 1e-2)
COLUMNS = (
    "lora_rank",
    "lora_alpha",
    "learning_rate",
    "status",
    "eval_loss",
    "train_loss",
    "final_train_loss",
    "train_time",
    "tokens_per_second",
    "peak_memory_gib",
    "trainable_params",
    "gpu_name",
)


CURVE_COLUMNS = ("step", "max_steps", "eval_loss", "train_loss", "train_time")


def curve_rows(hparams: dict, seed: int, metrics: dict) -> list[dict]:
    """A trial's learning curve as table rows; a diverged trial ends with a `diverged` row."""
    common = {
        **{k: hparams[k] for k in ("lora_rank", "lora_alpha", "learning_rate")},
        "seed": seed,
        "max_steps": metrics.get("max_steps"),
        "trainable_params": metrics.get("trainable_params"),
        "peak_memory_gib": metrics.get("peak_memory_gib"),
        "gpu_name": metrics.get("gpu_name"),
    }
    rows = [
        {**common, **{k: point.get(k) for k in CURVE_COLUMNS if k != "max_steps"}, "status": "ok"}
        for point in metrics.get("curve") or []
    ]
    if metrics.get("status") != "ok":
        error = metrics.get("error") or ""
        status = "diverged" if error.startswith("LossDiverged") else "failed"
        rows.append(
            {
                **common,
                "step": metrics.get("steps"),
                "eval_loss": None,
                "train_loss": None,
                "train_time": metrics.get("train_time"),
                "status": status,
                "error": error,
            }
        )
    return rows


_BASE_MODELS = None  # a worker process's loaded base model, kept between its trials


def _worker(args) -> list[dict]:
    global _BASE_MODELS
    points, model_path, data_dir, settings, out_root, seed, curves = args
    from loratune.training import TrainingSettings, run_trial
    from loratune.training.models import BaseModels

    # Loading and quantizing the base model once per worker, not once per trial, as the study's
    # trial worker does (loratune.training.worker): every trial still gets fresh adapters.
    _BASE_MODELS = _BASE_MODELS or BaseModels()
    rows = []
    for rank, alpha, lr in points:
        hparams = {"lora_rank": rank, "lora_alpha": alpha, "learning_rate": lr, "lora_dropout": 0.05}
        metrics = run_trial(
            hparams=hparams,
            settings=TrainingSettings(**settings),
            model_path=model_path,
            data_dir=data_dir,
            output_dir=str(Path(out_root) / f"r{rank}_a{alpha}_lr{lr:g}_{time.time_ns()}"),
            seed=seed,
            base_models=_BASE_MODELS,
        )
        if curves:
            trial_rows = curve_rows(hparams, seed, metrics)
        else:
            trial_rows = [{**hparams, **{c: metrics.get(c) for c in COLUMNS if c not in hparams}}]
        for row in trial_rows:
            print(json.dumps(row), flush=True)
        rows.extend(trial_rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="self-instruct seed tasks (JSONL), or builtin:instructions")
    parser.add_argument("--out", required=True, help="TSV to append rows to")
    parser.add_argument("--model", default="builtin:smollm2-135m", help="model.name of the trials' base model")
    parser.add_argument(
        "--gradient-checkpointing",
        default="auto",
        choices=("auto", "on", "off"),
        help="training.gradient_checkpointing (off: faster where memory allows, same losses)",
    )
    parser.add_argument("--workers", type=int, default=2, help="trials training at once on the GPU")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--scratch", default="/tmp/lora_grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations (curves)")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)), help="comma-separated (default: the grid's)")
    parser.add_argument("--alphas", default=",".join(map(str, ALPHAS)))
    parser.add_argument("--lrs", default=",".join(map(str, LEARNING_RATES)))
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each point (with --workers 1: how much train_time varies)"
    )
    args = parser.parse_args()
    grid = list(
        itertools.product(
            [int(v) for v in args.ranks.split(",")],
            [int(v) for v in args.alphas.split(",")],
            [float(v) for v in args.lrs.split(",")],
        )
    )

    from loratune.training import DatasetSpec, ModelSpec, prepare_dataset, prepare_model

    scratch = Path(args.scratch)
    model_path = prepare_model(ModelSpec(name=args.model), cache_dir=str(scratch / "models"))
    data_dir = scratch / "data"
    data_format = "auto" if args.data.startswith("builtin:") else "self_instruct"
    prepare_dataset(DatasetSpec(path=args.data, format=data_format, eval_fraction=0.15), out_dir=data_dir)
    settings = dict(
        quantization="nf4",
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        max_seq_length=args.seq,
        scheduler="cosine",
        warmup_ratio=0.05,
        keep_adapter=False,
        gradient_checkpointing={"auto": "auto", "on": True, "off": False}[args.gradient_checkpointing],
    )
    out = Path(args.out)
    curves = out.suffix == ".jsonl"
    if curves:
        settings.update(eval_every=args.eval_every, select="best")

    done: dict[tuple, int] = {}
    if curves and out.exists():
        finished = {}
        for line in out.read_text().splitlines():
            row = json.loads(line)
            finished[(row["lora_rank"], row["lora_alpha"], row["learning_rate"], row["seed"])] = 1
        for rank, alpha, lr, seed in finished:
            if seed == args.seed:
                done[(rank, alpha, lr)] = done.get((rank, alpha, lr), 0) + 1
    elif out.exists():
        for line in out.read_text().splitlines()[1:]:
            rank, alpha, lr = line.split("\t")[:3]
            key = (int(rank), int(alpha), float(lr))
            done[key] = done.get(key, 0) + 1
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("" if curves else "\t".join(COLUMNS) + "\n")
    # Repeats interleave (every point once, then again), so a cut-short run still covers the grid.
    todo = [p for repeat in range(args.repeats) for p in grid if done.get(p, 0) <= repeat]
    print(json.dumps({"grid": len(todo), "already": sum(done.values()), "settings": settings}), flush=True)
    started = time.time()
    # timeout's SIGTERM would end this process alone, leaving the pool's workers training: exit
    # through the pool's context manager instead, which terminates them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    chunks = [todo[i :: args.workers] for i in range(args.workers)]
    # One point per task keeps the table growing row by row across workers.
    tasks = [
        ([p], str(model_path), str(data_dir), settings, str(scratch / "trials"), args.seed, curves)
        for chunk in chunks
        for p in chunk
    ]
    with mp.get_context("spawn").Pool(args.workers) as pool, out.open("a") as table:
        for rows in pool.imap_unordered(_worker, tasks):
            for row in rows:
                if curves:
                    table.write(json.dumps(row) + "\n")
                else:
                    table.write("\t".join("" if row[c] is None else str(row[c]) for c in COLUMNS) + "\n")
                table.flush()
    print(json.dumps({"finished": len(todo), "seconds": round(time.time() - started, 1)}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
