"""Training speed of loratune's trainer against the plain transformers+peft+bitsandbytes loop.

One run, one GPU. Three cases, each printing JSON lines (also appended to --out):

synthetic  The issue's measure: a Llama-3-8B-shaped model with random weights, seq 2048, batch 4,
           LoRA r=16 (alpha 32, dropout 0.05) on every linear layer, NF4 4-bit.
           ``hf_baseline`` is ../shared/bench/hf_qlora_baseline.py (QLoRA + gradient checkpointing);
           ``loratune-plain`` is our trainer with ``fused_kernels: false`` (the same recipe);
           ``loratune-fused`` variants are the fused path with a 38 GiB memory budget (the default
           planner), with every layer checkpointed, and with eager (uncompiled) kernels.
           Useful TFLOP/s counts 4·N FLOP per token (N: the matmul parameters, as the baseline
           does); ``of_limit`` is the share of the useful-FLOP limit at 790 TFLOP/s.
mixed      Real instruction data of mixed lengths: the 175 self-instruct seed tasks tokenized by
           SmolLM2's tokenizer (26-1395 tokens, median 105), 16 examples per step as in the QLoRA
           paper, max 2048 tokens, on the same 8B model. The plain loop pads each batch to its
           longest example; tokens/s counts non-padding tokens only.
peers      The speed-memory curve against the peers, in one run: the plain loop (loratune's plain
           path, the same recipe as the baseline), Unsloth (bench/unsloth_speed.py in a subprocess
           with its own wheels, --unsloth-site) and the fused path at each of --budgets (GiB), on the
           synthetic case's shape with LoRA dropout 0 for all three; --table writes the markdown.
curves     Training quality: SmolLM2-135M-Instruct (real weights) on the same data, 60 steps, same
           seed, through ``run_trial`` with the plain and the fused path: both loss curves and the
           held-out losses (``--plot`` writes them as HTML).

    python bench/train_speed.py --baseline ../shared/bench/hf_qlora_baseline.py \\
        --out bench/results/train_speed.jsonl --plot bench/results/train_speed_curves.html
    python bench/train_speed.py --baseline ../shared/bench/hf_qlora_baseline.py --cases peers \\
        --unsloth-site /tmp/unsloth-site --out peers.jsonl --table peers.md
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch

from loratune.training.fused import MemoryPlan

PEAK_TFLOPS = 790.0  # dense bf16 matmul rate seen on the H200 (the device notes)
BUDGET_GIB = 39.0  # the issue allows 40 GiB of peak memory
LORA = dict(lora_rank=16, lora_alpha=32, learning_rate=2e-4, lora_dropout=0.05)


def _commit() -> str | None:
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def _load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("hf_qlora_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recorder:
    def __init__(self, out: Path | None):
        self.out = out
        self.records: list[dict] = []

    def __call__(self, record: dict) -> dict:
        self.records.append(record)
        line = json.dumps(record)
        print(line, flush=True)
        if self.out:
            with self.out.open("a") as handle:
                handle.write(line + "\n")
        return record


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU only for a smoke test


def _free() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _peak_gib() -> float:
    from loratune.training.trainer import peak_memory_gib

    return round(peak_memory_gib(DEVICE), 1)


def load_lora_model(model_dir: str, *, fused: bool, dropout: float = LORA["lora_dropout"]):
    from loratune.training.models import add_lora, load_base_model
    from loratune.training.settings import ALL_LINEAR_LAYERS

    torch.manual_seed(0)
    model = load_base_model(
        model_dir, quantization="nf4", dtype=torch.bfloat16, device=DEVICE, gradient_checkpointing=True, fused=fused
    )
    return add_lora(
        model,
        rank=LORA["lora_rank"],
        alpha=LORA["lora_alpha"],
        dropout=dropout,
        target_modules=ALL_LINEAR_LAYERS,
    )


def time_training(
    model, examples, *, fused, batch: int, seq: int, steps: int, warmup: int, dropout=LORA["lora_dropout"], **overrides
) -> dict:
    """Train ``warmup`` then ``steps`` steps; tokens/s (non-padding) of the timed part and the peak
    memory of all of them (``overrides``: training settings, ``memory_budget_gib`` among them)."""
    from loratune.training.settings import LoraHyperparameters, TrainingSettings
    from loratune.training.trainer import Progress, Trainer, train

    lora = LoraHyperparameters(**{**LORA, "lora_dropout": dropout})
    overrides = {"memory_budget_gib": BUDGET_GIB, **overrides}
    device = DEVICE
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    results = {}
    for phase, n_steps in (("warmup", warmup), ("timed", steps)):
        if n_steps == 0:
            continue
        settings = TrainingSettings(
            quantization="nf4",
            max_steps=n_steps,
            batch_size=batch,
            max_seq_length=seq,
            warmup_ratio=0.0,
            scheduler="constant",
            log_every=1000,
            **overrides,
        )
        progress = Progress()
        _sync()
        trainer = Trainer(
            model,
            examples,
            settings,
            lora,
            pad_id=0,
            device=device,
            dtype=torch.bfloat16,
            seed=0 if phase == "warmup" else 1,
            fused=fused,
        )
        if fused is not None:
            fused.fit_memory(trainer.memory_request())
        train(trainer, progress)
        _sync()
        results[phase] = progress
    timed = results["timed"]
    record = dict(
        tokens_per_s=round(timed.train_tokens / timed.train_time),
        step_s=round(timed.train_time / steps, 4),
        peak_gib=_peak_gib(),
        loss_last=round(timed.loss_curve[-1], 3),
    )
    if fused is not None:
        plan = fused.plan
        record.update(
            checkpointed_layers=len(plan.checkpointed),
            offload=plan.offload,
            loss_chunk=plan.loss_chunk,
            embed_on_host=plan.embed_on_host,
            chunked_backward=plan.chunked_backward,
            dequant_cache=plan.dequant_cache,
            cached_layers=len(plan.cached_layer_indices(len(fused.layers))),
            estimate_gib=round(plan.estimate_gib, 1) if plan.estimate_gib is not None else None,
            compiled=fused.compiled,
        )
    for parameter in model.parameters():  # the next measure starts from the model alone
        parameter.grad = None
    return record


def profile_steps(model, examples, fused, target: Path, **options) -> None:
    """Two profiled steps: the kernels that take the GPU's time, largest first, then the host's
    calls that take its time (synchronizations, pinned allocations, the launches of a CPU-bound
    stretch: what the GPU table cannot show, the GPU's idle time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time_training(model, examples, fused=fused, batch=4, seq=2048, steps=2, warmup=0, **options)
    averages = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            table = averages.table(sort_by=key, row_limit=40, max_name_column_width=90)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    table += "\n\nBy the host's own time:\n" + averages.table(
        sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=90
    )
    target.write_text(table)
    print(table[:6000], flush=True)


def synthetic_examples(n: int, seq: int):
    from loratune.training.data import TokenizedExample

    generator = torch.Generator().manual_seed(0)
    return [
        TokenizedExample(ids, list(ids)) for ids in torch.randint(0, 128000, (n, seq), generator=generator).tolist()
    ]


def mixed_examples(data_file: str, cache: Path, tokenizer_dir: str | None = None):
    """The self-instruct seed tasks, tokenized by SmolLM2's tokenizer, prompt tokens masked."""
    from loratune.training import DatasetSpec, prepare_dataset
    from loratune.training.data import read_prepared, tokenize_examples
    from loratune.training.models import load_tokenizer, prepare_model
    from loratune.training.settings import ModelSpec

    smollm2 = tokenizer_dir or prepare_model(ModelSpec("builtin:smollm2-135m"), cache / "models")
    prepared = cache / "self_instruct"
    if not (prepared / "manifest.json").exists():
        prepare_dataset(DatasetSpec(path=data_file, format="self_instruct", eval_fraction=0.0), prepared)
    examples = tokenize_examples(load_tokenizer(smollm2), read_prepared(prepared).train, 2048)
    return smollm2, examples


def with_speed(record: dict, n_params: int, baseline: float | None) -> dict:
    tokens = record["tokens_per_s"]
    record["useful_4N_tflops"] = round(4 * n_params * tokens / 1e12, 1)
    record["of_limit"] = round(4 * n_params * tokens / 1e12 / PEAK_TFLOPS, 3)
    if baseline:
        record["vs_baseline"] = round(tokens / baseline, 2)
    return record


def run_unsloth(path: str, site: str, timing: dict, timeout: float) -> dict:
    """bench/unsloth_speed.py in a subprocess with Unsloth's own wheels first on the path."""
    import os
    import subprocess
    import sys

    here = Path(__file__).resolve().parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([site, os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "UNSLOTH_DISABLE_STATISTICS": "1",  # else it downloads a README from the hub
    }
    command = [sys.executable, str(here / "unsloth_speed.py"), "--model", path]
    command += ["--rank", str(LORA["lora_rank"]), "--alpha", str(LORA["lora_alpha"])]
    command += ["--steps", str(timing["steps"]), "--warmup", str(timing["warmup"])]
    with tempfile.TemporaryDirectory() as work:  # Unsloth writes its compiled cache into the working folder
        try:
            done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            return {"error": f"timed out after {timeout:g} s: {str(error.stdout)[-600:]}"}
    for line in done.stdout.splitlines():
        if line.startswith("UNSLOTH_RESULT "):
            return json.loads(line.removeprefix("UNSLOTH_RESULT "))
    return {"error": f"exit {done.returncode}: {(done.stdout + done.stderr)[-1200:]}"}


def peers(path: str, args, emit, n_params: int, timing: dict, header: dict) -> None:
    """The plain loop, loratune's fused path at each budget and Unsloth (last: its point is the
    best known of the three): the same 8B shape, data and LoRA settings, LoRA dropout 0 for all
    three (Unsloth's fast path has none). The table (``--table``) is written again after each
    measure, so a run cut short keeps what it measured."""
    from loratune.training.fused import FusedCausalLM

    synthetic = synthetic_examples(64, 2048)
    rows = []

    def add(record: dict) -> None:
        rows.append(emit(with_speed({"case": "peers", **record}, n_params, None)))
        if args.table:
            args.table.write_text(peers_table(rows, header))

    try:
        model = load_lora_model(path, fused=False, dropout=0.0)
        rec = time_training(model, synthetic, fused=None, batch=4, seq=2048, dropout=0.0, **timing)
        add({"trainer": "plain loop (transformers+peft+bitsandbytes, checkpointing)", **rec})
        del model
    except Exception:
        emit({"case": "peers", "trainer": "plain", "error": traceback.format_exc()[-800:]})
    _free()
    try:
        model = load_lora_model(path, fused=True, dropout=0.0)
        fused = FusedCausalLM(model, compile=True)
        lora = [p for p in model.parameters() if p.requires_grad]
        initial = [p.detach().clone() for p in lora]
        for budget in sorted(args.budgets, reverse=True):  # the roomiest first: it compiles the kernels
            name = f"loratune fused, budget {budget:g} GiB"
            with torch.no_grad():  # every plan trains the same model from the same start: same losses
                for parameter, start in zip(lora, initial):
                    parameter.copy_(start)
            try:
                rec = time_training(
                    model, synthetic, fused=fused, batch=4, seq=2048, dropout=0.0, memory_budget_gib=budget, **timing
                )
                add({"trainer": name, "budget_gib": budget, **rec})
                if args.profile and budget in args.profile_budgets:
                    target = args.profile.with_name(f"{args.profile.stem}_budget{budget:g}{args.profile.suffix}")
                    profile_steps(model, synthetic, fused, target, dropout=0.0, memory_budget_gib=budget)
            except Exception:  # the other budgets still measure
                emit({"case": "peers", "trainer": name, "error": traceback.format_exc()[-1500:]})
            fused.apply_plan(MemoryPlan(checkpointed=frozenset(), dequant_cache=False))
            for parameter in model.parameters():
                parameter.grad = None
            _free()
        del model, fused
    except Exception:
        emit({"case": "peers", "trainer": "loratune fused", "error": traceback.format_exc()[-1500:]})
    _free()
    if args.unsloth_site:
        rec = run_unsloth(path, args.unsloth_site, timing, args.unsloth_timeout)
        if "error" in rec:
            emit({"case": "peers", "trainer": "unsloth", **rec})
        else:
            add(rec)


def peers_table(rows: list[dict], header: dict) -> str:
    """The speed-memory curve against the peers, as a markdown table."""
    plain = next((r["tokens_per_s"] for r in rows if r["trainer"].startswith("plain")), None)
    unsloth = next((r["tokens_per_s"] for r in rows if r["trainer"].startswith("unsloth")), None)
    lines = [
        f"Training speed against the peers ({header.get('gpu')}, torch {header.get('torch')}, commit "
        f"{header.get('commit')}): Llama-3-8B shape, random weights, NF4, seq 2048, batch 4, LoRA r=16 "
        f"alpha 32 dropout 0 on every linear layer, {header.get('warmup')} warm-up + {header.get('steps')} "
        "timed steps. Peak: torch's peak allocation. Last loss: of the last step, each plan from the same "
        "start and data. Share of the useful-FLOP limit: 4 N FLOP a token at 790 TFLOP/s "
        f"({header.get('useful_flop_limit_tokens_per_s')} tokens/s).",
        "",
        "| trainer | tokens/s | peak GiB | x plain | x Unsloth | of limit | last loss | plan |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        plan = ""
        if "checkpointed_layers" in row:
            plan = f"{row['checkpointed_layers']} layers recomputed"
            plan += ", inputs in host memory" if row.get("offload") and row["checkpointed_layers"] else ""
            plan += ", embedding in host memory" if row.get("embed_on_host") else ""
            plan += ", backward in chunks" if row.get("chunked_backward") else ""
            plan += f", {row['cached_layers']} layers' weights kept dequantized" if row.get("cached_layers") else ""
            plan += f", loss chunks of {row['loss_chunk']}, estimated {row['estimate_gib']} GiB"
        tokens = row["tokens_per_s"]
        versus = [f"{tokens / peer:.2f}" if peer else "" for peer in (plain, unsloth)]
        lines.append(
            f"| {row['trainer']} | {tokens:,} | {row['peak_gib']} | {versus[0]} | {versus[1]} "
            f"| {row['of_limit']:.1%} | {row.get('loss_last', '')} | {plan} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="path of hf_qlora_baseline.py")
    parser.add_argument("--data", default="../shared/data/self_instruct_seed_tasks.jsonl")
    parser.add_argument("--root", default="/tmp/anchor_models")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "loratune_bench")
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--cases", default="synthetic,mixed,curves", help="of synthetic, mixed, curves, peers")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="HTML file for the loss curves")
    parser.add_argument(
        "--tokenizer", default=None, help="a folder with SmolLM2's tokenizer, instead of converting the builtin GGUF"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="write a torch.profiler table of two steps of the first fused variant here (peers: of each of"
        " --profile-budgets, the budget added to the file's name)",
    )
    parser.add_argument(
        "--profile-budgets",
        type=lambda text: [float(b) for b in text.split(",")],
        default=[8.0],
        help="peers: the budgets (GiB) --profile profiles",
    )
    parser.add_argument(
        "--plot-from",
        type=Path,
        default=None,
        help="draw --plot from the curves records of this --out file and exit (where the run had no plotly)",
    )
    parser.add_argument("--variants", type=int, default=4, help="how many of the fused variants to run (in order)")
    parser.add_argument("--skip-plain", action="store_true", help="skip loratune's plain path (needed by 'mixed')")
    parser.add_argument(
        "--budgets", type=lambda text: [float(b) for b in text.split(",")], default=[8.0, 16.0, 24.0, 40.0]
    )
    parser.add_argument(
        "--unsloth-site",
        default=None,
        help="Unsloth's --target folder (bench/gpu/make_carry_unsloth.sh); none: no Unsloth",
    )
    parser.add_argument("--unsloth-timeout", type=float, default=300.0)
    parser.add_argument("--table", type=Path, default=None, help="markdown table of the peers case")
    parser.add_argument("--commit", default=None, help="the commit measured (default: git's HEAD, where known)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if args.plot_from is not None:
        records = [json.loads(line) for line in args.plot_from.read_text().splitlines() if line.strip()]
        plot_curves({r["trainer"]: r for r in records if r.get("case") == "curves"}, args.plot)
        return
    cases = set(args.cases.split(","))
    emit = Recorder(args.out)

    baseline = _load_baseline(args.baseline)
    path = str(Path(args.root) / args.shape)
    if cases & {"synthetic", "mixed", "peers"}:
        baseline.materialize(args.shape, path)
    n_params = baseline.n_params(args.shape)
    gpu = torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu"
    header = emit(
        {
            "torch": torch.__version__,
            "gpu": gpu,
            "shape": args.shape,
            "commit": args.commit or _commit(),
            "warmup": args.warmup,
            "steps": args.steps,
            "n_params_4N": n_params,
            "useful_flop_limit_tokens_per_s": round(PEAK_TFLOPS * 1e12 / (4 * n_params)),
        }
    )
    started = time.time()
    timing = dict(steps=args.steps, warmup=args.warmup)
    mixed_data = None
    if "mixed" in cases or "curves" in cases:
        mixed_data = mixed_examples(args.data, args.cache, args.tokenizer)
        lengths = [len(e.input_ids) for e in mixed_data[1]]
        emit(
            {
                "event": "mixed data",
                "examples": len(lengths),
                "min": min(lengths),
                "max": max(lengths),
                "mean": round(sum(lengths) / len(lengths), 1),
            }
        )

    base_tokens = None
    if "synthetic" in cases:
        try:
            record = baseline.run(args.shape, path, True, 16, True, 4, 2048, steps=args.steps, warmup=args.warmup)
            base_tokens = record["tokens_per_s"]
            emit({"case": "synthetic", "trainer": "hf_baseline", **record})
        except Exception:
            emit({"case": "synthetic", "trainer": "hf_baseline", "error": traceback.format_exc()[-800:]})
        _free()

    synthetic = synthetic_examples(64, 2048)
    # The plain trainer (fused_kernels: false): parity with the baseline, and the mixed-data reference.
    plain_mixed = None
    if cases & {"synthetic", "mixed"} and not args.skip_plain:
        try:
            model = load_lora_model(path, fused=False)
            if "synthetic" in cases:
                rec = time_training(model, synthetic, fused=None, batch=4, seq=2048, **timing)
                emit(with_speed({"case": "synthetic", "trainer": "loratune-plain", **rec}, n_params, base_tokens))
            if "mixed" in cases:
                plain_mixed = time_training(model, mixed_data[1], fused=None, batch=16, seq=2048, **timing)
                emit({"case": "mixed", "trainer": "loratune-plain (pads each batch)", **plain_mixed})
            del model
        except Exception:
            emit({"case": "plain", "error": traceback.format_exc()[-800:]})
        _free()

    if cases & {"synthetic", "mixed"}:
        from loratune.training.fused import FusedCausalLM

        try:
            model = load_lora_model(path, fused=True)
            variants = [
                (f"budget {BUDGET_GIB:g} GiB, compiled", dict(compile=True)),
                (
                    f"budget {BUDGET_GIB:g} GiB, dequantized-weight cache, compiled",
                    dict(compile=True, dequant_cache=True),
                ),
                ("every layer checkpointed, compiled", dict(compile=True, gradient_checkpointing=True)),
                (f"budget {BUDGET_GIB:g} GiB, eager kernels", dict(compile=False)),
            ]
            if "synthetic" in cases:
                for index, (name, options) in enumerate(variants[: args.variants]):
                    compile_ = options.pop("compile")
                    fused = FusedCausalLM(model, compile=compile_)
                    rec = time_training(model, synthetic, fused=fused, batch=4, seq=2048, **timing, **options)
                    emit(
                        with_speed(
                            {"case": "synthetic", "trainer": f"loratune-fused ({name})", **rec}, n_params, base_tokens
                        )
                    )
                    if index == 0 and args.profile:
                        profile_steps(model, synthetic, fused, args.profile, **options)
                    fused.apply_plan(MemoryPlan(checkpointed=frozenset(), dequant_cache=False))
                    _free()
            if "mixed" in cases:
                fused = FusedCausalLM(model, compile=True)
                rec = time_training(model, mixed_data[1], fused=fused, batch=16, seq=2048, **timing)
                fused.apply_plan(MemoryPlan(checkpointed=frozenset(), dequant_cache=False))
                if plain_mixed:
                    rec["vs_plain"] = round(rec["tokens_per_s"] / plain_mixed["tokens_per_s"], 2)
                emit(
                    {"case": "mixed", "trainer": f"loratune-fused (packed, budget {BUDGET_GIB:g} GiB, compiled)", **rec}
                )
            del model
        except Exception:
            emit({"case": "fused", "error": traceback.format_exc()[-1500:]})
        _free()

    if "peers" in cases:
        peers(path, args, emit, n_params, timing, header)
    if "curves" in cases:
        curves(mixed_data[0], args, emit)
    emit({"event": "done", "seconds": round(time.time() - started, 1)})


def curves(smollm2: str, args, emit) -> None:
    """Plain and fused trials of SmolLM2 on the same data and seed: loss curves and held-out loss."""
    from loratune.training import DatasetSpec, TrainingSettings, prepare_dataset, run_trial

    prepared = args.cache / "self_instruct_eval"
    if not (prepared / "manifest.json").exists():
        prepare_dataset(DatasetSpec(path=args.data, format="self_instruct", eval_fraction=0.15), prepared)
    hparams = {"lora_rank": 16, "lora_alpha": 16, "learning_rate": 1e-3, "lora_dropout": 0.05}
    runs = {}
    for name, fused in (("plain", False), ("fused", True)):
        settings = TrainingSettings(
            quantization="nf4",
            max_steps=60,
            batch_size=8,
            max_seq_length=512,
            warmup_ratio=0.05,
            log_every=20,
            fused_kernels=fused,
        )
        metrics = run_trial(hparams, settings, smollm2, prepared, args.cache / f"curve_{name}", seed=0)
        runs[name] = metrics
        emit(
            {
                "case": "curves",
                "trainer": name,
                "status": metrics["status"],
                "error": metrics["error"],
                "train_loss": metrics["train_loss"],
                "eval_loss": metrics["eval_loss"],
                "train_time": metrics["train_time"],
                "tokens_per_s": metrics["tokens_per_second"],
                "peak_gib": metrics["peak_memory_gib"],
                "loss_curve": metrics["loss_curve"],
            }
        )
    if args.plot and all(m["status"] == "ok" for m in runs.values()):
        try:
            plot_curves(runs, args.plot)
        except ImportError:  # (the GPU image has no plotly: --plot-from draws the recorded runs elsewhere)
            emit({"event": "plot skipped: plotly is not installed here; draw it with --plot-from"})


def plot_curves(runs: dict, path: Path) -> None:
    """The loss curves of ``runs`` (name -> a curves record: loss_curve, eval_loss) as HTML."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for name, metrics in runs.items():
        figure.add_scatter(
            y=metrics["loss_curve"],
            x=list(range(1, len(metrics["loss_curve"]) + 1)),
            mode="lines",
            name=f"{name} (held-out loss {metrics['eval_loss']:.3f})",
        )
    figure.update_layout(
        title="SmolLM2-135M QLoRA on the self-instruct seed tasks: same seed, same data",
        xaxis_title="step",
        yaxis_title="training loss (per completion token)",
    )
    figure.write_html(path, include_plotlyjs="cdn")


if __name__ == "__main__":
    main()
