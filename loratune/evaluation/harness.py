"""Evaluate a trained adapter with lm-evaluation-harness, offline, and record what it scored.

The evaluation runs in its own process (the ``evaluate_trial`` job), after training: it loads
the base model unquantized (the converted bf16 weights; float32 on the CPU) with the adapter on
top. That keeps it clear of the CPU bitsandbytes trap (a no-grad forward of a 4-bit model that
is trained afterwards) and means an adapter trained on NF4 weights is scored on the 16-bit
weights they were quantized from: the small quantization gap is the same for every trial.
The job sets ``OFFLINE_ENVIRONMENT`` before anything imports the Hugging Face libraries (they
read it at import), so nothing an evaluation loads can reach the network.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

from loratune.evaluation.tasks import task_config_fingerprint, write_builtin_tasks
from loratune.training.data import read_prepared, resolve_template

# Every library lm-eval loads through must stay off the network (set by the evaluate_trial job).
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
}


def metric_column(task: str, metric: str) -> str:
    """The name of a task metric as an objective and a trials-table column."""
    return f"lm_eval.{task}.{metric}"


def parse_metric_column(name: str) -> tuple[str, str] | None:
    """(task, metric) of an ``lm_eval.<task>.<metric>`` name, else None."""
    prefix, _, rest = name.partition(".")
    task, _, metric = rest.rpartition(".")
    return (task, metric) if prefix == "lm_eval" and task and metric else None


def _scores(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    # lm-eval keys a score "metric,filter" beside "metric_stderr,filter"; the filter of
    # loratune's tasks (and most) is "none", which the column name leaves out.
    scores: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, _, filtered = key.partition(",")
            if not filtered or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            name = metric if filtered == "none" else f"{metric}_{filtered}"
            scores.setdefault(task, {})[name] = float(value)
    return scores


def evaluate_adapter(
    model_path: str | Path,
    adapter_dir: str | Path,
    data_dir: str | Path,
    evaluation: Mapping[str, Any],
    *,
    device: str = "auto",
) -> dict[str, Any]:
    """Score ``adapter_dir`` (on ``model_path``) on ``evaluation["tasks"]``; return the record.

    ``evaluation`` is the config section: ``tasks``, ``include_path`` (a folder of the user's
    lm-eval task files), ``limit`` (documents per task; null: all) and ``batch_size``. The record
    holds ``status``, ``lm_eval`` ({task: {metric: value}}), ``lm_eval_version``,
    ``task_config_sha256``, ``template`` and ``eval_time``. It never raises for a failed
    evaluation: that comes back as ``status: failed`` with the error, and the study goes on.
    """
    started = time.perf_counter()
    record: dict[str, Any] = {"status": "failed", "error": None, "lm_eval": {}, "lm_eval_version": None}
    try:
        record.update(_run(Path(model_path), Path(adapter_dir), Path(data_dir), evaluation, device))
        record["status"] = "ok"
    except Exception as error:  # noqa: BLE001 - any failure of one evaluation is recorded, not raised
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = traceback.format_exc()
    record["eval_time"] = time.perf_counter() - started
    return record


def _run(model_path: Path, adapter_dir: Path, data_dir: Path, evaluation: Mapping[str, Any], device: str) -> dict:
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: no saved adapter (training.keep_adapter must be true)")
    data = read_prepared(data_dir)
    template = resolve_template(data.template, AutoTokenizer.from_pretrained(str(model_path)))
    chat = template == "chat"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="loratune-tasks-") as scratch:
        builtin = write_builtin_tasks(evaluation["tasks"], data.eval, scratch, chat=chat)
        include = [scratch] + (
            [str(Path(evaluation["include_path"]).expanduser())] if evaluation["include_path"] else []
        )
        output = lm_eval.simple_evaluate(
            model="hf",
            model_args={
                "pretrained": str(model_path),
                "peft": str(adapter_dir),
                "dtype": "bfloat16" if device.startswith("cuda") else "float32",
            },
            tasks=list(evaluation["tasks"]),
            batch_size=evaluation["batch_size"],
            device=device,
            limit=evaluation["limit"],
            apply_chat_template=chat,
            task_manager=TaskManager(include_path=include, include_defaults=False),
            log_samples=False,
            bootstrap_iters=0,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
        )
    fingerprint = {**task_config_fingerprint(evaluation), "builtin": builtin, "template": template}
    return {
        "lm_eval": _scores(output["results"]),
        "lm_eval_version": lm_eval.__version__,
        "task_config_sha256": hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest(),
        "template": template,
        "n_documents": {task: int(n["effective"]) for task, n in output.get("n-samples", {}).items()},
    }


def flatten(record: Mapping[str, Any], objectives: Mapping[str, str]) -> dict[str, float]:
    """Every metric of an evaluation record by column name (``lm_eval.<task>.<metric>``), and NaN
    for an lm-eval objective that a failed evaluation lacks (the proposers treat that trial as failed)."""
    values = {
        metric_column(task, metric): value
        for task, metrics in (record.get("lm_eval") or {}).items()
        for metric, value in metrics.items()
        if record.get("status") == "ok"
    }
    for name in objectives:
        if parse_metric_column(name) is not None:
            value = values.get(name)
            values[name] = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan
    return values


def adapter_of(metrics_path: str | Path, record: Mapping[str, Any]) -> Path:
    """The saved adapter that the trial record ``metrics_path`` describes.

    A full-budget record's adapter is beside it. A rung's (``step<k>/metrics.json``, early
    stopping) is beside it too (the rung job keeps it there, ``trial.keep_rung_adapter``); a
    rung record written before that falls back to the trial folder's, where the rung jobs train,
    unless the trial trained on past the rung and replaced it, which its step file
    (``ADAPTER_STEP_FILE``) tells.
    """
    from loratune.training.metrics import ADAPTER_STEP_FILE

    metrics_path = Path(metrics_path)
    places = [metrics_path.parent / "adapter"]
    if re.fullmatch(r"step\d+", metrics_path.parent.name):
        places.append(metrics_path.parent.parent / "adapter")
    adapter = next((place for place in places if (place / "adapter_config.json").is_file()), None)
    if adapter is None:
        raise FileNotFoundError(f"{places[-1]}: no saved adapter (training.keep_adapter must be true)")
    step_file = adapter / ADAPTER_STEP_FILE
    if step_file.is_file() and record.get("best_step") is not None:
        step = json.loads(step_file.read_text(encoding="utf-8"))["step"]
        if step != record["best_step"]:
            raise ValueError(
                f"{adapter} holds step {step}, not step {record['best_step']} that {metrics_path} selected: "
                f"the trial trained on after it, and that adapter is gone"
            )
    return adapter


def evaluate_trial(
    metrics_path: str | Path,
    model_path: str | Path,
    data_dir: str | Path,
    evaluation: Mapping[str, Any],
    output: str | Path,
    *,
    device: str = "auto",
    gpus: int = 0,
) -> dict[str, Any]:
    """Evaluate the adapter of the trial record ``metrics_path`` (a full-budget metrics.json, or a
    rung's where the trial stopped; see ``adapter_of``) and write its evaluation.json to
    ``output``. A failed trial has no adapter worth scoring: its evaluation is recorded as failed
    without running lm-eval, as is one whose adapter is missing. ``gpus``: the GPUs the job asked
    for, claimed as a trial alone on its GPUs claims them (``trial.claim_gpus_alone``: the idle trial
    workers holding memory there retire first), so that an evaluation never runs on a GPU a trial holds."""
    from loratune import files, ledger
    from loratune.trial import claim_gpus_alone

    trial = ledger.read_metrics(metrics_path)
    if (trial.get("status") or "ok") != "ok":
        record = {"status": "failed", "error": f"the trial did not train ({trial.get('status')})", "lm_eval": {}}
    else:
        try:
            adapter = adapter_of(metrics_path, trial)
        except (FileNotFoundError, ValueError) as error:
            record = {"status": "failed", "error": f"{type(error).__name__}: {error}", "lm_eval": {}}
        else:
            with claim_gpus_alone(gpus) as gpu:
                record = {
                    **evaluate_adapter(model_path, adapter, data_dir, evaluation, device=device),
                    "adapter": str(adapter),
                    "gpu": gpu,
                }
    # Which record it scored: update_history joins it to that trial's row.
    record = {**{k: trial[k] for k in ("trial_id", "best_step") if trial.get(k) is not None}, **record}
    files.atomic_write_json(output, record)
    return record
