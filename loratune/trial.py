"""One trial job: parse the trial id, claim a device, evaluate, and record metrics.json.

A trial that fails (out of memory, NaN loss, any exception while evaluating) is *recorded* as
failed rather than raised, so the round's history still completes and the loop goes on; the
proposers never propose a failed point again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Mapping

from loratune import files, ledger
from loratune.config import Study

log = logging.getLogger("loratune")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _environment() -> dict:
    return {
        "hostname": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def _evaluate_benchmark(study: Study, hparams: dict, seed: int, until_step: int | None) -> dict:
    """The benchmark's answer after ``until_step`` steps (None: the full budget), with the
    learning curve and cost (steps, train_seconds) a real trial records."""
    from loratune.benchmarks import evaluate, problem_from_config
    from loratune.config import step_budget

    bench = study.config["benchmark"]
    budget = step_budget(study.config)
    metrics = evaluate(
        problem_from_config(bench),
        study.space,
        hparams,
        study.objectives,
        seed=seed,
        noise=bench["noise"],
        memory_limit_gib=bench["memory_limit_gib"],
        step=until_step or budget,
        max_steps=budget,
        select=study.config["training"].get("select", "best"),
    )
    return {"status": "ok", "error": None, **metrics}


TRIAL_LOCK = "trial.lock"


def _deadline(runtime_minutes: float | None, started: float) -> float | None:
    """When training must stop to leave the job time to evaluate and write its metrics.

    Only a Slurm job has a wall time that kills it; a local run has none, so it gets no deadline.
    The margin is max(60 s, 10 %) of the runtime, but never more than half of it, so a short
    runtime still trains.
    """
    if not runtime_minutes or not os.environ.get("SLURM_JOB_ID"):
        return None
    budget = runtime_minutes * 60
    return started + budget - min(max(60.0, 0.1 * budget), 0.5 * budget)


# Beside each metrics.json, a copy that Snakemake does not own: an orphan job of a killed head
# that finishes before the rerun starts has its metrics.json deleted by --rerun-incomplete, and
# the rerun's job restores the record from here instead of training the trial again.
FINISHED_RECORD = "finished.json"


def finished_record_path(metrics_path: str | Path) -> Path:
    return Path(metrics_path).with_name(FINISHED_RECORD)


def _finished_record(metrics_path: Path, trial_id: str) -> dict | None:
    """The metrics another job of this trial already wrote, if complete; else None."""
    try:
        record = ledger.read_metrics(metrics_path)
    except (OSError, ValueError):
        return None
    return record if record.get("trial_id") == trial_id and "status" in record else None


def record_key(study: Study, trial_id: str, seed: int, until_step: int | None) -> dict:
    """What a kept record must match to stand for this job: the trial, its seed, its rung and
    every config field that changes a trial's result (``study_state.trial_settings``)."""
    from loratune.study_state import trial_settings

    settings = json.dumps(trial_settings(study.config), sort_keys=True, default=str)
    return {
        "trial_id": trial_id,
        "seed": seed,
        "until_step": until_step,
        "settings_sha256": hashlib.sha256(settings.encode()).hexdigest(),
    }


