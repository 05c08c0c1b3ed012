"""A study's files never lie: changed configs, lost or corrupt files, failed trials, two heads.

Each test reruns a finished benchmark study (built once, copied per test with its timestamps)
the way a user would, and checks what the rerun did to the files.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, SNAKEMAKE, load_test_config, run_workflow, write_config
from loratune.ledger import read_table

STUDY = "reliable"
CONFIG = {
    "study": STUDY,
    "seeds": [0],
    "backend": "benchmark",
    # Trials of lora_surrogate whose modelled memory exceeds 30 GiB fail as out of memory.
    "benchmark": {"problem": "lora_surrogate", "memory_limit_gib": 30},
    "objectives": {"eval_loss": "min", "train_time": "min"},
    "search_space": {
        "lora_rank": {"type": "int", "low": 4, "high": 256, "step": 4},
        "lora_alpha": {"type": "choice", "values": [4, 8, 16, 32, 64, 128, 256]},
        "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
        "lora_dropout": {"type": "fixed", "value": 0.05},
    },
    "pilot": {"design": "lhs", "n": 4},
    "arms": {"random": {"proposer": "random", "rounds": 2, "batch_size": 2}},
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("finished")
    run_workflow(workdir, write_config(workdir / "config.yaml", CONFIG))
    return workdir


def _copy_of(finished: Path, workdir: Path, name: str) -> Path:
    """A copy of a finished study's working directory (timestamps kept), as its own."""
    shutil.copytree(finished, workdir, symlinks=True)
    (workdir / "results" / name / "head.lock").unlink(missing_ok=True)
    return workdir


@pytest.fixture
def study(finished, tmp_path) -> Path:
    return _copy_of(finished, tmp_path / "study", STUDY)


def _out(workdir: Path) -> Path:
    return workdir / "results" / STUDY


def _mtimes(workdir: Path, pattern: str) -> dict[str, int]:
    return {
        str(p.relative_to(workdir)): p.stat().st_mtime_ns
        for p in sorted(_out(workdir).glob(pattern))
        if p.name != "head.lock"
    }


def _rerun(workdir: Path, config: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_workflow(workdir, write_config(workdir / "config.yaml", config), *args, check=check)


def _trained(result: subprocess.CompletedProcess) -> list[str]:
    """The metrics.json files a run's train_trial jobs wrote."""
    lines = (result.stdout + result.stderr).splitlines()
    return sorted(
        lines[i + 1].split("output:")[1].strip()
        for i, line in enumerate(lines)
        if line.strip().endswith("rule train_trial:") and i + 1 < len(lines) and "output:" in lines[i + 1]
    )


def _changed(config: dict, change) -> dict:
    config = copy.deepcopy(config)
    change(config)
    return config


# ---- a changed config --------------------------------------------------------------------
def test_the_resolved_config_is_recorded_at_the_start(finished):
    stored = yaml.safe_load((_out(finished) / "config.resolved.yaml").read_text())
    assert stored["pilot"] == {"design": "lhs", "n": 4} and stored["benchmark"]["noise"] == 0.0


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda c: c["pilot"].update(n=6), ["pilot.n: 4 -> 6"]),
        (lambda c: c["arms"]["random"].update(batch_size=3), ["arms.random.batch_size: 2 -> 3"]),
        (
            lambda c: c["benchmark"].update(problem="zdt1", memory_limit_gib=None),
            ['benchmark.problem: "lora_surrogate" -> "zdt1"', "benchmark.memory_limit_gib: 30 -> null"],
        ),
        (lambda c: c["objectives"].update(eval_loss="max"), ['objectives.eval_loss: "min" -> "max"']),
        # Adding a parameter is refused here, not deep in propose ("history: no column ...").
        (
            lambda c: c["search_space"].update(lora_dropout={"type": "float", "low": 0.0, "high": 0.2}),
            ['search_space.lora_dropout.type: "fixed" -> "float"', "search_space.lora_dropout.high: (absent) -> 0.2"],
        ),
    ],
    ids=["pilot.n", "batch_size", "problem", "direction", "new-parameter"],
)
def test_a_result_changing_config_is_refused_with_its_differences(study, change, expected):
    before = _mtimes(study, "**/*.*")
    result = _rerun(study, _changed(CONFIG, change), check=False)
    assert result.returncode != 0
    for line in expected:
        assert f"  {line}\n" in result.stderr, result.stderr
    assert "new name (study: ...)" in result.stderr and "--config recompute=true" in result.stderr
    assert "Nothing to be done" not in result.stdout + result.stderr
    assert _mtimes(study, "**/*.*") == before  # refused before any job


