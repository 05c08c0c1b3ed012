"""Successive halving in the real Snakemake DAG (benchmark backend): rungs, promotions, stopped
trials, a kill in the middle of a rung and its resumption, and an arm without early stopping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, SNAKEMAKE, load_test_config, run_workflow, write_config
from loratune.ledger import read_table

OUT = "results/tiny-rungs"
# tiny_rungs.yaml: rungs [0.25, 0.5, 1.0] of 40 steps, keep 0.5: 4 -> 2 -> 1 trials a round.
RUNG_STEPS = (10, 20)


def small_config() -> dict:
    return load_test_config("tiny_rungs.yaml")


def step_files(workdir: Path) -> list[Path]:
    return sorted((workdir / OUT).glob("seed0/trials/*/step*/metrics.json"))


def jobs_of(log: str, rule: str) -> list[str]:
    """The wildcards of every job of ``rule`` that a Snakemake log shows starting."""
    lines = log.splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.strip() in (f"rule {rule}:", f"localrule {rule}:"):
            for follow in lines[i + 1 : i + 12]:
                if follow.strip().startswith("wildcards:"):
                    found.append(follow.strip())
                    break
    return found


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """The study killed (SIGKILL to its whole process group) once rung 0 is partly trained, then
    resumed: (workdir, {finished-before-kill file: mtime}, the resumed run's log)."""
    workdir = tmp_path_factory.mktemp("rungs")
    configfile = write_config(workdir / "config.yaml", small_config())
    command = [
        SNAKEMAKE,
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        str(configfile),
        "--profile",
        str(REPO / "profiles/local"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        command, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not step_files(workdir):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = {path: path.stat().st_mtime_ns for path in step_files(workdir)}
    assert 1 <= len(finished) < 4 + 2, "the kill should fall inside the rungs"
    run_workflow(workdir, configfile, "--unlock")
    resumed = run_workflow(workdir, configfile)
    return workdir, finished, resumed.stdout + resumed.stderr


def test_dry_run_lists_the_pending_trials_of_each_rung(tmp_path):
    configfile = write_config(tmp_path / "config.yaml", small_config())
    proposals = f"{OUT}/seed0/halving/round1/proposals.tsv"
    run_workflow(tmp_path, configfile, proposals)
    trial_ids = read_table(tmp_path / proposals)["trial_id"].tolist()
    dry = run_workflow(tmp_path, configfile, "-n")
    log = dry.stdout + dry.stderr
    for trial_id in trial_ids:
        assert f"{OUT}/seed0/trials/{trial_id}/step10/metrics.json" in log
    assert "step20/metrics.json" not in log  # who reaches rung 1 is not known yet
    assert f"{OUT}/seed0/halving/round1/rung0/promoted.tsv" in log
    assert not step_files(tmp_path)


def test_promotions_and_stopped_trials_are_recorded(killed_and_resumed):
    workdir, _, _ = killed_and_resumed
    round_dir = workdir / OUT / "seed0/halving/round1"
    proposals = read_table(round_dir / "proposals.tsv")["trial_id"].tolist()
    rung0 = read_table(round_dir / "rung0/promoted.tsv")
    assert rung0["trial_id"].tolist() == proposals and rung0["promoted"].sum() == 2
    rung1 = read_table(round_dir / "rung1/promoted.tsv")
    assert rung1["trial_id"].tolist() == proposals
    assert sorted(rung1["rung"].tolist()) == [0, 0, 1, 1] and rung1["promoted"].sum() == 1
    winner = rung1.loc[rung1["promoted"], "trial_id"].item()

    history = read_table(round_dir / "history.tsv")
    own = history[history["round"] == 1].set_index("trial_id")
    assert own.loc[winner, "status"] == "ok" and own.loc[winner, "steps"] == 40
    stopped = own.drop(index=winner)
    assert (stopped["status"] == "stopped").all()
    reached = rung1.set_index("trial_id")["step"]
    assert stopped["steps"].tolist() == [reached[t] for t in stopped.index]
    for trial_id, row in stopped.iterrows():
        metrics = json.loads((workdir / OUT / f"seed0/trials/{trial_id}/step{row['steps']}/metrics.json").read_text())
        assert [point["step"] for point in metrics["curve"]][-1] == row["steps"]
        assert metrics["train_seconds"] == pytest.approx(row["train_seconds"])
    # The rungs' trials went on from their earlier rung: a promoted trial has every rung's metrics.
    for step in RUNG_STEPS:
        assert (workdir / OUT / f"seed0/trials/{winner}/step{step}/metrics.json").exists()
    trials = read_table(workdir / OUT / "trials.tsv")
    assert (trials["status"] == "stopped").sum() == 3
    curves = read_table(workdir / OUT / "hypervolume.tsv")
    halving = curves[curves["arm"] == "halving"]
    assert halving["train_steps"].iloc[-1] == 3 * 40 + 2 * 10 + 1 * 20 + 40


def test_a_killed_study_resumes_without_retraining_finished_rungs(killed_and_resumed):
    workdir, finished, log = killed_and_resumed
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was trained again"
    retrained = jobs_of(log, "train_rung")
    done = {f"seed=0, trial={p.parent.parent.name}, step={p.parent.name[4:]}" for p in finished}
    assert not done & {w.removeprefix("wildcards: ") for w in retrained}
    assert len(retrained) == 4 + 2 - len(finished)
    assert len(step_files(workdir)) == 4 + 2


def test_an_arm_without_early_stopping_keeps_its_files_and_trials(killed_and_resumed, tmp_path):
    workdir, _, _ = killed_and_resumed
    config = small_config()
    del config["arms"]["halving"]
    alone = run_workflow(tmp_path, write_config(tmp_path / "config.yaml", config))
    assert "promote" not in alone.stdout + alone.stderr
    for name in ("proposals.tsv", "history.tsv"):
        with_halving = read_table(workdir / OUT / f"seed0/random/round1/{name}")
        without = read_table(tmp_path / OUT / f"seed0/random/round1/{name}")
        clock = ["finished_at", "started_at", "job_time"]
        pd.testing.assert_frame_equal(
            with_halving.drop(columns=clock, errors="ignore"), without.drop(columns=clock, errors="ignore")
        )
    assert not (workdir / OUT / "seed0/random/round1/rung0").exists()
    random_trials = read_table(workdir / OUT / "seed0/random/round1/proposals.tsv")["trial_id"]
    for trial_id in random_trials:
        assert not list((workdir / OUT / f"seed0/trials/{trial_id}").glob("step*"))