def kept_record(metrics_path: str | Path, key: Mapping) -> dict | None:
    """The record kept beside ``metrics_path`` by a job with the same ``key``, if intact; else None."""
    try:
        kept = json.loads(finished_record_path(metrics_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(kept, dict) or kept.get("key") != dict(key) or not isinstance(kept.get("record"), dict):
        return None
    return kept["record"] if "status" in kept["record"] else None


@contextmanager
def _one_trainer(trial_dir: Path):
    """Hold the trial's lock (a file in its folder, so it holds across working directories and
    nodes sharing the file system) for the whole job; a duplicate job waits here. Every job of a
    trial (each rung of early stopping and the full budget) takes the one lock of the trial's
    folder, since they continue one saved training state."""
    from loratune.study_state import hold_lock

    lock_path = trial_dir / TRIAL_LOCK
    try:
        handle = hold_lock(lock_path, wait=False)
    except BlockingIOError as held:
        log.warning("%s; waiting for it to finish", held)
        handle = hold_lock(lock_path, wait=True)
    try:
        yield
    finally:
        handle.close()


def _evaluate_qlora(
    study: Study,
    hparams: dict,
    seed: int,
    model_path: str,
    data_dir: str,
    out_dir: Path,
    deadline: float | None,
    until_step: int | None,
    memory_budget_gib: float | None,
    worker_slot: str | None,
    log_path: str | None,
) -> dict:
    """``run_trial`` in this process, or in the trial worker of ``worker_slot``
    (``loratune.training.worker``: the same call in a process that keeps the base model loaded)."""
    training = dict(study.config["training"])
    if training.get("memory_budget_gib") is None and memory_budget_gib is not None:
        training["memory_budget_gib"] = memory_budget_gib  # this trial's share of a shared GPU
    model = study.config["model"]
    kwargs = dict(
        hparams=hparams,
        settings=training,
        model_path=model_path,
        data_dir=str(data_dir),
        output_dir=str(out_dir),
        seed=seed,
        revision=model.get("revision"),
        trust_remote_code=model.get("trust_remote_code", False),
        deadline=deadline,
        until_step=until_step,
    )
    if worker_slot is None:
        from loratune.training import run_trial

        return run_trial(**kwargs)
    from loratune.devices import default_lock_dir
    from loratune.training.worker import run_in_worker

    resources = study.config["resources"]
    return run_in_worker(
        kwargs,
        slot=worker_slot,
        lock_dir=default_lock_dir(),
        log_path=log_path,
        idle_seconds=resources["worker_idle_seconds"],
    )


def _budget_share(study: Study, share) -> float | None:
    """The fused path's memory budget of a trial on a shared GPU: its share of the GPU (None:
    alone, the planner's default of 90% of the GPU)."""
    from loratune import packing

    if share.slot is None or share.trials_per_gpu == 1:
        return None
    total = packing.gpu_memory_gib(share.device)
    return None if total is None else packing.MEMORY_SHARE * total / share.trials_per_gpu


def _worker_slot(study: Study, share) -> str | None:
    """The slot whose trial worker trains this trial, or None: train in this process.
    ``resources.trial_worker``: true, false, or auto (a worker on a GPU claimed locally or in a
    head's Slurm allocation; on the CPU one trial already uses every core, and a Slurm job of one
    trial ends with it)."""
    from loratune.devices import slurm_placed

    setting = study.config["resources"]["trial_worker"]
    if study.config["backend"] != "qlora" or setting is False:
        return None
    if setting == "auto" and (share.device is None or slurm_placed()):
        return None
    name = _worker_slot_name(share.device, share.slot)
    return f"{name}.job{os.environ['SLURM_JOB_ID']}" if slurm_placed() else name


def _lone_slot(device: str) -> str:
    return f"gpu{device}"


def _worker_slot_name(device: str | None, slot: int | None) -> str:
    name = "cpu" if device is None else _lone_slot(device)
    return name if slot is None else f"{name}.slot{slot}"


def retire_workers_in_the_way(
    device: str | None, slot: int | None, own_slot: str | None, lock_dir: Path | None = None
) -> list[int]:
    """Before a trial trains on the local GPU ``device`` it just claimed (``slot``: its slot there,
    None: the GPU to itself), end the idle trial workers that hold memory there and that it will
    not use (``worker.retire_workers``; their pids). A trial alone on the GPU ends every other
    worker of the GPU; a sharing trial the GPU's lone-trial worker and another worker of its own
    slot (an older loratune's). The claim makes them idle: a lone trial's claim excludes every
    sharer of the GPU, a sharer's every lone trial and its slot's other holders."""
    from loratune.devices import default_lock_dir, slurm_placed
    from loratune.training.worker import retire_workers, socket_path_for

    if device is None or slurm_placed():
        return []
    lock_dir = lock_dir if lock_dir is not None else default_lock_dir()
    lone, mine = _lone_slot(device), _worker_slot_name(device, slot)

    def in_the_way(name: str) -> bool:
        return name == lone or (name.startswith(f"{lone}.slot") if slot is None else name == mine)

    keep = socket_path_for(own_slot, lock_dir) if own_slot is not None else None
    return retire_workers(lock_dir, in_the_way, keep=keep)


@contextmanager
def claim_gpus_alone(count: int) -> Iterator[str | None]:
    """``devices.claim_gpu(count)`` for a job that has its GPUs to itself (a trial of several GPUs,
    an evaluation), the idle trial workers holding memory there retired first; yields the ids."""
    from loratune.devices import claim_gpu

    with claim_gpu(count) as devices:
        for device in (devices or "").split(","):
            retire_workers_in_the_way(device or None, None, None)
        yield devices


def retire_idle_workers(lock_dir: Path | None = None) -> list[int]:
    """At the end of a run (the workflow's onsuccess and onerror): end this user's idle trial
    workers on this machine (their pids), so that nothing of a finished study keeps running and
    holding memory for ``worker_idle_seconds``. A worker that is training (another study's) says
    busy and is left alone; an idle one of another study is started again by its next trial."""
    from loratune.devices import default_lock_dir
    from loratune.training.worker import retire_workers

    return retire_workers(lock_dir if lock_dir is not None else default_lock_dir(), lambda slot: True)


def keep_rung_adapter(adapter: Path, target: Path) -> None:
    """Give a rung's record (``step<k>/``) the adapter its rung selected, as hard links (a copy
    where links fail): the trial folder's adapter moves on when the trial is promoted, and the
    rung's must stay to be evaluated again (``snakemake -R evaluate_trial``). The trainer
    replaces an adapter folder, never its files, so the links keep the rung's weights."""
    import shutil
    import uuid

    if not (adapter / "adapter_config.json").is_file():
        return  # no adapter kept (training.keep_adapter false, or the trial failed)
    scratch = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        shutil.copytree(adapter, scratch, copy_function=_link_or_copy)
        shutil.rmtree(target, ignore_errors=True)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _link_or_copy(source: str, target: str) -> None:
    import shutil

    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def run_trial_job(
    study: Study,
    trial_id: str,
    seed: int,
    metrics_path: str | Path,
    model_path: str | None = None,
    data_dir: str | None = None,
    runtime_minutes: float | None = None,
    until_step: int | None = None,
    trial_dir: str | Path | None = None,
    log_path: str | Path | None = None,
) -> dict:
    """Evaluate one trial with the study's backend and write its metrics.json atomically.

    ``log_path``: the job's log file, where a trial worker appends the trial's own lines.

    ``runtime_minutes`` is the job's wall-time limit: training stops early enough before it to
    record the trial as failed ("time limit") instead of being killed without a record.
    ``until_step``: train only up to this rung (early stopping), keeping the training state in
    ``trial_dir`` (default: the folder of ``metrics_path``) so that the next rung continues it.
    """

    metrics_path = Path(metrics_path)
    trial_dir = Path(trial_dir) if trial_dir is not None else metrics_path.parent
    full = _finished_record(trial_dir / "metrics.json", trial_id) if until_step is not None else None
    if full is not None and full.get("status") == "ok":
        # Another arm already trained this trial's whole budget: no state is left to continue
        # from, and the trial folder keeps that run's adapter, which its metrics describe. This
        # rung trains again from step 0 in its own folder rather than overwrite it.
        trial_dir = metrics_path.parent
    with _one_trainer(trial_dir):
        finished = _finished_record(metrics_path, trial_id)
        if finished is not None:
            log.info(
                "trial %s was finished by another job (%s); keeping its metrics", trial_id, finished.get("hostname")
            )
            return finished
        key = record_key(study, trial_id, seed, until_step)
        kept = kept_record(metrics_path, key)
        if kept is not None:
            log.info(
                "trial %s was finished by an earlier job (%s, %s); restoring its metrics from %s",
                trial_id,
                kept.get("hostname"),
                kept.get("finished_at"),
                finished_record_path(metrics_path),
            )
            files.atomic_write_json(metrics_path, kept)
            return kept
        record = _train_and_record(
            study, trial_id, seed, metrics_path, model_path, data_dir, runtime_minutes, until_step, trial_dir, log_path
        )
        if until_step is not None and trial_dir != metrics_path.parent:
            keep_rung_adapter(trial_dir / "adapter", metrics_path.parent / "adapter")
        files.atomic_write_json(finished_record_path(metrics_path), {"key": key, "record": record})
        return record


def _train_and_record(
    study: Study,
    trial_id: str,
    seed: int,
    metrics_path: Path,
    model_path: str | None,
    data_dir: str | None,
    runtime_minutes: float | None,
    until_step: int | None,
    trial_dir: Path,
    log_path: str | Path | None,
) -> dict:
    from loratune.devices import claim_gpu_share
    from loratune.packing import study_trials_per_gpu
    from loratune.training.worker import TrialRaised, WorkerDied

    hparams = study.space.parse_trial_id(trial_id)
    started_at, started = _now(), time.perf_counter()
    deadline = _deadline(runtime_minutes, time.time())
    gpus = study.config["resources"]["gpus_per_trial"] if study.config["backend"] == "qlora" else 0
    trials_per_gpu, why = study_trials_per_gpu(study.config, model_path)
    claim = claim_gpu_share(trials_per_gpu) if gpus == 1 else claim_gpus_alone(gpus)
    with claim as share:
        device = share.device if gpus == 1 else share
        sharing, worker_slot = {}, None
        if gpus == 1:
            sharing = {"trials_per_gpu": share.trials_per_gpu, "gpu_trials_at_start": share.trials_at_start}
            log.info("up to %d trial(s) per GPU (%s); %d on this one now", trials_per_gpu, why, share.trials_at_start)
            worker_slot = _worker_slot(study, share)
            retire_workers_in_the_way(share.device, share.slot, worker_slot)
        log.info("trial %s (seed %d) on %s: %s", trial_id, seed, device or "cpu", study.space.describe(hparams))
        try:
            if study.config["backend"] == "benchmark":
                metrics = _evaluate_benchmark(study, hparams, seed, until_step)
            else:
                metrics = _evaluate_qlora(
                    study,
                    hparams,
                    seed,
                    model_path,
                    data_dir,
                    trial_dir,
                    deadline,
                    until_step,
                    memory_budget_gib=_budget_share(study, share) if gpus == 1 else None,
                    worker_slot=worker_slot,
                    log_path=log_path,
                )
        except WorkerDied:
            raise  # as if this job's own process had died: the job fails, and is retried as one
        except Exception as error:  # a crashed trial is a result, not a crash of the study
            log.error("trial %s failed:\n%s", trial_id, traceback.format_exc())
            reason = str(error) if isinstance(error, TrialRaised) else f"{type(error).__name__}: {error}"
            metrics = {"status": "failed", "error": reason}
        environment = {**_environment(), **sharing}
    record = {
        **metrics,
        **hparams,
        "trial_id": trial_id,
        "seed": seed,
        "backend": study.config["backend"],
        "started_at": metrics.get("started_at", started_at),
        "finished_at": _now(),
        "job_time": metrics.get("job_time", time.perf_counter() - started),
        **environment,
    }
    for name in study.objectives:
        record.setdefault(name, None)
    # The training seconds this trial consumed (a stopped or resumed one included), for the cost axis.
    curve = record.get("curve") or []
    record.setdefault(
        "train_seconds",
        record.get("total_train_time") or (curve[-1].get("train_time") if curve else record.get("train_time")),
    )
    files.atomic_write_json(metrics_path, record)
    if record["status"] != "ok":
        log.warning("trial %s recorded as failed: %s", trial_id, record.get("error"))
    return record
