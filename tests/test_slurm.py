"""The study on a real single-node Slurm cluster: through the wave profile (one job per trial),
and inside one allocation (profiles/wave/study.sbatch: the head and its trials in one job).

One study runs twice: locally (the reference) and on a Slurm cluster started by the test
(tests/slurm/cluster.py: slurmctld + slurmd + munge, two fake GPUs through gres). On the
cluster a pending trial job is cancelled (Slurm reports it failed: the profile's retry must
resubmit it), then the Snakemake head is killed outright while trials run, as when a login
node goes down: its jobs go on without it. One orphaned job is cancelled too; the rest finish.
After `--unlock`, a dry run must list exactly the trials still missing, and the restarted
head must finish the study without retraining anything. Every trial must have gone through
sbatch, trials must have run side by side on distinct GPUs, and the results must equal the
local run's.

Inside an allocation, real (tiny) QLoRA trials share the allocation's GPU two at a time in trial
workers; the allocation is cancelled while the study runs, a dry run from outside lists what is
left, and a second allocation, of two GPUs, finishes the study without retraining anything.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, SNAKEMAKE, load_test_config, run_workflow, workflow_env, write_config
from slurm.cluster import SlurmCluster, running_daemons, unavailable_reason, wait_until
from slurm.site_profile import WAVE_PROFILE, write_test_profile
from tiny_models import tiny_qlora_study

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


def trial_metrics(workdir: Path, out: Path = OUT) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (workdir / out).glob("seed0/trials/*/metrics.json")}


def path_mtime(workdir: Path, trial: str, out: Path = OUT) -> int:
    return (workdir / out / "seed0" / "trials" / trial / "metrics.json").stat().st_mtime_ns


def proposed_trials(workdir: Path, out: Path = OUT) -> set[str]:
    ids = set()
    for proposals in (workdir / out).glob("seed0/*/round*/proposals.tsv"):
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


# ---- a study inside one allocation (profiles/wave/study.sbatch) ----------------------------
STUDY_SBATCH = REPO / "profiles" / "wave" / "study.sbatch"
NODE_OUT = Path("results") / "slurm-node"
WORKER_LINE = re.compile(r"trial worker \(pid (\d+)\) trains this trial")
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")


def allocation_study(folder: Path) -> dict:
    """Real QLoRA trials of a tiny model, two to a GPU, in trial workers (resources.trial_worker
    auto): the pilot's three trials, then one round of one; the learning rate 1e30 diverges."""
    config = tiny_qlora_study(folder)
    config.update(
        study=NODE_OUT.name,
        arms={"random": {"proposer": "random", "rounds": 1, "batch_size": 1}},
        resources={"gpus_per_trial": 1, "trials_per_gpu": 2, "trial_worker": "auto", "worker_idle_seconds": 60,
                   "cpus_per_trial": 1, "mem_mb": 500, "runtime": 5},
    )
    return config


def submit_study(cluster: SlurmCluster, workdir: Path, configfile: Path, gres: str) -> str:
    """`sbatch profiles/wave/study.sbatch` from the checkout, the site values given to sbatch; the job id."""
    command = ["sbatch", "--parsable", f"--partition={cluster.spec.partition}", "--account=loratune-test",
               "--mem=4000", "--cpus-per-task=2", f"--gres={gres}", f"--output={workdir}/allocation-%j.log",
               str(STUDY_SBATCH), str(NODE_OUT / "trials.tsv"), "-s", str(REPO / "Snakefile"), "-d", str(workdir),
               "--configfile", str(configfile)]
    env = {**workflow_env(), "LORATUNE_SNAKEMAKE": SNAKEMAKE}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=30,
                          check=True).stdout.strip()


def job_state(cluster: SlurmCluster, job_id: str) -> str:
    return {job["id"]: job["state"] for job in cluster.jobs()}[job_id]


def worker_pids(workdir: Path) -> dict[str, int]:
    """The trial worker that trained each trial, from the trial's own train.log."""
    pids = {}
    for log in (workdir / NODE_OUT).glob("seed0/trials/*/train.log"):
        match = WORKER_LINE.search(log.read_text())
        if match:
            pids[log.parent.name] = int(match[1])
    return pids


def stop_idle_workers(pids: set[int]) -> None:
    """End the trial workers of ``pids`` still running. A cancelled allocation's idle worker outlives
    it on this cluster (proctrack/linuxproc follows a process only while its parent lives; the
    cgroup tracking of GPU sites ends it with the job) until worker_idle_seconds pass."""
    for pid in pids:
        try:
            if b"loratune.training.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGTERM)
        except (FileNotFoundError, ProcessLookupError):
            pass


