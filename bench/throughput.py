"""Study throughput on one GPU: trials per hour with and without GPU sharing and trial workers.

Each trial runs as a trial *job* does in the workflow: its own process calling
``loratune.trial.run_trial_job`` (claim a GPU slot, train, write metrics.json), started by a
small local scheduler that keeps ``concurrency`` jobs running, as Snakemake's local executor would
(Snakemake itself is not on the GPU machine, so its own start-up per job, ~1-2 s, is not counted).
The study is real: SmolLM2-135M-Instruct QLoRA on the self-instruct seed tasks
(bench/configs/gpu_smollm2.yaml's settings), its trials the points of a Latin-hypercube pilot.

Four modes, the same kind of trials:

  job      one trial per job, each job alone on the GPU (trials_per_gpu 1, trial_worker false):
           what loratune did before
  process  trials_per_gpu 1, trial_worker true: one worker process trains the trials one after
           another, keeping the base model loaded (per-process amortization only)
  pack     trials_per_gpu auto, trial_worker false: several jobs share the GPU (packing only)
  both     trials_per_gpu auto, trial_worker true (the default, ``auto``, on a local GPU)

trials/hour is measured as trials / wall time of the mode (first job start to last job end), so
the worker modes include each worker's start-up once; with few trials per worker that understates
them against a long study, so the summary also gives the steady state: slots x 3600 / the median
job time of the trials a worker trained after its first (stated as an extrapolation).

The shapes check (``--shapes``: llama3-1b, llama3-8b, random weights, the shapes of
bench/train_speed.py) asks ``auto`` what it packs for each shape on this GPU (it must keep one
trial per GPU) and times ``job`` against ``both`` for the shapes in ``--run-shapes`` over a few
trials and steps: the worker must not cost throughput either. ``both`` runs as many jobs at once as
``auto`` gives slots, as the local profile's ``gpu_share`` lets Snakemake do. ``--only-shapes``
measures just that (no SmolLM2 modes, no warm-up job; both shapes timed, 2 trials of 5 steps).

    # H200 (~7 min):
    source bench/gpu/setup.sh && python bench/throughput.py --data /tmp/keep/self_instruct_seed_tasks.jsonl \\
        --out $OUT/throughput
    # H200, the shapes alone (``--only-shapes``: both shapes timed, 2 trials of 5 steps per mode; < 300 s):
    source bench/gpu/setup.sh && python bench/throughput.py --only-shapes \\
        --data /tmp/keep/self_instruct_seed_tasks.jsonl --out $OUT/throughput_shapes
    # CPU, tiny (two fake GPU slots on the CPU, the tests' tiny random Llama, 2 steps):
    .venv/bin/python bench/throughput.py --tiny --out /tmp/throughput-tiny
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.shapes import config_kwargs  # noqa: E402

MODES = {
    "job": {"trials_per_gpu": 1, "trial_worker": False},
    "process": {"trials_per_gpu": 1, "trial_worker": True},
    "pack": {"trials_per_gpu": "auto", "trial_worker": False},
    "both": {"trials_per_gpu": "auto", "trial_worker": True},
}

# One trial job, as workflow/scripts/train_trial.py runs it.
JOB = """
import json, sys
spec = json.loads(sys.argv[1])
from loratune.logs import log_to_file
log_to_file(spec["log"])
from loratune.config import validate_config
from loratune.trial import run_trial_job
run_trial_job(validate_config(spec["config"]), trial_id=spec["trial"], seed=0, metrics_path=spec["metrics"],
              model_path=spec["model"], data_dir=spec["data"], log_path=spec["log"])
