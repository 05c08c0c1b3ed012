"""GPU claims: distinct devices for concurrent processes, waiting when all are taken,
release on exit and on a crash, Slurm's choice kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loratune.devices import claim_gpu, gpu_count, local_pool, trial_threads

REPO = Path(__file__).resolve().parents[1]

# A trial-like process: claim, report what it got and what CUDA would see, hold, release.
WORKER = """
import json, os, sys, time
from pathlib import Path
from loratune.devices import claim_gpu
lock_dir, hold = Path(sys.argv[1]), float(sys.argv[2])
with claim_gpu(lock_dir=lock_dir, poll_seconds=0.05) as device:
    start = time.time()
    print(json.dumps({"device": device, "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}), flush=True)
    time.sleep(hold)
    end = time.time()
print(json.dumps({"start": start, "end": end, "after": os.environ.get("CUDA_VISIBLE_DEVICES")}), flush=True)
"""


def start_worker(lock_dir: Path, hold: float, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(lock_dir), str(hold)],
        env={**env, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def local_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for name in ("CUDA_VISIBLE_DEVICES", "LORATUNE_GPUS", "LORATUNE_SLURM_ALLOCATION"):
        env.pop(name, None)
    return {**env, **extra}


def test_concurrent_processes_get_distinct_gpus_and_wait_when_all_are_taken(tmp_path):
    hold = 1.0
    workers = [start_worker(tmp_path, hold, local_env(LORATUNE_GPUS="2")) for _ in range(5)]
    claims = []
    for worker in workers:
        out, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err
        got, timing = (json.loads(line) for line in out.splitlines())
        claims.append({**got, **timing})

    assert {c["device"] for c in claims} == {"0", "1"}
    for c in claims:
        assert c["visible"] == c["device"]  # what CUDA will see inside the block
        assert c["after"] is None  # restored on exit
    # No two holders of one device overlap in time, and never more holders than GPUs.
    for i, a in enumerate(claims):
        overlapping = [b for b in claims[i + 1 :] if b["start"] < a["end"] and a["start"] < b["end"]]
        assert all(b["device"] != a["device"] for b in overlapping)
    events = sorted([(c["start"], 1) for c in claims] + [(c["end"], -1) for c in claims])
    holders = peak = 0
    for _, step in events:
        holders += step
        peak = max(peak, holders)
    assert peak == 2
    # Five holds of one second on two GPUs need at least three rounds.
    span = max(c["end"] for c in claims) - min(c["start"] for c in claims)
    assert span >= 3 * hold - 0.1


def test_killed_holder_releases_its_gpu(tmp_path):
    holder = start_worker(tmp_path, 60, local_env(LORATUNE_GPUS="1"))
    assert json.loads(holder.stdout.readline())["device"] == "0"
    env = local_env(LORATUNE_GPUS="1")
    with pytest.raises(TimeoutError, match="fewer than 1 free GPU"):
        with claim_gpu(lock_dir=tmp_path, poll_seconds=0.05, timeout_seconds=0.3, environ=env):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    with claim_gpu(lock_dir=tmp_path, timeout_seconds=0, environ=env) as device:
        assert device == "0"
        assert env["CUDA_VISIBLE_DEVICES"] == "0"
    assert "CUDA_VISIBLE_DEVICES" not in env


def test_user_visible_devices_restrict_the_pool(tmp_path):
    env = local_env(CUDA_VISIBLE_DEVICES="3, GPU-5e1f")
    assert local_pool(env) == ["3", "GPU-5e1f"]
    other_process_env = dict(env)
    with claim_gpu(lock_dir=tmp_path, environ=env) as first:
        with claim_gpu(lock_dir=tmp_path, timeout_seconds=0, environ=other_process_env) as second:
            assert (first, second) == ("3", "GPU-5e1f")
        assert env["CUDA_VISIBLE_DEVICES"] == "3"
    assert env["CUDA_VISIBLE_DEVICES"] == "3, GPU-5e1f"


def test_slurm_choice_is_kept_and_no_lock_is_taken(tmp_path):
    env = local_env(SLURM_JOB_ID="42", CUDA_VISIBLE_DEVICES="1", LORATUNE_GPUS="4")
    with claim_gpu(lock_dir=tmp_path / "locks", environ=env) as device:
        assert device == "1"
        assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert not (tmp_path / "locks").exists()
    with claim_gpu(lock_dir=tmp_path / "locks", environ=local_env(SLURM_JOB_ID="43")) as device:
        assert device is None  # a Slurm job without a GPU


def test_inside_a_heads_allocation_its_jobs_share_the_allocations_gpus(tmp_path):
    """A head inside a Slurm job marks the job; its jobs (which inherit the mark) claim the
    allocation's GPUs as on a workstation, under locks of that job's own; a job of another id
    (one the Slurm executor submitted for one trial) keeps Slurm's choice."""
    from loratune.devices import (
        ALLOCATION_ENV,
        claim_gpu_share,
        default_lock_dir,
        in_allocation,
        mark_allocation_head,
        slurm_placed,
    )

    head = local_env(SLURM_JOB_ID="42", CUDA_VISIBLE_DEVICES="2,3", LORATUNE_GPUS="8", TMPDIR=str(tmp_path))
    assert slurm_placed(head) and not in_allocation(head)
    assert mark_allocation_head(head) == "42" and head[ALLOCATION_ENV] == "42"
    assert in_allocation(head) and not slurm_placed(head)
    assert local_pool(head) == ["2", "3"]  # Slurm's GPUs, not the node's 8
    assert default_lock_dir(head) == tmp_path / f"loratune-gpus-{os.getuid()}-job42"
    with (
        claim_gpu_share(2, environ=dict(head)) as a,
        claim_gpu_share(2, environ=dict(head)) as b,
        claim_gpu_share(2, environ=dict(head)) as c,
    ):
        # Slot 0 of each of the allocation's GPUs, then a second trial on the first.
        assert [(x.device, x.slot, x.trials_at_start) for x in (a, b, c)] == [("2", 0, 1), ("3", 0, 1), ("2", 1, 2)]
        assert {p.name for p in tmp_path.iterdir()} == {f"loratune-gpus-{os.getuid()}-job42"}
        # Another allocation of this user on this node has its own locks: nothing of ours blocks it.
        other = {**head, "SLURM_JOB_ID": "44", ALLOCATION_ENV: "44"}
        with claim_gpu_share(2, timeout_seconds=0, environ=other) as d:
            assert (d.device, d.slot, d.trials_at_start) == ("2", 0, 1)

    trial_job = {**head, "SLURM_JOB_ID": "43", "CUDA_VISIBLE_DEVICES": "1"}  # the mark inherited, another job
    assert slurm_placed(trial_job)
    with claim_gpu_share(4, environ=trial_job) as e:
        assert (e.device, e.slot, e.trials_per_gpu) == ("1", None, 1)
    assert mark_allocation_head(local_env()) is None  # no Slurm job: nothing to mark
    no_gpu = {k: v for k, v in head.items() if k != "CUDA_VISIBLE_DEVICES"}
    assert local_pool(no_gpu) == []  # an allocation without GPUs has none, whatever the node holds


def test_cpu_only_machine_and_cpu_trials_yield_none(tmp_path):
    env = local_env(LORATUNE_GPUS="0")
    with claim_gpu(lock_dir=tmp_path, environ=env) as device:
        assert device is None
        assert "CUDA_VISIBLE_DEVICES" not in env
    env = local_env(LORATUNE_GPUS="2")
    with claim_gpu(0, lock_dir=tmp_path, environ=env) as device:
        assert device is None
        assert "CUDA_VISIBLE_DEVICES" not in env
    assert not list(tmp_path.iterdir())  # a CPU trial takes no lock


def test_multi_gpu_claims_are_all_or_nothing(tmp_path):
    env = local_env(LORATUNE_GPUS="3")
    with claim_gpu(2, lock_dir=tmp_path, environ=env) as devices:
        assert devices == env["CUDA_VISIBLE_DEVICES"] == "0,1"
        with pytest.raises(TimeoutError, match="fewer than 2 free GPU"):
            with claim_gpu(2, lock_dir=tmp_path, timeout_seconds=0, environ=local_env(LORATUNE_GPUS="3")):
                pass
        # The failed claim let go of GPU 2 again.
        with claim_gpu(1, lock_dir=tmp_path, timeout_seconds=0, environ=local_env(LORATUNE_GPUS="3")) as last:
            assert last == "2"
    with pytest.raises(ValueError, match="4 GPUs requested per trial, but this machine offers 3"):
        with claim_gpu(4, lock_dir=tmp_path, environ=env):
            pass


def test_gpu_count_validates_the_environment():
    assert gpu_count({"LORATUNE_GPUS": "3"}) == 3
    with pytest.raises(ValueError, match="LORATUNE_GPUS: expected a non-negative integer, got 'two'"):
        gpu_count({"LORATUNE_GPUS": "two"})


def test_a_trial_on_the_cpu_gets_its_cores_and_one_on_a_gpu_one_thread():
    # Snakemake exports a job's threads as OMP_NUM_THREADS: a CPU trial with the default of one
    # thread would train on half of a 2-core machine.
    config = {
        "backend": "qlora",
        "resources": {"cpus_per_trial": 4, "gpus_per_trial": 1},
        "training": {"device": "auto"},
    }
    assert trial_threads(config, {"LORATUNE_GPUS": "0"}) == 4
    assert trial_threads(config, {"LORATUNE_GPUS": "2"}) == 1
    assert trial_threads({**config, "training": {"device": "cpu"}}, {"LORATUNE_GPUS": "2"}) == 4
    assert (
        trial_threads({**config, "resources": {"cpus_per_trial": 3, "gpus_per_trial": 0}}, {"LORATUNE_GPUS": "2"}) == 3
    )
    assert trial_threads({**config, "backend": "benchmark"}, {"LORATUNE_GPUS": "0"}) == 1


# ---- GPUs shared by several trials (resources.trials_per_gpu) -----------------------------
SHARER = """
import json, os, sys, time
from pathlib import Path
from loratune.devices import claim_gpu_share
lock_dir, share, hold = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
with claim_gpu_share(share, lock_dir=lock_dir, poll_seconds=0.05) as claim:
    print(json.dumps({"device": claim.device, "slot": claim.slot, "visible": os.environ["CUDA_VISIBLE_DEVICES"],
                      "start": time.time()}), flush=True)
    time.sleep(hold)
print(json.dumps({"end": time.time()}), flush=True)
"""


def start_sharer(lock_dir: Path, share: int, hold: float, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SHARER, str(lock_dir), str(share), str(hold)],
        env={**env, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sharing_processes_fill_the_slots_of_every_gpu_then_wait(tmp_path):
    env = local_env(LORATUNE_GPUS="2")
    procs = [start_sharer(tmp_path, 3, 1.5, env) for _ in range(7)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        claim, end = (json.loads(line) for line in out.splitlines())
        results.append({**claim, **end})
    first = sorted(results, key=lambda r: r["start"])[:6]
    # Six slots (3 per GPU on 2 GPUs): six held at once, each (GPU, slot) by one process only.
    assert len({(r["device"], r["slot"]) for r in first}) == 6
    assert {r["device"] for r in first} == {"0", "1"} and all(r["visible"] == r["device"] for r in first)
    assert max(r["start"] for r in first) < min(r["end"] for r in first)
    # The seventh waited for a slot to free.
    last = max(results, key=lambda r: r["start"])
    assert last["start"] >= min(r["end"] for r in first) - 0.05


def test_trials_spread_over_the_gpus_before_they_share_one(tmp_path):
    from loratune.devices import claim_gpu_share

    env = local_env(LORATUNE_GPUS="2")
    with claim_gpu_share(4, lock_dir=tmp_path, environ=dict(env)) as a:
        with claim_gpu_share(4, lock_dir=tmp_path, environ=dict(env)) as b:
            with claim_gpu_share(4, lock_dir=tmp_path, environ=dict(env)) as c:
                assert (a.device, a.slot, b.device, b.slot) == ("0", 0, "1", 0)
                assert (c.device, c.slot, c.trials_at_start) == ("0", 1, 2)  # it shares GPU 0 with a
                assert a.trials_per_gpu == 4 and a.trials_at_start == 1


def test_a_lone_trial_and_sharers_never_mix_on_one_gpu(tmp_path):
    from loratune.devices import claim_gpu_share

    env = local_env(LORATUNE_GPUS="1")
    with claim_gpu(lock_dir=tmp_path, environ=dict(env)) as alone:
        assert alone == "0"
        with pytest.raises(TimeoutError):
            with claim_gpu_share(8, lock_dir=tmp_path, timeout_seconds=0.2, poll_seconds=0.05, environ=dict(env)):
                pass
    with claim_gpu_share(8, lock_dir=tmp_path, environ=dict(env)) as shared:
        assert (shared.device, shared.slot) == ("0", 0)
        with pytest.raises(TimeoutError):
            with claim_gpu(lock_dir=tmp_path, timeout_seconds=0.2, poll_seconds=0.05, environ=dict(env)):
                pass
        # One trial per GPU is today's exclusive claim.
        with pytest.raises(TimeoutError):
            with claim_gpu_share(1, lock_dir=tmp_path, timeout_seconds=0.2, poll_seconds=0.05, environ=dict(env)):
                pass


def test_shared_claims_keep_slurms_choice_and_yield_none_without_gpus(tmp_path):
    from loratune.devices import claim_gpu_share

    with claim_gpu_share(4, lock_dir=tmp_path, environ=local_env(SLURM_JOB_ID="7", CUDA_VISIBLE_DEVICES="3")) as c:
        assert (c.device, c.slot, c.trials_per_gpu) == ("3", None, 1)
    with claim_gpu_share(4, lock_dir=tmp_path, environ=local_env(LORATUNE_GPUS="0")) as c:
        assert (c.device, c.slot) == (None, None)
    assert not list(tmp_path.glob("*.lock"))