@pytest.mark.slurm
@pytest.mark.slow
def test_one_allocation_shares_its_gpu_between_trials_and_a_cancelled_one_resumes(cluster, tmp_path):
    configfile = write_config(tmp_path / "study.yaml", allocation_study(tmp_path))
    workdir = tmp_path / "node"
    workdir.mkdir()
    out = workdir / NODE_OUT
    earlier_jobs = {job["id"] for job in cluster.jobs()}

    def diagnostics() -> str:
        logs = "".join(f"--- {p.name}\n{p.read_text()[-3000:]}\n" for p in sorted(workdir.glob("allocation-*.log")))
        return logs + cluster.log_tail()

    try:
        # One GPU for the whole study. Cancel the job (as an admin or the time limit would) once the
        # round's trial has started (its log exists): the pilot's trials are done.
        first = submit_study(cluster, workdir, configfile, "gpu:v100:1")
        deadline = time.monotonic() + 240
        while len(list(out.glob("seed0/trials/*/train.log"))) < 4:
            assert job_state(cluster, first) in ACTIVE, f"the allocation ended early\n{diagnostics()}"
            assert time.monotonic() < deadline, f"no proposal within 240 s\n{diagnostics()}"
            time.sleep(0.2)
        subprocess.run(["scancel", first], check=True, timeout=10)
        wait_until(lambda: job_state(cluster, first) not in ACTIVE, 90, "the cancelled allocation ended")
        assert job_state(cluster, first) == "CANCELLED"
        finished = {trial: (path_mtime(workdir, trial, NODE_OUT), m["slurm_job_id"])
                    for trial, m in trial_metrics(workdir, NODE_OUT).items()}
        missing = proposed_trials(workdir, NODE_OUT) - finished.keys()
        assert len(finished) == 3 and len(missing) == 1, (finished, missing)

        # From outside Slurm, as on the login node: preview (the round's trial), submit again. The
        # head stopped cleanly at Slurm's SIGTERM (its trials died at it too): nothing to unlock.
        preview = run_workflow(workdir, configfile, "-n", str(NODE_OUT / "trials.tsv"), timeout=120)
        assert dry_run_trials(preview.stdout) == missing
        second = submit_study(cluster, workdir, configfile, "gpu:v100:2")
        wait_until(lambda: job_state(cluster, second) not in ACTIVE, 240, "the second allocation ended")
        assert job_state(cluster, second) == "COMPLETED", diagnostics()
    finally:
        stop_idle_workers(set(worker_pids(workdir).values()))

    metrics = trial_metrics(workdir, NODE_OUT)
    assert metrics.keys() == finished.keys() | missing
    for trial, (mtime, job_id) in finished.items():  # nothing the cancelled allocation finished trained again
        assert (path_mtime(workdir, trial, NODE_OUT), metrics[trial]["slurm_job_id"]) == (mtime, job_id), trial
    # Slurm ran the two allocations and nothing else: every trial trained inside one, on its GPUs.
    assert {job["id"] for job in cluster.jobs()} - earlier_jobs == {first, second}
    for trial, m in metrics.items():
        assert m["slurm_job_id"] == (second if trial in missing else first), trial
        assert m["cuda_visible_devices"] in ({"0", "1"} if trial in missing else {"0"}), trial
        assert m["trials_per_gpu"] == 2 and m["hostname"].split(".")[0] == cluster.node
    # The pilot's trials shared the one GPU: one started beside another.
    assert sorted(m["gpu_trials_at_start"] for t, m in metrics.items() if t not in missing)[-1] == 2
    # ... in two trial workers (one per slot), so one of them trained two trials; each trial kept its log.
    pilot_pids = [pid for trial, pid in worker_pids(workdir).items() if trial not in missing]
    assert len(pilot_pids) == 3 and len(set(pilot_pids)) == 2, pilot_pids
    # A diverging trial failed alone: the trials beside it and after it in its worker trained.
    trials = pd.read_csv(out / "trials.tsv", sep="\t")
    assert set(trials.status) == {"ok", "failed"}
    assert (trials[trials.status == "failed"].learning_rate == 1e30).all()
    assert trials[trials.status == "failed"].error.str.contains("LossDiverged").all()
    assert trials[trials.status == "ok"].eval_loss.notna().all()