def test_changes_that_cannot_alter_results_are_allowed(study):
    config = _changed(CONFIG, lambda c: c.update(resources={"runtime": 5, "mem_mb": 500, "cpus_per_trial": 2}))
    result = _rerun(study, config)
    assert "Nothing to be done" in result.stdout + result.stderr
    assert yaml.safe_load((_out(study) / "config.resolved.yaml").read_text())["resources"]["runtime"] == 5


def test_recompute_redoes_exactly_what_an_arm_change_invalidates(study):
    pilot = _mtimes(study, "seed0/pilot/round0/*") | _mtimes(study, "seed0/trials/*/metrics.json")
    config = _changed(CONFIG, lambda c: c["arms"]["random"].update(batch_size=3))
    result = _rerun(study, config, "--config", "recompute=true")
    assert "recompute: moved" in result.stderr
    # The pilot and every trained trial stay; the arm's rounds are proposed again.
    assert {k: v for k, v in _mtimes(study, "seed0/pilot/round0/*").items()} == {
        k: v for k, v in pilot.items() if "/pilot/" in k
    }
    for path, mtime in pilot.items():
        if "/trials/" in path and (study / path).exists():
            assert (study / path).stat().st_mtime_ns == mtime
    trials = pd.read_csv(_out(study) / "trials.tsv", sep="\t")
    assert (trials.arm == "random").sum() == 6 and (trials.arm == "pilot").sum() == 4
    kept = list((_out(study) / "superseded").glob("*/seed0/random/round1/proposals.tsv"))
    assert len(kept) == 1 and len(pd.read_csv(kept[0], sep="\t")) == 2
    again = _rerun(study, config)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_recompute_after_a_trial_setting_change_starts_over_and_keeps_the_old_results(study):
    config = _changed(CONFIG, lambda c: c["benchmark"].update(noise=0.1))
    _rerun(study, config, "--config", "recompute=true")
    trials = pd.read_csv(_out(study) / "trials.tsv", sep="\t")
    assert len(trials) == 8
    old = list((_out(study) / "superseded").glob("*/trials.tsv"))
    assert len(old) == 1 and not pd.read_csv(old[0], sep="\t").eval_loss.equals(trials.eval_loss)


# ---- lost or corrupt files -----------------------------------------------------------------
def test_a_lost_metrics_file_retrains_and_a_truncated_one_is_restored_from_its_kept_record(study):
    out = _out(study)
    pilot_trial = pd.read_csv(out / "seed0/pilot/round0/proposals.tsv", sep="\t").trial_id[0]
    arm_trial = pd.read_csv(out / "seed0/random/round2/proposals.tsv", sep="\t").trial_id[0]
    lost, truncated = (out / f"seed0/trials/{t}/metrics.json" for t in (pilot_trial, arm_trial))
    lost.unlink()
    (lost.parent / "finished.json").unlink()  # its kept record too: it must train again
    original = json.loads(truncated.read_text())
    truncated.write_text(truncated.read_text()[:40])
    others = {
        k: v
        for k, v in _mtimes(study, "seed0/trials/*/metrics.json").items()
        if pilot_trial not in k and arm_trial not in k
    }
    table = (out / "trials.tsv").stat().st_mtime_ns

    result = _rerun(study, CONFIG)
    assert _trained(result) == sorted(str(p.relative_to(study)) for p in (lost, truncated))
    assert f"{lost.relative_to(study)}: missing; retraining that trial" in result.stderr
    assert f"{truncated.relative_to(study)}: not valid JSON" in result.stderr
    # A truncated metrics.json whose kept record (finished.json) is intact is restored, not retrained.
    assert f"restoring it from {truncated.with_name('finished.json').relative_to(study)} (no training)" in result.stderr
    assert json.loads(truncated.read_text()) == original
    assert "restoring its metrics from" in (truncated.parent / "train.log").read_text()
    assert {k: v for k, v in _mtimes(study, "seed0/trials/*/metrics.json").items() if k in others} == others
    assert json.loads(lost.read_text())["trial_id"] == pilot_trial
    assert (out / "trials.tsv").stat().st_mtime_ns > table
    assert len(pd.read_csv(out / "trials.tsv", sep="\t")) == 8
    again = _rerun(study, CONFIG)
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_lost_or_truncated_history_is_rebuilt_without_training(study, damage):
    history = _out(study) / "seed0/random/round1/history.tsv"
    if damage == "delete":
        history.unlink()
    else:
        history.write_text("".join(history.read_text().splitlines(keepends=True)[:3])[:-20])
    result = _rerun(study, CONFIG)
    assert _trained(result) == []
    assert f"{history.relative_to(study)}: " in result.stderr
    assert len(pd.read_csv(history, sep="\t")) == 6
    assert len(pd.read_csv(_out(study) / "trials.tsv", sep="\t")) == 8


