"""The study on a real single-node Slurm cluster, through the wave profile.

One study runs twice: locally (the reference) and on a Slurm cluster started by the test
(tests/slurm/cluster.py: slurmctld + slurmd + munge, two fake GPUs through gres). On the
cluster a pending trial job is cancelled (Slurm reports it failed: the profile's retry must
resubmit it), then the Snakemake head is killed outright while trials run, as when a login
node goes down: its jobs go on without it. One orphaned job is cancelled too; the rest finish.
After `--unlock`, a dry run must list exactly the trials still missing, and the restarted
head must finish the study without retraining anything. Every trial must have gone through
sbatch, trials must have run side by side on distinct GPUs, and the results must equal the
local run's.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, SNAKEMAKE, load_test_config, run_workflow, write_config
from slurm.cluster import SlurmCluster, running_daemons, unavailable_reason, wait_until
from slurm.site_profile import WAVE_PROFILE, write_test_profile

STUDY = "slurm-study"
OUT = Path("results") / STUDY
TRAIN_COMMENT = re.compile(r"rule_train_trial_wildcards_(?P<seed>\d+)_(?P<trial>.+)")


def study_config() -> dict:
    """A small study whose rounds each train more trials than the cluster has GPUs."""
    config = copy.deepcopy(load_test_config("tiny_benchmark.yaml"))
    config.update(
        study=STUDY,
        seeds=[0],
        # peak memory 24.1 GiB + 0.039 GiB per rank: ranks above ~175 "run out of memory"
        # and are recorded as failed trials.
        benchmark={"problem": "lora_surrogate", "noise": 0.0, "memory_limit_gib": 31.0},
        objectives={"train_loss": "min", "train_time": "min"},
        pilot={"design": "lhs", "n": 3},
        arms={
            "gptune": {"proposer": "gptune", "rounds": 1, "batch_size": 2,
                       "options": {"population_size": 24, "generations": 10}},
            "random": {"proposer": "random", "rounds": 2, "batch_size": 2},
        },
        resources={"gpus_per_trial": 1, "mem_mb": 500, "runtime": 5, "cpus_per_trial": 1},
    )
    return config


@pytest.fixture(scope="module")
def cluster():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with SlurmCluster() as running:
        yield running
    wait_until(lambda: not running_daemons(), 15, "no Slurm daemon left after the cluster stopped")


def snakemake_command(workdir: Path, configfile: Path, profile: Path, *args: str) -> list[str]:
    return [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile", str(configfile),
            "--profile", str(profile), *args]


def train_jobs(cluster: SlurmCluster) -> list[dict[str, str]]:
    """The cluster's train_trial jobs, with their trial id."""
    found = []
    for job in cluster.jobs():
        match = TRAIN_COMMENT.fullmatch(job["comment"])
        if match:
            found.append({**job, "trial": match["trial"]})
    return found


def trial_metrics(workdir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (workdir / OUT).glob("seed0/trials/*/metrics.json")}


def path_mtime(workdir: Path, trial: str) -> int:
    return (workdir / OUT / "seed0" / "trials" / trial / "metrics.json").stat().st_mtime_ns


def proposed_trials(workdir: Path) -> set[str]:
    ids = set()
    for proposals in (workdir / OUT).glob("seed0/*/round*/proposals.tsv"):
        ids |= set(pd.read_csv(proposals, sep="\t")["trial_id"])
    return ids


def dry_run_trials(output: str) -> set[str]:
    """Trial ids of the train_trial jobs a dry run would submit."""
    trials = set()
    for block in output.split("\nrule ")[1:]:
        if block.startswith("train_trial:"):
            trials.add(re.search(r"wildcards: .*trial=([^,\s]+)", block)[1])
    return trials


