"""Real LoRA and QLoRA training of a tiny random-weight Llama on the CPU, and the trial's metrics."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from loratune.config import TRIAL_METRICS
from loratune.training import DatasetSpec, TrainingSettings, TrialMetrics, prepare_dataset, run_trial
from loratune.training.data import read_prepared, tokenize_examples
from loratune.training.metrics import ADAPTER_STEP_FILE
from loratune.training.models import add_lora, load_base_model, load_tokenizer
from loratune.training.trainer import (
    Progress,
    Trainer,
    collate,
    evaluation_steps,
    learning_rate_factor,
    micro_batches,
    plan_steps,
    require_trainable_4bit_weights,
    summed_token_loss,
    train,
)
from loratune.training.settings import LoraHyperparameters

METRIC_FIELDS = {
    "status",
    "error",
    "train_loss",
    "final_train_loss",
    "eval_loss",
    "train_time",
    "job_time",
    "tokens_per_second",
    "train_tokens",
    "steps",
    "peak_memory_gib",
    "trainable_params",
    "total_params",
    "device",
    "gpu_name",
    "quantization",
    "started_at",
    "hparams",
    "loss_curve",
    "provenance",
    "max_steps",
    "best_step",
    "curve",
    "total_train_time",
    "segments",
}
PROVENANCE_FIELDS = {"model", "model_sha256", "dataset_sha256", "libraries", "seed", "hostname"}
HPARAMS = {"lora_rank": 16, "lora_alpha": 32, "learning_rate": 3e-2, "lora_dropout": 0.0}
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Milliseconds of work per op: a second thread only adds waiting on a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def settings(**options) -> TrainingSettings:
    return TrainingSettings(**{"max_steps": 40, "warmup_ratio": 0.0, "log_every": 100, **options})


def four_bit_unusable() -> str | None:
    """Why bitsandbytes' 4-bit path cannot run here, or None when it can."""
    try:
        import bitsandbytes.functional as bnb

        packed, state = bnb.quantize_4bit(torch.randn(64, 64, dtype=torch.bfloat16), quant_type="nf4")
        bnb.dequantize_4bit(packed, state)
    except Exception as error:  # any failure means: not usable on this machine
        return f"bitsandbytes 4-bit is not usable on this CPU ({type(error).__name__}: {error})"
    return None


needs_4bit = pytest.mark.skipif(four_bit_unusable() is not None, reason=str(four_bit_unusable()))


def lora_model(model_path: str, quantization: str):
    model = load_base_model(
        model_path, quantization=quantization, dtype=torch.bfloat16, device=CPU, gradient_checkpointing=False
    )
    return add_lora(model, rank=8, alpha=16, dropout=0.0, target_modules=TrainingSettings().target_modules)


def first_batch(model_path: str, data_dir: Path):
    tokenizer = load_tokenizer(model_path)
    examples = tokenize_examples(tokenizer, read_prepared(data_dir).train, 64)
    return examples, collate(examples[:4], tokenizer.pad_token_id, CPU)


# ---- schedule --------------------------------------------------------------------------
def test_plan_steps_from_max_steps_or_epochs():
    assert plan_steps(TrainingSettings(max_steps=7), n_train=1000) == 7
    assert plan_steps(TrainingSettings(max_steps=None, epochs=0.5, batch_size=2, gradient_accumulation=2), 10) == 2
    assert plan_steps(TrainingSettings(max_steps=None, epochs=0.01), 10) == 1


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant"])
def test_learning_rate_schedule(scheduler):
    factors = [learning_rate_factor(step, 20, 4, scheduler) for step in range(20)]
    assert factors[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]  # warmup never starts at zero
    assert all(0 < f <= 1 for f in factors)
    if scheduler == "constant":
        assert factors[4:] == [1.0] * 16
    else:
        assert all(a > b for a, b in zip(factors[4:], factors[5:])) and factors[-1] < 0.1