# ---- failed trials -------------------------------------------------------------------------
def test_retry_retrains_exactly_the_failed_trials_of_a_reason(study):
    out = _out(study)
    records = {p: json.loads(p.read_text()) for p in out.glob("seed0/trials/*/metrics.json")}
    failed = sorted(str(p.relative_to(study)) for p, r in records.items() if r["status"] == "failed")
    assert failed and len(failed) < len(records)
    assert all(r["error"].startswith("SimulatedOutOfMemory") for r in records.values() if r["status"] == "failed")

    nothing = _rerun(study, CONFIG, "--config", "retry_failed=TimeLimitReached")
    assert _trained(nothing) == [] and "no recorded failed trial matches" in nothing.stderr
    result = _rerun(study, CONFIG, "--config", "retry_failed=SimulatedOutOfMemory")
    assert _trained(result) == failed
    assert all((out / "superseded").glob(f"*/{Path(f).relative_to('results', STUDY)}") for f in failed)
    assert len(pd.read_csv(out / "trials.tsv", sep="\t")) == 8


# ---- one head per study, one trainer per trial -----------------------------------------------
def test_a_second_working_directory_on_the_same_results_dir_is_refused(study, tmp_path):
    from loratune.study_state import hold_lock

    other = tmp_path / "other"
    other.mkdir()
    lock = hold_lock(_out(study) / "head.lock", wait=True)  # as the first head holds it
    try:
        config = {**CONFIG, "results_dir": str(study / "results")}
        result = _rerun(other, config, check=False)
    finally:
        lock.close()
    assert result.returncode != 0
    assert f"study {STUDY!r} is being run by another head" in result.stderr
    assert f'"pid": {os.getpid()}' in result.stderr
    assert _trained(result) == []