@pytest.mark.slurm
@pytest.mark.slow
def test_study_on_slurm_retries_resumes_and_matches_a_local_run(cluster, tmp_path):
    configfile = write_config(tmp_path / "study.yaml", study_config())
    profile = write_test_profile(tmp_path / "profile")

    local = tmp_path / "local"
    local.mkdir()
    run_workflow(local, configfile, timeout=300)

    workdir = tmp_path / "slurm"
    workdir.mkdir()
    head_log = tmp_path / "head1.log"
    with open(head_log, "w") as log:
        head = subprocess.Popen(snakemake_command(workdir, configfile, profile), cwd=workdir,
                                stdout=log, stderr=subprocess.STDOUT)
    side_by_side: set[frozenset[str]] = set()  # Slurm ids of train jobs seen running at one moment
    cancelled_pending = None

    def diagnostics() -> str:
        return f"--- head\n{head_log.read_text()[-4000:]}\n{cluster.log_tail()}"

    # Phase 1: cancel a trial job waiting for a GPU, then kill the head while trials run.
    try:
        deadline = time.monotonic() + 240
        while True:
            assert head.poll() is None, f"head exited early\n{diagnostics()}"
            assert time.monotonic() < deadline, f"phase 1 timed out\n{diagnostics()}"
            jobs = train_jobs(cluster)
            running = {j["id"] for j in jobs if j["state"] == "RUNNING"}
            if len(running) > 1:
                side_by_side.add(frozenset(running))
            pending = [j for j in jobs if j["state"] == "PENDING"]
            if cancelled_pending is None and pending:
                cancelled_pending = pending[0]
                subprocess.run(["scancel", cancelled_pending["id"]], check=True, timeout=10)
            retried = cancelled_pending and (workdir / OUT / "seed0/trials" / cancelled_pending["trial"]
                                             / "metrics.json").exists()
            if retried and running and len(running) + len(pending) > 1:
                break
            time.sleep(0.3)
    finally:
        head.kill()  # SIGKILL, as when the login node goes down: no chance to cancel its jobs
        head.wait(timeout=30)

    # The head is gone; its jobs are not. One of them dies too, the others finish.
    orphans = [j for j in train_jobs(cluster) if j["state"] == "RUNNING"]
    assert orphans, "the killed head's running trials should go on in Slurm"
    lost = orphans[0]
    subprocess.run(["scancel", lost["id"]], check=True, timeout=10)
    wait_until(lambda: not cluster.active_jobs(), 90, "the orphaned jobs ended")
    assert {j["id"]: j["state"] for j in cluster.jobs()}[lost["id"]] == "CANCELLED"
    finished = {trial: (path_mtime(workdir, trial), m["slurm_job_id"]) for trial, m in trial_metrics(workdir).items()}
    missing = proposed_trials(workdir) - finished.keys()
    assert lost["trial"] in missing

    # Resuming as the README ("Running on a Slurm cluster") says: unlock, preview, run.
    run_workflow(workdir, configfile, "--unlock", profile=profile, timeout=120)
    preview = run_workflow(workdir, configfile, "-n", profile=profile, timeout=120)
    assert dry_run_trials(preview.stdout) == missing
    run_workflow(workdir, configfile, "--rerun-incomplete", profile=profile, timeout=300)

    metrics = trial_metrics(workdir)
    # Nothing finished before the restart was retrained or lost.
    for trial, (mtime, job_id) in finished.items():
        assert (path_mtime(workdir, trial), metrics[trial]["slurm_job_id"]) == (mtime, job_id), trial

    # Every trial ran as a Slurm job of this cluster, on one of its two GPUs.
    slurm_jobs = {j["id"]: j for j in train_jobs(cluster)}
    for trial, m in metrics.items():
        job = slurm_jobs[m["slurm_job_id"]]
        assert (job["trial"], job["state"]) == (trial, "COMPLETED")
        assert m["cuda_visible_devices"] in {"0", "1"}
        assert m["hostname"].split(".")[0] == cluster.node
    # The cancelled pending job was submitted again and that attempt produced the trial; the
    # trial lost with the head was trained again after the restart.
    assert slurm_jobs[cancelled_pending["id"]]["state"] == "CANCELLED"
    assert metrics[cancelled_pending["trial"]]["slurm_job_id"] != cancelled_pending["id"]
    assert metrics[lost["trial"]]["slurm_job_id"] != lost["id"]

    # Trials ran side by side, each pair on distinct GPUs.
    device_of = {m["slurm_job_id"]: m["cuda_visible_devices"] for m in metrics.values()}
    together = [ids for ids in side_by_side if ids <= device_of.keys()]
    assert together, "no two trial jobs were ever seen running at once"
    for ids in together:
        assert len({device_of[job_id] for job_id in ids}) == len(ids), sorted(ids)

    # The same study as the local run: same trials, same values, same failures.
    key = ["seed", "arm", "round", "trial_id"]
    columns = [*key, "status", "train_loss", "train_time"]
    on_slurm = pd.read_csv(workdir / OUT / "trials.tsv", sep="\t")[columns].sort_values(key, ignore_index=True)
    reference = pd.read_csv(local / OUT / "trials.tsv", sep="\t")[columns].sort_values(key, ignore_index=True)
    pd.testing.assert_frame_equal(on_slurm, reference)
    assert {"ok", "failed"} <= set(on_slurm["status"]), "the study should include a failed trial"


@pytest.mark.parametrize("experiment", sorted((REPO / "config" / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_wave_profile_previews_each_experiment(experiment, tmp_path):
    """`snakemake --profile profiles/wave -n` works before any job ran and shows what it would submit."""
    result = subprocess.run(
        [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--configfile", str(experiment),
         "--profile", str(WAVE_PROFILE.parent), "-n"],
        cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "checkpoint sample_pilot:" in result.stdout
    assert "slurm_account=SET-ME-account" in result.stdout  # the site placeholders reach the jobs
    assert "This was a dry-run" in result.stdout