# ---- gradients -------------------------------------------------------------------------
@pytest.mark.parametrize("quantization", ["none", pytest.param("nf4", marks=needs_4bit)])
def test_lora_weights_get_gradients(tiny_model, data_dir, quantization):
    torch.manual_seed(0)
    model = lora_model(tiny_model, quantization)
    _, batch = first_batch(tiny_model, data_dir)
    model.train()
    summed_token_loss(model, batch, torch.bfloat16).backward()
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in name for name in lora)
    assert all(p.grad is not None for p in lora.values())
    # B starts at zero, so only B moves in the first step; A follows from the second.
    assert all(p.grad.abs().sum() > 0 for name, p in lora.items() if "lora_B" in name)
    torch.optim.SGD(lora.values(), lr=0.1).step()
    model.zero_grad()
    summed_token_loss(model, batch, torch.bfloat16).backward()
    assert all(p.grad.abs().sum() > 0 for p in lora.values())


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    """bitsandbytes believing it runs on an AVX512-BF16 CPU, where an eval forward repacks 4-bit
    weights (its probe is read when a Linear4bit is built); the repacked kernel also runs on CPUs
    without those instructions, so the trap is real on any CPU."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)


@needs_4bit
def test_an_eval_forward_keeps_the_4bit_weights_trainable(tiny_model, data_dir, avx512bf16_cpu):
    """bitsandbytes repacks 4-bit weights in an eval-mode no-grad forward on AVX512-BF16 CPUs;
    load_base_model turns that off, so evaluating in the middle of training is safe."""
    model = lora_model(tiny_model, "nf4")
    _, batch = first_batch(tiny_model, data_dir)
    model.eval()
    with torch.no_grad():
        summed_token_loss(model, batch, torch.bfloat16)
    assert not repacked(model)
    require_trainable_4bit_weights(model)


@needs_4bit
def test_4bit_weights_repacked_for_inference_are_refused(tiny_model, data_dir):
    """A model whose repacking is on again (loaded some other way) is caught before training."""
    model = lora_model(tiny_model, "nf4")
    examples, batch = first_batch(tiny_model, data_dir)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True  # as bitsandbytes sets it
    model.eval()
    with torch.no_grad():
        summed_token_loss(model, batch, torch.bfloat16)
    assert repacked(model)
    lora = LoraHyperparameters(lora_rank=8, lora_alpha=16, learning_rate=1e-3)
    trainer = Trainer(model, examples, settings(max_steps=2), lora, pad_id=0, device=CPU, dtype=torch.bfloat16, seed=0)
    with pytest.raises(RuntimeError, match="repacked for CPU inference"):
        train(trainer, Progress())


@needs_4bit
@pytest.mark.parametrize("fused", [False, True])
def test_evaluating_in_the_middle_of_qlora_training_changes_nothing(
    tiny_model, data_dir, tmp_path, avx512bf16_cpu, fused
):
    """NF4 on the CPU: four evaluations on the way leave every training loss as with one at the end,
    through the plain and the fused path (without the fix, the first evaluation repacks the weights)."""
    common = dict(quantization="nf4", max_steps=12, fused_kernels=fused, select="last")
    once = run_trial(HPARAMS, settings(eval_every=0, **common), tiny_model, data_dir, tmp_path / "once")
    often = run_trial(HPARAMS, settings(eval_every=3, **common), tiny_model, data_dir, tmp_path / "often")
    assert once["status"] == often["status"] == "ok", (once["error"], often["error"])
    assert [point["step"] for point in often["curve"]] == [3, 6, 9, 12]
    assert [point["step"] for point in once["curve"]] == [12]
    assert often["loss_curve"] == once["loss_curve"]
    assert often["eval_loss"] == once["eval_loss"]
    curve = often["loss_curve"]
    assert sum(curve[-3:]) < 0.8 * sum(curve[:3])  # and it learns


def repacked(model) -> bool:
    return any(
        getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
        for m in model.modules()
    )


# ---- whole trials ----------------------------------------------------------------------
def test_trial_learns_and_reports_every_metric(tiny_model, data_dir, tmp_path):
    metrics = run_trial(
        HPARAMS, settings(keep_adapter=True, quantization="none", select="last"), tiny_model, data_dir, tmp_path, seed=0
    )
    assert metrics["status"] == "ok", metrics["error"]
    assert METRIC_FIELDS <= set(metrics) and PROVENANCE_FIELDS <= set(metrics["provenance"])
    assert metrics["error"] is None and metrics["quantization"] == "none" and metrics["device"] == "cpu"
    curve = metrics["loss_curve"]
    assert metrics["steps"] == len(curve) == 40
    assert sum(curve[-5:]) / 5 < 0.5 * sum(curve[:5]) / 5  # it memorizes the training set
    assert metrics["train_loss"] == pytest.approx(sum(curve) / 40)
    assert metrics["final_train_loss"] == pytest.approx(sum(curve[-4:]) / 4)
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
    assert 0 < metrics["train_time"] < metrics["job_time"]
    assert metrics["train_tokens"] > 0
    assert metrics["tokens_per_second"] == pytest.approx(metrics["train_tokens"] / metrics["train_time"])
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert metrics["peak_memory_gib"] > 0
    assert metrics["hparams"] == {"lora_rank": 16, "lora_alpha": 32.0, "learning_rate": 3e-2, "lora_dropout": 0.0}
    provenance = metrics["provenance"]
    weights = Path(tiny_model) / "model.safetensors"
    assert provenance["model_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert provenance["dataset_sha256"] == read_prepared(data_dir).manifest["data_sha256"]
    assert provenance["seed"] == 0 and provenance["libraries"]["torch"] == torch.__version__
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    json.dumps(metrics, allow_nan=False)  # plain JSON, as metrics.json
    # The record is TrialMetrics, and every objective a config may name is a number of it.
    assert list(metrics) == [f.name for f in dataclasses.fields(TrialMetrics)]
    assert all(isinstance(metrics[name], (int, float)) for name in TRIAL_METRICS)


def test_the_metric_names_load_without_torch():
    """The Snakefile validates the config on every start: loratune.config must stay light."""
    code = "import sys, loratune.config as c; assert 'torch' not in sys.modules and 'eval_loss' in c.TRIAL_METRICS"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


@needs_4bit
def test_qlora_trial_learns_on_the_cpu(tiny_model, data_dir, tmp_path):
    metrics = run_trial(HPARAMS, settings(quantization="nf4"), tiny_model, data_dir, tmp_path, seed=0)
    assert metrics["status"] == "ok", metrics["error"]
    assert metrics["quantization"] == "nf4"
    curve = metrics["loss_curve"]
    assert sum(curve[-5:]) / 5 < 0.5 * sum(curve[:5]) / 5
    assert math.isfinite(metrics["eval_loss"])
    assert not (tmp_path / "adapter").exists()  # keep_adapter is off by default


def test_a_seed_fixes_the_trial(tiny_model, data_dir, tmp_path):
    def curve(seed):
        return run_trial(HPARAMS, settings(max_steps=6), tiny_model, data_dir, tmp_path, seed=seed)["loss_curve"]

    first = curve(0)
    assert curve(0) == first
    assert curve(1) != first


def test_hparams_override_settings_per_trial(tiny_model, data_dir, tmp_path):
    hparams = {**HPARAMS, "max_steps": 3, "weight_decay": 0.1, "gradient_accumulation": 2, "scheduler": "linear"}
    metrics = run_trial(hparams, settings(quantization="none"), tiny_model, data_dir, tmp_path)
    assert metrics["status"] == "ok", metrics["error"]
    assert metrics["steps"] == 3
    assert metrics["settings"]["weight_decay"] == 0.1 and metrics["settings"]["gradient_accumulation"] == 2


def test_epochs_decide_the_steps_without_max_steps(tiny_model, data_dir, tmp_path):
    metrics = run_trial(HPARAMS, settings(max_steps=None, epochs=0.5, batch_size=2), tiny_model, data_dir, tmp_path)
    n_train = read_prepared(data_dir).manifest["n_train"]
    assert metrics["steps"] == math.ceil(0.5 * n_train / 2)


# ---- failures --------------------------------------------------------------------------
def test_a_passed_deadline_stops_training_as_a_failed_trial(tiny_model, data_dir, tmp_path):
    metrics = run_trial(HPARAMS, settings(), tiny_model, data_dir, tmp_path, deadline=time.time() - 1)
    assert metrics["status"] == "failed"
    assert metrics["error"].startswith("TimeLimitReached: stopped after 0 of")
    assert metrics["eval_loss"] is None


def test_the_job_time_limit_leaves_a_margin(monkeypatch):
    from loratune.trial import _deadline

    monkeypatch.setenv("SLURM_JOB_ID", "1")  # only a Slurm job has a wall time to stop before
    assert _deadline(None, 1000.0) is None
    assert _deadline(10, 1000.0) == 1000.0 + 600 - 60  # at least a minute to evaluate and record
    assert _deadline(600, 0.0) == 36000 - 3600  # a tenth of a long job


def test_nan_loss_is_a_failed_trial(tiny_model, data_dir, tmp_path):
    metrics = run_trial(
        {**HPARAMS, "learning_rate": 1e30}, settings(eval_every=1, keep_adapter=True), tiny_model, data_dir, tmp_path
    )
    assert metrics["status"] == "failed"
    assert metrics["error"] == "LossDiverged: loss became NaN at step 2"
    assert metrics["steps"] == len(metrics["loss_curve"]) == 1
    assert metrics["train_loss"] is None and metrics["eval_loss"] is None and metrics["train_time"] is None
    assert METRIC_FIELDS <= set(metrics) and metrics["job_time"] > 0
    assert [point["step"] for point in metrics["curve"]] == [1]  # evaluated before it diverged
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "state").exists()  # nothing to go on from


def test_a_diverged_step_is_named_in_a_run_of_many_steps(tiny_model, data_dir, tmp_path):
    """Within one stretch of training (no evaluation between), the trial fails naming the step
    that diverged, with the loss curve up to the step before it."""
    metrics = run_trial(
        {**HPARAMS, "learning_rate": 1e30}, settings(eval_every=1000, max_steps=6), tiny_model, data_dir, tmp_path
    )
    assert metrics["status"] == "failed"
    assert metrics["error"] == "LossDiverged: loss became NaN at step 2"
    assert metrics["steps"] == len(metrics["loss_curve"]) == 1 and math.isfinite(metrics["loss_curve"][0])


def test_an_exception_while_training_is_a_failed_trial(tiny_model, data_dir, tmp_path):
    metrics = run_trial(HPARAMS, settings(target_modules=["no_such_proj"]), tiny_model, data_dir, tmp_path)
    assert metrics["status"] == "failed"
    assert metrics["error"].startswith("NoMatchingPeftModuleError: Target modules {'no_such_proj'} not found")
    assert "\n" not in metrics["error"]
    assert metrics["steps"] == 0 and metrics["eval_loss"] is None


@pytest.mark.parametrize(
    ("hparams", "options", "error", "message"),
    [
        ({"lora_rank": 8, "learning_rate": 1e-3}, {}, ValueError, r"^hparams: missing \['lora_alpha'\]$"),
        ({**HPARAMS, "lora_beta": 1}, {}, ValueError, r"^hparams: unknown \['lora_beta'\]"),
        ({**HPARAMS, "lora_rank": 0}, {}, ValueError, r"^hparams\.lora_rank: must be >= 1"),
        ({**HPARAMS, "learning_rate": -1.0}, {}, ValueError, r"^hparams\.learning_rate: must lie in \(0\.0, inf\)"),
        ({**HPARAMS, "weight_decay": -1}, {}, ValueError, r"^training\.weight_decay: must lie in"),
    ],
)
def test_bad_hparams_and_settings_raise_before_training(
    tiny_model, data_dir, tmp_path, hparams, options, error, message
):
    with pytest.raises(error, match=message):
        run_trial(hparams, settings(**options), tiny_model, data_dir, tmp_path)


def test_sequences_too_short_for_any_completion_raise(tiny_model, tmp_path):
    source = tmp_path / "long.jsonl"
    source.write_text(json.dumps({"prompt": "a long prompt " * 20, "completion": "answer"}) + "\n")
    prepare_dataset(DatasetSpec(path=str(source), eval_fraction=0.0), tmp_path / "prepared")
    with pytest.raises(
        ValueError, match=r"^training\.max_seq_length: 16 tokens leave no completion token in any of the 1"
    ):
        run_trial(HPARAMS, settings(max_seq_length=16), tiny_model, tmp_path / "prepared", tmp_path)


def test_missing_prepared_data_raises(tiny_model, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"^data_dir: .* lacks \['train\.jsonl', 'eval\.jsonl', 'manifest\.json'\]"
    ):
        run_trial(HPARAMS, settings(), tiny_model, tmp_path / "nothing", tmp_path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quantization": "nf8"}, r"^training\.quantization: unknown 'nf8'; choose one of \['nf4', 'none'\]$"),
        ({"scheduler": "step"}, r"^training\.scheduler: unknown 'step'"),
        ({"max_steps": 0}, r"^training\.max_steps: must be >= 1"),
        ({"epochs": 0}, r"^training\.epochs: must lie in \(0\.0, inf\)"),
        ({"batch_size": 2.5}, r"^training\.batch_size: expected an integer, got 2\.5"),
        ({"warmup_ratio": 1.0}, r"^training\.warmup_ratio: must lie in \[0\.0, 1\.0\)"),
        ({"gradient_checkpointing": "sometimes"}, r"^training\.gradient_checkpointing: expected true or false"),
        ({"target_modules": []}, r"^training\.target_modules: expected 'all-linear' or a non-empty list"),
        ({"compute_dtype": "float16"}, r"^training\.compute_dtype: unknown 'float16'"),
        ({"device": "tpu"}, r"^training\.device: unknown 'tpu'"),
    ],
)
def test_training_settings_validation(options, message):
    with pytest.raises(ValueError, match=message):
        TrainingSettings(**options)


def test_training_settings_normalize_yaml_values():
    parsed = TrainingSettings(target_modules=["q_proj", "v_proj"], batch_size=8.0, max_steps=None)
    assert parsed.target_modules == ("q_proj", "v_proj") and isinstance(parsed.batch_size, int)
    assert TrainingSettings(target_modules="all-linear").target_modules == "all-linear"


# ---- learning curves and resumed trials -------------------------------------------------
def test_evaluation_steps_spread_over_the_budget_and_always_include_the_last():
    assert evaluation_steps(30, None) == [6, 12, 18, 24, 30]
    assert evaluation_steps(3, None) == [1, 2, 3]
    assert evaluation_steps(10, 0) == [10]
    assert evaluation_steps(10, 4) == [4, 8, 10]
    assert evaluation_steps(10, 20) == [10]


def test_the_data_order_of_a_resumed_trial_continues_where_it_stopped():
    whole = micro_batches(10, 3, seed=5)
    expected = [next(whole) for _ in range(9)]
    later = micro_batches(10, 3, seed=5, start=5)
    assert [next(later) for _ in range(4)] == expected[5:]


RESUME_HPARAMS = {**HPARAMS, "lora_dropout": 0.1}  # dropout draws from the RNG: its state must come back too


@pytest.mark.parametrize("fused", [False, True])
def test_a_trial_stopped_at_a_rung_and_continued_equals_an_uninterrupted_one(tiny_model, data_dir, tmp_path, fused):
    options = settings(quantization="none", compute_dtype="float32", max_steps=12, eval_every=4, fused_kernels=fused)
    whole = run_trial(RESUME_HPARAMS, options, tiny_model, data_dir, tmp_path / "whole", seed=3)
    assert whole["status"] == "ok", whole["error"]
    assert not (tmp_path / "whole" / "state").exists()  # a finished trial keeps no state
    first = run_trial(RESUME_HPARAMS, options, tiny_model, data_dir, tmp_path / "parts", seed=3, until_step=4)
    assert first["status"] == "ok", first["error"]
    assert (first["steps"], first["max_steps"], first["best_step"]) == (4, 12, 4)
    assert (tmp_path / "parts" / "state" / "trial.pt").is_file()
    rest = run_trial(RESUME_HPARAMS, options, tiny_model, data_dir, tmp_path / "parts", seed=3)
    assert rest["status"] == "ok", rest["error"]
    assert rest["loss_curve"] == whole["loss_curve"]  # exactly: fp32 on the CPU
    assert [(p["step"], p["eval_loss"]) for p in rest["curve"]] == [(p["step"], p["eval_loss"]) for p in whole["curve"]]
    assert [p["train_loss"] for p in rest["curve"]] == [p["train_loss"] for p in whole["curve"]]
    assert rest["eval_loss"] == whole["eval_loss"] and rest["train_tokens"] == whole["train_tokens"]
    assert not (tmp_path / "parts" / "state").exists()
    # The accounting covers both jobs.
    segments = rest["segments"]
    assert [(s["from_step"], s["to_step"]) for s in segments] == [(0, 4), (4, 12)]
    assert segments[0]["train_time"] == pytest.approx(first["total_train_time"])
    assert rest["total_train_time"] == pytest.approx(sum(s["train_time"] for s in segments))
    assert rest["job_time"] == pytest.approx(sum(s["job_time"] for s in segments))
    assert 0 < segments[0]["job_time"] <= first["job_time"] and rest["job_time"] > segments[1]["job_time"] > 0
    assert rest["started_at"] == first["started_at"]
    assert [p["train_time"] for p in rest["curve"]] == sorted(p["train_time"] for p in rest["curve"])


def test_a_rung_between_evaluations_adds_a_point_and_changes_no_step(tiny_model, data_dir, tmp_path):
    options = settings(quantization="none", compute_dtype="float32", max_steps=10, eval_every=5, fused_kernels=False)
    whole = run_trial(RESUME_HPARAMS, options, tiny_model, data_dir, tmp_path / "whole")
    run_trial(RESUME_HPARAMS, options, tiny_model, data_dir, tmp_path / "parts", until_step=3)
    run_trial(RESUME_HPARAMS, options, tiny_model, data_dir, tmp_path / "parts", until_step=7)
    rest = run_trial(RESUME_HPARAMS, options, tiny_model, data_dir, tmp_path / "parts")
    assert rest["loss_curve"] == whole["loss_curve"]
    assert [p["step"] for p in rest["curve"]] == [3, 5, 7, 10]
    common = {p["step"]: p["eval_loss"] for p in whole["curve"]}
    assert {p["step"]: p["eval_loss"] for p in rest["curve"] if p["step"] in common} == common
    assert [(s["from_step"], s["to_step"]) for s in rest["segments"]] == [(0, 3), (3, 7), (7, 10)]


def test_a_state_saved_under_other_settings_is_refused(tiny_model, data_dir, tmp_path):
    options = settings(quantization="none", max_steps=6, eval_every=2)
    run_trial(HPARAMS, options, tiny_model, data_dir, tmp_path, until_step=2)
    with pytest.raises(ValueError, match=r"state/trial\.pt: saved by a trial with settings\.max_steps = 6, not 8;"):
        run_trial(HPARAMS, settings(quantization="none", max_steps=8), tiny_model, data_dir, tmp_path)
    resumed = run_trial(
        HPARAMS, settings(quantization="none", max_steps=6, log_every=1), tiny_model, data_dir, tmp_path
    )
    assert resumed["status"] == "ok" and resumed["segments"][0]["to_step"] == 2  # log_every shapes nothing


def test_select_best_reports_and_keeps_the_lowest_held_out_loss_along_the_curve(tiny_model, data_dir, tmp_path):
    """A high learning rate overfits: the held-out loss falls, then rises; best and last differ."""
    from peft import PeftModel

    from loratune.training.trainer import evaluate

    options = dict(quantization="none", compute_dtype="float32", max_steps=40, eval_every=4, fused_kernels=False)
    best = run_trial(HPARAMS, settings(keep_adapter=True, **options), tiny_model, data_dir, tmp_path / "best")
    last = run_trial(HPARAMS, settings(select="last", **options), tiny_model, data_dir, tmp_path / "last")
    assert best["status"] == last["status"] == "ok", (best["error"], last["error"])
    assert best["loss_curve"] == last["loss_curve"]  # selection trains nothing
    assert [(p["step"], p["eval_loss"]) for p in best["curve"]] == [(p["step"], p["eval_loss"]) for p in last["curve"]]
    curve = best["curve"]
    lowest = min(curve, key=lambda point: point["eval_loss"])
    assert lowest["step"] < 40 and curve[-1]["eval_loss"] > lowest["eval_loss"]  # the curve does rise
    assert (best["best_step"], best["eval_loss"], best["train_time"]) == (
        lowest["step"],
        lowest["eval_loss"],
        lowest["train_time"],
    )
    assert best["train_loss"] == pytest.approx(sum(best["loss_curve"][: lowest["step"]]) / lowest["step"])
    assert (last["best_step"], last["eval_loss"]) == (40, curve[-1]["eval_loss"])
    assert best["steps"] == last["steps"] == 40 and best["total_train_time"] >= best["train_time"]
    # The kept adapter is the best step's: evaluated afresh, it gives the reported loss.
    model = PeftModel.from_pretrained(
        load_base_model(tiny_model, quantization="none", dtype=torch.float32, device=CPU, gradient_checkpointing=False),
        tmp_path / "best" / "adapter",
    )
    tokenizer = load_tokenizer(tiny_model)
    eval_set = [e for e in tokenize_examples(tokenizer, read_prepared(data_dir).eval, 256) if e.loss_tokens]
    kept = evaluate(model, eval_set, 8, pad_id=tokenizer.pad_token_id, device=CPU, dtype=torch.float32)
    assert kept == pytest.approx(best["eval_loss"], rel=1e-5)
    step_file = tmp_path / "best" / "adapter" / ADAPTER_STEP_FILE
    assert json.loads(step_file.read_text()) == {"step": lowest["step"]}  # the step it holds, saved beside it


def test_the_log_of_a_job_gets_step_lines_and_no_progress_bar(tiny_model, data_dir, tmp_path, capfd):
    """stderr is a file in a job (and under pytest): no carriage-return redraws, only the step lines."""
    run_trial(HPARAMS, settings(max_steps=6, log_every=3), tiny_model, data_dir, tmp_path)
    err = capfd.readouterr().err
    assert "step 3/6 loss" in err and "step 6/6 loss" in err
    assert "\r" not in err and "train:" not in err


def test_the_held_out_split_is_rendered_with_the_chat_template_as_training_is(tiny_model, tmp_path):
    """dataset.template auto with a model that has a chat template: both splits use it."""
    import shutil

    from transformers import AutoTokenizer

    from loratune.training.trainer import prepare

    chat_model = tmp_path / "chat-model"
    shutil.copytree(tiny_model, chat_model)
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<s>' + m['role'] + '\n' + m['content'] + '</s>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}"
    )
    tokenizer.save_pretrained(chat_model)
    words = "garden river stone cloud window pencil candle forest planet rocket".split()
    source = tmp_path / "words.jsonl"
    rows = [{"instruction": "Reverse the word.", "input": w, "output": w[::-1]} for w in words]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prepare_dataset(DatasetSpec(path=str(source), eval_fraction=0.3), tmp_path / "data")
    data = read_prepared(tmp_path / "data")
    assert data.template == "auto" and data.eval

    trial = prepare(
        HPARAMS, settings(), str(chat_model), tmp_path / "data", tmp_path / "trial", 0,
        revision=None, trust_remote_code=False, until_step=None,
    )  # fmt: skip
    chat = tokenize_examples(tokenizer, data.eval, trial.settings.max_seq_length, "chat")
    assert trial.eval_set == chat and len(chat) == len(data.eval)
    assert all(tokenizer.decode(e.input_ids).startswith("<s>user\nReverse the word.\n\n") for e in trial.eval_set)
    learned = [tokenizer.decode([t for t in e.labels if t != -100]) for e in trial.eval_set]
    assert learned == [f"{e.completion}</s>" for e in data.eval]