def test_a_duplicate_trial_job_waits_and_keeps_the_finished_metrics(tmp_path):
    """The second trainer of a trial waits on the trial's lock, then finds it done."""
    from loratune.config import validate_config
    from loratune.trial import run_trial_job

    study = validate_config(copy.deepcopy(CONFIG))
    trial_id = study.space.trial_id({"lora_rank": 8, "lora_alpha": 16, "learning_rate": 1e-4})
    metrics = tmp_path / "trials" / trial_id / "metrics.json"
    script = (
        "import sys, time, copy\n"
        "from loratune.study_state import hold_lock\n"
        "from loratune.files import atomic_write_json\n"
        f"lock = hold_lock({str(metrics.parent / 'trial.lock')!r}, wait=True)\n"
        "print('locked', flush=True)\n"
        "time.sleep(3)\n"
        f"atomic_write_json({str(metrics)!r}, {{'trial_id': {trial_id!r}, 'status': 'ok', 'eval_loss': 1.5}})\n"
    )
    first = subprocess.Popen(
        [str(Path(SNAKEMAKE).with_name("python")), "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert first.stdout.readline().strip() == "locked"
    started = time.monotonic()
    record = run_trial_job(study, trial_id, 0, metrics)
    assert time.monotonic() - started > 1.5  # it waited for the first trainer
    assert first.wait(timeout=30) == 0
    assert record == {"trial_id": trial_id, "status": "ok", "eval_loss": 1.5}
    assert json.loads(metrics.read_text())["eval_loss"] == 1.5


def test_a_trial_whose_metrics_were_deleted_is_restored_only_for_the_same_settings(tmp_path):
    """What --rerun-incomplete leaves of a finished orphan: its finished.json without metrics.json.
    The same trial, seed and settings restore it; another result-changing setting trains."""
    from loratune.config import validate_config
    from loratune.trial import run_trial_job

    study = validate_config(copy.deepcopy(CONFIG))
    trial_id = study.space.trial_id({"lora_rank": 8, "lora_alpha": 16, "learning_rate": 1e-4})
    metrics = tmp_path / "trials" / trial_id / "metrics.json"
    first = run_trial_job(study, trial_id, 0, metrics)
    assert json.loads(metrics.with_name("finished.json").read_text())["record"] == json.loads(metrics.read_text())
    metrics.unlink()
    assert run_trial_job(study, trial_id, 0, metrics) == first == json.loads(metrics.read_text())
    metrics.unlink()
    noisy = validate_config(_changed(CONFIG, lambda c: c["benchmark"].update(noise=0.5)))
    assert run_trial_job(noisy, trial_id, 0, metrics)["eval_loss"] != first["eval_loss"]
    metrics.unlink()
    assert run_trial_job(study, trial_id, 1, metrics)["seed"] == 1  # another seed trains too


def _kill_the_head_while_a_trial_trains(tmp_path: Path, max_steps: int) -> tuple[list[str], dict, Path]:
    """A one-trial QLoRA study whose head is killed (kill -9) once its trial trains: the
    Snakemake command, its environment and the trial's train.log; the trial job goes on."""
    from tiny_models import build_tiny_llama

    config = yaml.safe_load((REPO / "tests/configs/tiny_qlora.yaml").read_text())
    config.update(
        study="killed",
        search_space={
            **config["search_space"],
            "learning_rate": {"type": "fixed", "value": 1e-3},
            "lora_rank": {"type": "choice", "values": [4]},
        },
        pilot={"design": "grid", "n": 1},
        arms={"random": {"proposer": "random", "rounds": 0, "batch_size": 1}},
    )
    config["training"].update(max_steps=max_steps)
    config["model"]["name"] = str(build_tiny_llama(tmp_path / "tiny-llama"))
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": f"{i}"}) + "\n" for i in range(20))
    )
    config["dataset"]["path"] = str(data)
    configfile = write_config(tmp_path / "config.yaml", config)
    command = [
        SNAKEMAKE,
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(tmp_path),
        "--configfile",
        str(configfile),
        "--profile",
        str(REPO / "profiles/local"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    head = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trials = tmp_path / "results" / "killed" / "seed0" / "trials"
    deadline = time.monotonic() + 300
    while not any("trial " in p.read_text() for p in trials.glob("*/train.log")):
        assert time.monotonic() < deadline and head.poll() is None, "the trial never started"
        time.sleep(0.2)
    os.kill(head.pid, signal.SIGKILL)
    head.wait()
    (log,) = trials.glob("*/train.log")
    assert not (log.parent / "metrics.json").exists(), "the trial finished before the head was killed"
    subprocess.run([*command, "--unlock"], cwd=tmp_path, env=env, check=True, capture_output=True)
    return command, env, log


def test_a_killed_head_does_not_train_the_orphan_trial_twice(tmp_path):
    """kill -9 of the head while a trial trains, --unlock, rerun: the rerun's job of that trial
    waits for the orphan and keeps its metrics instead of training beside it."""
    command, env, log = _kill_the_head_while_a_trial_trains(tmp_path, max_steps=400)
    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    text = log.read_text()
    assert "waiting for it to finish" in text and "was finished by another job" in text
    assert "on cpu" not in text  # the rerun's job never started training
    assert json.loads((log.parent / "metrics.json").read_text())["status"] in ("ok", "failed")


def test_an_orphan_trial_that_finished_before_the_rerun_is_restored_not_retrained(tmp_path):
    """kill -9 of the head while a trial trains, the orphan finishes, then the rerun: no second
    training. Where Snakemake takes the job for incomplete (--rerun-incomplete deletes the
    orphan's metrics.json), the rerun's job restores the record from the trial's finished.json;
    a local job process of Snakemake 9 records its own completion, and the rerun keeps it."""
    command, env, log = _kill_the_head_while_a_trial_trains(tmp_path, max_steps=150)
    metrics = log.parent / "metrics.json"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and (log.parent / "finished.json").exists()):
        assert time.monotonic() < deadline, "the orphan trial never finished"
        time.sleep(0.2)
    time.sleep(1)  # the orphan's job exits after writing its record
    orphan = json.loads(metrics.read_text())
    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    text = log.read_text()
    if "rule train_trial:" in rerun.stdout + rerun.stderr:
        assert "was finished by an earlier job" in text and "restoring its metrics from" in text
    assert text.count("on cpu:") <= 1  # the orphan's training, no second one
    assert json.loads(metrics.read_text()) == orphan


def test_a_full_disk_ends_a_step_with_one_line_on_its_stderr(tmp_path):
    """A tmpfs that fills up: the step says so in one line where Snakemake shows it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        script = (
            "from loratune.logs import log_to_file, one_line_errors\n"
            "from loratune.ledger import atomic_write_text\n"
            f"log_to_file({str(disk / 'train.log')!r})\n"
            "with one_line_errors():\n"
            f"    atomic_write_text({str(disk / 'metrics.json')!r}, 'x' * 10**6)\n"
        )
        result = subprocess.run(
            [str(Path(SNAKEMAKE).with_name("python")), "-c", script],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratune: disk full: "), result.stderr
    assert "free space and run again" in lines[0]


# ---- the library on its own ------------------------------------------------------------------
def test_every_config_field_has_one_scope():
    from loratune.config import load_schema
    from loratune.study_state import HARMLESS_FIELDS, change_scope

    for name in load_schema()["properties"]:
        scope = change_scope(f"{name}.x", "qlora")
        assert (scope == "harmless") == (name in HARMLESS_FIELDS), name
    assert change_scope("objectives.eval_loss", "benchmark") == "trials"
    assert change_scope("objectives.eval_loss", "qlora") == "arms"
    assert change_scope("arms.random.batch_size", "qlora") == "arm:random"
    assert change_scope("a_field_added_later", "qlora") == "trials"  # unknown fields are never harmless


def test_a_dry_run_reports_the_repairs_and_moves_nothing(study):
    from loratune.config import validate_config
    from loratune.study_state import prepare_run

    out = _out(study)
    (lost,) = list(out.glob("seed0/trials/*/metrics.json"))[:1]
    lost.unlink()
    before = _mtimes(study, "**/*")
    lines = prepare_run(validate_config(copy.deepcopy(CONFIG)), out, dry_run=True)
    assert any(line.startswith(f"{out / lost.relative_to(out)}: missing") for line in lines), lines
    assert _mtimes(study, "**/*") == before and not (out / "superseded").exists()


# ---- early stopping: rung metrics and promotions -------------------------------------------
RUNGS = "tiny-rungs"  # tests/configs/tiny_rungs.yaml: rungs at steps 10 and 20 of 40, 4 -> 2 -> 1 trials


@pytest.fixture(scope="module")
def finished_rungs(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("rungs")
    run_workflow(workdir, write_config(workdir / "config.yaml", load_test_config("tiny_rungs.yaml")))
    return workdir


@pytest.fixture
def rungs(finished_rungs, tmp_path) -> Path:
    return _copy_of(finished_rungs, tmp_path / "rungs", RUNGS)


def _jobs(result: subprocess.CompletedProcess, rule: str) -> list[str]:
    """The output of every job of ``rule`` a run started (its input line, if any, comes first)."""
    lines = (result.stdout + result.stderr).splitlines()
    headers = {f"{kind} {rule}:" for kind in ("rule", "localrule", "checkpoint", "localcheckpoint")}
    return sorted(
        next(follow.split("output:")[1].strip() for follow in lines[i + 1 : i + 4] if "output:" in follow)
        for i, line in enumerate(lines)
        if line.strip() in headers
    )


def test_a_lost_rung_metrics_file_and_a_truncated_promotion_retrain_only_that_rung(rungs):
    out = rungs / "results" / RUNGS
    round_dir = out / "seed0/halving/round1"
    stopped = read_table(round_dir / "rung0/promoted.tsv").query("not promoted").trial_id.iloc[0]
    lost = out / f"seed0/trials/{stopped}/step10/metrics.json"
    lost.unlink()
    lost.with_name("finished.json").unlink()
    promotion = round_dir / "rung1/promoted.tsv"
    promotion.write_text(promotion.read_text()[:30])
    pilot = _mtimes_of(out, "seed0/pilot/round0/*") | _mtimes_of(out, "seed0/random/round1/*")
    config = load_test_config("tiny_rungs.yaml")

    result = run_workflow(rungs, write_config(rungs / "config.yaml", config))
    assert f"{lost.relative_to(rungs)}: missing; retraining that trial" in result.stderr
    assert _jobs(result, "train_rung") == [str(lost.relative_to(rungs))]
    assert _jobs(result, "train_trial") == [] and _jobs(result, "promote") == [
        str((round_dir / f"rung{k}/promoted.tsv").relative_to(rungs)) for k in (0, 1)
    ]
    assert len(read_table(promotion)) == 4 and len(read_table(round_dir / "history.tsv")) == 7
    assert _mtimes_of(out, "seed0/pilot/round0/*") | _mtimes_of(out, "seed0/random/round1/*") == pilot
    again = run_workflow(rungs, rungs / "config.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_an_early_stopping_change_is_refused_then_recomputes_only_that_arm(rungs):
    out = rungs / "results" / RUNGS
    config = load_test_config("tiny_rungs.yaml")
    config["arms"]["halving"]["early_stopping"]["keep"] = 0.75
    refused = run_workflow(rungs, write_config(rungs / "config.yaml", config), check=False)
    assert refused.returncode != 0 and "  arms.halving.early_stopping.keep: 0.5 -> 0.75\n" in refused.stderr
    kept = _mtimes_of(out, "seed0/pilot/round0/*") | _mtimes_of(out, "seed0/random/round1/*")
    rung_metrics = _mtimes_of(out, "seed0/trials/*/step*/metrics.json")

    result = run_workflow(rungs, rungs / "config.yaml", "--config", "recompute=true")
    assert "after the change of arms.halving.early_stopping.keep" in result.stderr
    assert _mtimes_of(out, "seed0/pilot/round0/*") | _mtimes_of(out, "seed0/random/round1/*") == kept
    # The arm's rounds are proposed again; rung files of trials it proposes again are reused.
    assert list((out / "superseded").glob("*/seed0/halving/round1/rung0/promoted.tsv"))
    assert all(_mtimes_of(out, "seed0/trials/*/step*/metrics.json").get(k, v) == v for k, v in rung_metrics.items())
    assert (read_table(out / "seed0/halving/round1/rung0/promoted.tsv").promoted.sum()) == 3


def _mtimes_of(out: Path, pattern: str) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.glob(pattern))}


# ---- a config that dooms every trial fails once, before any trial --------------------------
def test_every_example_longer_than_max_seq_length_fails_in_prepare_dataset(tmp_path):
    from tiny_models import build_tiny_llama

    config = load_test_config("tiny_qlora.yaml")
    config["model"]["name"] = str(build_tiny_llama(tmp_path / "tiny-llama"))
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": f"Describe the garden number {i} in great detail.", "input": "", "output": "ok"})
            + "\n"
            for i in range(10)
        )
    )
    config["dataset"]["path"] = str(data)
    config["training"]["max_seq_length"] = 8  # the alpaca headers alone are longer
    result = run_workflow(tmp_path, write_config(tmp_path / "config.yaml", config), check=False)
    assert result.returncode != 0
    log = (tmp_path / "results/tiny-qlora/logs/prepare_dataset.log").read_text().strip().splitlines()
    assert (
        len(log) == 1 and "training.max_seq_length: 8 tokens leave no answer token in any of the 8 training" in log[0]
    )
    assert not list((tmp_path / "results/tiny-qlora").glob("seed0/trials/*/train.log"))  # no trial started


# ---- evaluation files: checked, retried and recomputed without training ---------------------
def _evaluated_study(tmp_path: Path, limit: int = 2):
    """A one-round qlora study folder as the workflow leaves it: two trained trials, one scored
    and one whose evaluation failed for lack of memory, the pilot's history and the tables."""
    from loratune import files
    from loratune.config import validate_config
    from loratune.loop import update_history

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "Say 1.", "input": "", "output": "1"}) + "\n")
    (tmp_path / "model").mkdir(exist_ok=True)
    config = load_test_config("tiny_qlora.yaml")
    config["model"]["name"] = str(tmp_path / "model")
    config["dataset"]["path"] = str(data)
    config["objectives"] = {"eval_loss": "min", "lm_eval.loratune_instruct.chrf": "max"}
    config["evaluation"] = {"tasks": ["loratune_instruct"], "limit": limit}
    config["arms"] = {"random": {"proposer": "random", "rounds": 0}}
    study = validate_config(config)
    out = tmp_path / "results" / study.name
    round_dir = out / "seed0/pilot/round0"
    ids = [study.space.trial_id({"lora_rank": r, "learning_rate": 1e-3}) for r in (4, 8)]
    round_dir.mkdir(parents=True, exist_ok=True)
    ledger_rows = pd.DataFrame([{"seed": 0, "arm": "pilot", "round": 0, "trial_id": t} for t in ids])
    ledger_rows.to_csv(round_dir / "proposals.tsv", sep="\t", index=False)
    scores = [
        {"status": "ok", "error": None, "lm_eval": {"loratune_instruct": {"chrf": 40.0, "exact_match": 0.0}}},
        {"status": "failed", "error": "OutOfMemoryError: CUDA out of memory", "lm_eval": {}},
    ]
    for trial_id, score in zip(ids, scores):
        trial = out / "seed0/trials" / trial_id
        files.atomic_write_json(trial / "metrics.json", {"trial_id": trial_id, "status": "ok", "eval_loss": 1.0})
        files.atomic_write_json(trial / "evaluation.json", score)
    update_history(
        None,
        round_dir / "proposals.tsv",
        [out / f"seed0/trials/{t}/metrics.json" for t in ids],
        round_dir / "history.tsv",
        evaluation_paths=[out / f"seed0/trials/{t}/evaluation.json" for t in ids],
        objectives=study.objectives,
    )
    shutil.copy(round_dir / "history.tsv", out / "trials.tsv")
    return study, out, ids