"""

SEARCH_SPACE = {
    "lora_rank": {"type": "int", "low": 4, "high": 256, "step": 4, "log": True},
    "lora_alpha": {"type": "choice", "values": [4, 8, 16, 32, 64, 128, 256]},
    "learning_rate": {"type": "float", "low": 1.0e-5, "high": 1.0e-2, "log": True},
    "lora_dropout": {"type": "fixed", "value": 0.05},
}


def study_config(model: str, data: str, training: dict, resources: dict) -> dict:
    return {
        "study": "throughput",
        "seeds": [0],
        "backend": "qlora",
        "objectives": {"eval_loss": "min", "train_time": "min"},
        "search_space": SEARCH_SPACE,
        "pilot": {"design": "lhs", "n": 4},
        "arms": {"random": {"proposer": "random", "rounds": 1, "batch_size": 1}},
        "model": {"name": model},
        "dataset": {"path": data, "format": "self_instruct", "eval_fraction": 0.15},
        "training": training,
        "resources": {"gpus_per_trial": 1, "runtime": 30, **resources},
    }


def trial_ids(n: int) -> list[str]:
    from loratune.designs import pilot_design
    from loratune.space import SearchSpace

    space = SearchSpace.from_config(SEARCH_SPACE)
    return [space.trial_id(point) for point in pilot_design(space, n, "lhs", seed=0)]


def run_mode(name: str, config: dict, trials: list[str], concurrency: int, work: Path, env: dict, emit) -> dict:
    """Run ``trials`` as jobs, ``concurrency`` at a time; the record of the mode."""
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    pending, running, done = list(trials), {}, []
    started = time.time()
    while pending or running:
        while pending and len(running) < concurrency:
            trial = pending.pop(0)
            trial_dir = folder / "seed0" / "trials" / trial
            trial_dir.mkdir(parents=True)
            spec = {
                "config": copy.deepcopy(config),
                "trial": trial,
                "metrics": str(trial_dir / "metrics.json"),
                "log": str(trial_dir / "train.log"),
                "model": config["_model_path"],
                "data": config["_data_dir"],
            }
            del spec["config"]["_model_path"], spec["config"]["_data_dir"]
            process = subprocess.Popen([sys.executable, "-c", JOB, json.dumps(spec)], env=env, cwd=work)
            running[trial] = (process, time.time(), trial_dir)
        time.sleep(0.2)
        for trial, (process, start, trial_dir) in list(running.items()):
            if process.poll() is None:
                continue
            del running[trial]
            try:
                metrics = json.loads((trial_dir / "metrics.json").read_text())
            except (OSError, ValueError):
                metrics = {"status": f"job failed ({process.returncode})"}
            done.append({"trial": trial, "start": start, "end": time.time(), "metrics": metrics})
    wall = max(d["end"] for d in done) - started
    workers = {d["metrics"].get("worker", {}).get("pid") for d in done} - {None}
    for pid in workers:  # the workers of this mode hold GPU memory until idle: end them now
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    time.sleep(1.0)
    later = [d["end"] - d["start"] for d in done if d["metrics"].get("worker", {}).get("trial", 1) > 1]
    slots = max(d["metrics"].get("trials_per_gpu") or 1 for d in done)
    record = {
        "mode": name,
        "trials": len(done),
        "ok": sum(d["metrics"].get("status") == "ok" for d in done),
        "concurrency": concurrency,
        "trials_per_gpu": slots,
        "most_on_gpu_at_start": max(d["metrics"].get("gpu_trials_at_start") or 1 for d in done),
        "workers": len(workers),
        "wall_s": round(wall, 1),
        "trials_per_hour": round(len(done) * 3600 / wall, 1),
        "median_job_s": round(statistics.median(d["end"] - d["start"] for d in done), 1),
        "median_train_s": round(statistics.median(d["metrics"].get("train_time") or 0 for d in done), 2),
        "median_later_job_s": round(statistics.median(later), 1) if later else None,
        "steady_trials_per_hour": (
            round(min(slots, concurrency) * 3600 / statistics.median(later), 1) if later else None
        ),
        "eval_loss": {d["trial"]: d["metrics"].get("eval_loss") for d in done},
    }
    emit(record)
    return record


def shape_model(shape: str, root: Path, tokenizer_from: str, weights: bool) -> str:
    """A random-weight model of ``shape``, saved once (built on the GPU in a child process, so
    this one never touches CUDA), with SmolLM2's tokenizer; without ``weights`` only its
    config.json, all that ``auto`` reads."""
    path = root / shape
    code = (
        "import json, sys, torch; from transformers import LlamaConfig, LlamaForCausalLM\n"
        "config = LlamaConfig(**json.loads(sys.argv[1]))\n"
        "if sys.argv[3] == '0': config.save_pretrained(sys.argv[2]); sys.exit()\n"
        "with torch.device('cuda' if torch.cuda.is_available() else 'cpu'): model = LlamaForCausalLM(config).to(torch.bfloat16)\n"
        "model.save_pretrained(sys.argv[2])\n"
    )
    if not (path / "config.json").exists() or (weights and not list(path.glob("*.safetensors"))):
        subprocess.run(
            [sys.executable, "-c", code, json.dumps(config_kwargs(shape)), str(path), str(int(weights))], check=True
        )
    for name in [*Path(tokenizer_from).glob("tokenizer*"), *Path(tokenizer_from).glob("special_tokens_map.json")]:
        shutil.copy(name, path / name.name)
    return str(path)


def summarize(records: list[dict], shapes: list[dict]) -> str:
    by_mode = {r["mode"]: r for r in records if "mode" in r and "shape" not in r}
    lines = (
        [
            "| mode | trials | trials/GPU | workers | wall s | trials/hour | vs job | steady trials/hour (extrapolated) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        if by_mode.keys() & MODES.keys()
        else []
    )
    base = by_mode.get("job", {}).get("trials_per_hour")
    for name in MODES:
        r = by_mode.get(name)
        if r:
            ratio = f"{r['trials_per_hour'] / base:.2f}x" if base else "-"
            lines.append(
                f"| {name} | {r['trials']} ({r['ok']} ok) | {r['trials_per_gpu']} | {r['workers']} | {r['wall_s']} | "
                f"{r['trials_per_hour']} | {ratio} | {r['steady_trials_per_hour'] or '-'} |"
            )
    if {"job", "pack", "process", "both"} <= by_mode.keys() and base:
        gain = {name: by_mode[name]["trials_per_hour"] / base for name in MODES}
        lines.append("")
        lines.append(
            f"Split of the gain: packing alone {gain['pack']:.2f}x, per-process alone {gain['process']:.2f}x, "
            f"both {gain['both']:.2f}x (product of the two alone: {gain['pack'] * gain['process']:.2f}x)."
        )
    reference = by_mode.get("job", {}).get("eval_loss", {})
    gaps = [
        abs(loss - reference[trial])
        for r in by_mode.values()
        for trial, loss in r["eval_loss"].items()
        if r["mode"] in MODES and r["mode"] != "job" and loss is not None and reference.get(trial) is not None
    ]
    if gaps:
        lines.append("")
        lines.append(
            f"Same trials, other modes against one trial per job: largest |eval_loss difference| {max(gaps):.3g} "
            f"over {len(gaps)} trial runs."
        )
    for s in shapes:
        lines.append("")
        lines.append(
            f"{s['shape']}: auto = {s['auto']} trial(s) per GPU ({s['why']})"
            + (f"; job {s['job']} vs both {s['both']} trials/hour ({s['both'] / s['job']:.2f}x)" if "job" in s else "")
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "self_instruct_seed_tasks.jsonl"))
    parser.add_argument("--out", type=Path, required=True, help="folder for throughput.jsonl and throughput.md")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--trials", default="job=3,process=4,pack=8,both=16", help="trials per mode")
    parser.add_argument("--concurrency", type=int, default=8, help="jobs at once in the packing modes")
    parser.add_argument("--shapes", default="llama3-1b,llama3-8b")
    parser.add_argument("--run-shapes", default="llama3-1b", help="shapes timed job against both")
    parser.add_argument("--shape-trials", type=int, default=2)
    parser.add_argument("--shape-steps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="CPU check: fake GPU slots, 2 steps, few trials")
    parser.add_argument(
        "--only-shapes", action="store_true", help="only the shapes check, every shape timed, 2 trials of 5 steps"
    )
    args = parser.parse_args()
    if args.only_shapes:
        args.run_shapes, args.shape_trials, args.shape_steps = args.shapes, 2, 5

    from loratune.training import DatasetSpec, ModelSpec, prepare_dataset, prepare_model

    work = args.work or Path(tempfile.mkdtemp(prefix="loratune-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    records = []

    def emit(record: dict) -> None:
        records.append(record)
        print(json.dumps(record), flush=True)
        with open(args.out / "throughput.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    if args.tiny:  # the tests' 2-layer random Llama: the machinery, not the speed
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_models import build_tiny_llama

        model = str(build_tiny_llama(work / "models" / "tiny-llama"))
    else:
        model = prepare_model(ModelSpec(), work / "models")
    data_dir = work / "data"
    prepare_dataset(DatasetSpec(path=args.data, format="self_instruct", eval_fraction=0.15), data_dir)
    env = {
        **os.environ,
        "TMPDIR": str(work / "tmp"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    (work / "tmp").mkdir(exist_ok=True)
    counts = dict(item.split("=") for item in args.trials.split(","))
    training = {"quantization": "nf4", "max_steps": args.steps, "batch_size": 8, "max_seq_length": 256}
    modes = dict(MODES)
    if args.tiny:  # no GPU: two fake slots of one fake GPU, the trainer on the CPU
        env.update(LORATUNE_GPUS="1", CUDA_VISIBLE_DEVICES="0")
        training.update(max_steps=2, batch_size=2, max_seq_length=64)
        modes = {name: {**m, "trials_per_gpu": 2 if m["trials_per_gpu"] == "auto" else 1} for name, m in MODES.items()}
        counts = {"job": "2", "process": "3", "pack": "2", "both": "4"}
        args.concurrency, args.shapes = 2, ""
    import torch

    emit(
        {
            "event": "setup",
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "steps": training["max_steps"],
            "model": model,
            "commit": _commit(),
        }
    )
    ids = trial_ids(max(int(n) for n in counts.values()))
    if args.only_shapes:
        modes = {}
    else:
        # One untimed job first: it fills the on-disk kernel caches (torch.compile's) that every
        # later job of a study finds warm, so no mode pays the study's first compilation.
        warmup = study_config(
            model, args.data, {**training, "max_steps": 2}, {**MODES["job"], "worker_idle_seconds": 120}
        )
        warmup.update(_model_path=model, _data_dir=str(data_dir))
        run_mode("warmup", warmup, ids[-1:], 1, work, env, emit)
    for name, resources in modes.items():
        config = study_config(model, args.data, training, {**resources, "worker_idle_seconds": 120})
        config.update(_model_path=model, _data_dir=str(data_dir))
        concurrency = 1 if resources["trials_per_gpu"] == 1 else args.concurrency
        run_mode(name, config, ids[: int(counts[name])], concurrency, work, env, emit)

    shapes = []
    from loratune import packing

    for shape in filter(None, args.shapes.split(",")):
        timed = shape in args.run_shapes.split(",")
        path = shape_model(shape, work / "shapes", model, weights=timed)
        tokens = 8 * 2048 if shape == "llama3-1b" else 4 * 2048
        gpu_gib = packing.gpu_memory_gib(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
        n, why = packing.resolve_trials_per_gpu("auto", path, tokens, "nf4", gpu_gib, packing.cpus_per_gpu(1))
        result = {"shape": shape, "auto": n, "why": why}
        if timed:
            shape_training = {
                "quantization": "nf4",
                "max_steps": args.shape_steps,
                "batch_size": tokens // 2048,
                "max_seq_length": 2048,
            }
            for name in ("both", "job"):  # one trial per job second: it finds the kernel caches warm
                config = study_config(path, args.data, shape_training, {**MODES[name], "worker_idle_seconds": 120})
                config.update(_model_path=path, _data_dir=str(data_dir))
                at_once = n if name == "both" else 1
                record = run_mode(f"{shape}-{name}", config, ids[: args.shape_trials], at_once, work, env, emit)
                result[name] = record["trials_per_hour"]
        emit(result)
        shapes.append(result)
        (args.out / "throughput.md").write_text(summarize(records, shapes))  # what a cut run has done
    (args.out / "throughput.md").write_text(summarize(records, shapes))
    print((args.out / "throughput.md").read_text())


def _commit() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
            ).stdout.strip()
            or None
        )
    except OSError:
        return None


if __name__ == "__main__":
    main()
