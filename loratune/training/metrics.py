"""What a qlora trial records in its metrics.json: one field per key, with its meaning.

``TrialMetrics`` is the single list of a trial's metrics: ``run_trial`` fills it, and the
fields marked ``objective`` are the numbers a study may name under ``objectives``
(``loratune.config.TRIAL_METRICS`` is derived from them). Adding a metric is one field here.
This module imports nothing heavy: the config check reads it on every Snakemake start.

With ``training.select: best`` the quality metrics (eval_loss, train_loss, final_train_loss,
train_time) are those of the evaluated step with the lowest eval_loss (``best_step``); with
``last``, of the last step reached. The accounting metrics (steps, total_train_time,
train_tokens, job_time, segments) always count everything the trial spent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Written into a kept adapter folder: {"step": the training step whose weights it holds}, to
# match against a record's best_step (an adapter belongs to the record that selected its step).
ADAPTER_STEP_FILE = "loratune_adapter.json"


def _metric(help: str, default: Any = None, *, objective: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "objective": objective})


def _record(help: str) -> Any:
    return field(default_factory=dict, metadata={"help": help, "objective": False})


def _series(help: str) -> Any:
    return field(default_factory=list, metadata={"help": help, "objective": False})


@dataclass
class TrialMetrics:
    """The metrics of one trial, in the order metrics.json lists them."""

    status: str = _metric("ok (trained to the budget or to until_step) or failed.", "failed")
    error: str | None = _metric("One line: the exception that failed the trial (null when ok).")
    train_loss: float | None = _metric(
        "Mean training loss per completion token over the steps up to the selected step.", objective=True
    )
    final_train_loss: float | None = _metric(
        "Mean training loss of the last 10% of the steps up to the selected step.", objective=True
    )
    eval_loss: float | None = _metric(
        "Held-out loss per completion token at the selected step (best or last, training.select).", objective=True
    )
    train_time: float | None = _metric(
        "Training seconds up to the selected step (evaluations excluded), summed over resumed segments.",
        objective=True,
    )
    job_time: float | None = _metric(
        "Wall seconds of the trial's jobs: loading, training, evaluating and saving, all segments.", objective=True
    )
    tokens_per_second: float | None = _metric(
        "Training tokens (padding excluded) per training second, over all steps done.", objective=True
    )
    train_tokens: int = _metric("Training tokens of all steps done (padding excluded).", 0, objective=True)
    eval_tokens: int = _metric("Completion tokens of the held-out split (what eval_loss averages over).", 0)
    steps: int = _metric(
        "Optimizer steps done so far (a trial stopped at a rung has fewer than max_steps).", 0, objective=True
    )
    max_steps: int | None = _metric("The trial's full budget of optimizer steps (the LR schedule spans it).")
    best_step: int | None = _metric("The step whose evaluation gave the objective values (see training.select).")
    total_train_time: float | None = _metric(
        "Training seconds of all steps done, summed over resumed segments (the cost spent).", objective=True
    )
    peak_memory_gib: float | None = _metric(
        "CUDA: the most memory torch allocated; CPU: the process's peak resident set (GiB).", objective=True
    )
    trainable_params: int | None = _metric("LoRA weights trained.", objective=True)
    total_params: int | None = _metric("All weights of the model, LoRA included.")
    n_train_examples: int = _metric("Training examples with at least one completion token.", 0)
    n_eval_examples: int = _metric("Held-out examples with at least one completion token.", 0)
    device: str | None = _metric("cpu or cuda.")
    gpu_name: str | None = _metric("The CUDA device's name (null on the CPU).")
    quantization: str | None = _metric("nf4 or none, as trained.")
    compute_dtype: str | None = _metric("Dtype of the matmuls, e.g. bfloat16.")
    gradient_checkpointing: bool | str | None = _metric("Whether any layer recomputed its activations.")
    fused_kernels: bool | None = _metric("Whether the trial trained through the fused path.")
    memory_plan: dict | None = _metric("The fused path's memory plan (null for the plain path).")
    started_at: str | None = _metric("UTC time the trial (its first segment) started.")
    hparams: dict = _record("The LoRA hyperparameters trained.")
    settings: dict = _record("The training settings, with the trial's overrides.")
    loss_curve: list = _series("Training loss of every step done.")
    curve: list = _series(
        "The learning curve: at each evaluated step, {step, eval_loss, train_loss (mean so far), "
        "train_time (training seconds so far)}."
    )
    segments: list = _series(
        "One entry per job that trained this trial (a resumed trial has several): {started_at, "
        "from_step, to_step, train_time, job_time}."
    )
    provenance: dict = _record("Model and data hashes, library versions, seed and host.")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


OBJECTIVE_METRICS = tuple(f.name for f in dataclasses.fields(TrialMetrics) if f.metadata["objective"])