def test_a_corrupt_evaluation_and_a_failed_one_are_redone_without_retraining(tmp_path):
    from loratune.study_state import prepare_run

    study, out, (scored, failed) = _evaluated_study(tmp_path)
    prepare_run(study, out)
    metrics = {t: (out / f"seed0/trials/{t}/metrics.json").read_text() for t in (scored, failed)}
    corrupt = out / f"seed0/trials/{scored}/evaluation.json"
    corrupt.write_text('{"status": "ok", "lm_ev')
    lines = prepare_run(study, out, retry_failed="OutOfMemoryError")
    assert f"{corrupt}: not valid JSON" in lines[0] and "re-evaluating that trial (retraining nothing)" in lines[0]
    assert lines[1] == f"retry_failed: re-evaluating {out / 'seed0/trials' / failed} (OutOfMemoryError)"
    assert not corrupt.exists() and not (out / f"seed0/trials/{failed}/evaluation.json").exists()
    assert not (out / "seed0/pilot/round0/history.tsv").exists() and not (out / "trials.tsv").exists()
    # Training is kept: both metrics.json stay, so Snakemake runs only evaluate_trial for them.
    assert {t: (out / f"seed0/trials/{t}/metrics.json").read_text() for t in metrics} == metrics
    assert len(list((out / "superseded").glob("*/seed0/trials/*/evaluation.json"))) == 2


def test_an_evaluation_change_re_evaluates_without_being_asked_and_keeps_training(tmp_path):
    from loratune.config import validate_config
    from loratune.study_state import prepare_run

    study, out, ids = _evaluated_study(tmp_path)
    prepare_run(study, out)
    config = copy.deepcopy(study.config)
    config["evaluation"]["limit"] = 3
    changed = validate_config(config)
    lines = prepare_run(changed, out)  # no recompute flag needed, no refusal
    assert (
        len(lines) == 1
        and "re-evaluating every trial (retraining none) after the change of evaluation.limit" in lines[0]
    )
    assert (
        not list(out.glob("seed0/trials/*/evaluation.json")) and len(list(out.glob("seed0/trials/*/metrics.json"))) == 2
    )
    assert not (out / "seed0/pilot/round0/history.tsv").exists()
