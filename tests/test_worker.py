"""Several trials in one process (the trial worker) against each trial in its own process, on the CPU.

Real training: the embedded SmolLM2-135M (NF4 QLoRA, two steps) and the tiny random Llama. A
group of trials trained one after another by one worker must give each trial exactly the metrics
of a lone run; a trial that fails in the group fails alone; a worker that dies is replaced.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from loratune.training import DatasetSpec, ModelSpec, prepare_dataset, prepare_model, run_trial
from loratune.training.models import BaseModels
from loratune.training.worker import TrialRaised, run_in_worker

pytestmark = pytest.mark.slow

TRIALS = [
    {"lora_rank": 8, "lora_alpha": 16, "learning_rate": 1e-3, "lora_dropout": 0.05},
    {"lora_rank": 4, "lora_alpha": 32, "learning_rate": 1e30, "lora_dropout": 0.0},  # diverges
    {"lora_rank": 16, "lora_alpha": 8, "learning_rate": 3e-3, "lora_dropout": 0.0},
]
COMPARED = ("status", "loss_curve", "eval_loss", "train_loss", "final_train_loss", "trainable_params", "best_step")


@pytest.fixture(scope="module")
def smollm2(request, tmp_path_factory) -> str:
    """The embedded model, converted once into pytest's cache folder (as test_evaluation does)."""
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("loratune-models") if cache is not None else tmp_path_factory.mktemp("models")
    return prepare_model(ModelSpec(), folder)


@pytest.fixture(scope="module")
def instructions(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("instructions")
    rows = [{"instruction": f"Repeat the word number {i}.", "input": "", "output": f"word {i}"} for i in range(12)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_dataset(DatasetSpec(path=str(folder / "data.jsonl"), eval_fraction=0.25), folder / "prepared")
    return folder / "prepared"


def lone(hparams, settings, model, data, out) -> dict:
    return run_trial(hparams, settings, model, data, out, seed=3)


def in_worker(hparams, settings, model, data, out, lock_dir, **options) -> dict:
    kwargs = dict(hparams=hparams, settings=settings, model_path=model, data_dir=str(data), output_dir=str(out), seed=3)
    return run_in_worker(kwargs, slot="test", lock_dir=lock_dir, log_path=Path(out) / "train.log", **options)


def same(a: dict, b: dict) -> None:
    assert {k: a.get(k) for k in COMPARED} == {k: b.get(k) for k in COMPARED}


def test_a_group_in_one_worker_equals_lone_runs_and_a_failure_stays_alone(smollm2, instructions, tmp_path):
    settings = {"quantization": "nf4", "max_steps": 2, "batch_size": 2, "max_seq_length": 64, "keep_adapter": True}
    alone = [lone(h, settings, smollm2, instructions, tmp_path / f"alone{i}") for i, h in enumerate(TRIALS)]
    group = [
        in_worker(h, settings, smollm2, instructions, tmp_path / f"group{i}", tmp_path / "locks", idle_seconds=60)
        for i, h in enumerate(TRIALS)
    ]
    assert [m["status"] for m in alone] == ["ok", "failed", "ok"]
    for a, g in zip(alone, group):
        same(a, g)
    assert "LossDiverged" in group[1]["error"]
    # One process trained all three: the base model loaded once, and once more after the failure.
    assert len({m["worker"]["pid"] for m in group}) == 1
    assert [m["worker"]["trial"] for m in group] == [1, 2, 3]
    assert [m["worker"]["base_model_loads"] for m in group] == [1, 1, 2]
    # Each trial keeps its own files: its adapter, and its own log with its own step lines.
    assert (tmp_path / "group0" / "adapter").is_dir() and (tmp_path / "group2" / "adapter").is_dir()
    assert not (tmp_path / "group1" / "adapter").exists()
    assert "step 2/2" in (tmp_path / "group2" / "train.log").read_text()
    assert "LossDiverged" in (tmp_path / "group1" / "train.log").read_text()
    os.kill(group[0]["worker"]["pid"], signal.SIGTERM)


def test_a_raising_trial_fails_alone_and_a_dead_worker_is_replaced(tiny_model, data_dir, tmp_path):
    settings = {"quantization": "none", "max_steps": 3, "warmup_ratio": 0.0, "log_every": 100}
    locks = tmp_path / "locks"
    first = in_worker(TRIALS[0], settings, tiny_model, data_dir, tmp_path / "a", locks, idle_seconds=60)
    with pytest.raises(TrialRaised, match="training.max_steps"):
        in_worker(TRIALS[0], {**settings, "max_steps": -1}, tiny_model, data_dir, tmp_path / "b", locks)
    after = in_worker(TRIALS[2], settings, tiny_model, data_dir, tmp_path / "c", locks)
    assert after["worker"]["pid"] == first["worker"]["pid"] and after["status"] == "ok"
    same(after, lone(TRIALS[2], settings, tiny_model, data_dir, tmp_path / "c-alone"))

    os.kill(first["worker"]["pid"], signal.SIGKILL)  # out of memory, a crash: the next job starts a new one
    time.sleep(0.2)
    fresh = in_worker(TRIALS[0], settings, tiny_model, data_dir, tmp_path / "d", locks, idle_seconds=1)
    assert fresh["worker"]["pid"] != first["worker"]["pid"] and fresh["worker"]["trial"] == 1
    same(fresh, first)
    # Idle for its idle_seconds, the worker exits and takes its socket with it.
    deadline = time.monotonic() + 30
    while list(locks.glob("*.sock")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not list(locks.glob("*.sock"))


def test_a_base_model_reused_in_process_gives_the_same_trials(tiny_model, data_dir, tmp_path):
    settings = {"quantization": "nf4", "max_steps": 3, "warmup_ratio": 0.0, "log_every": 100}
    cache = BaseModels()
    for i, hparams in enumerate(TRIALS):
        reused = run_trial(hparams, settings, tiny_model, data_dir, tmp_path / f"r{i}", seed=3, base_models=cache)
        same(reused, lone(hparams, settings, tiny_model, data_dir, tmp_path / f"l{i}"))
    assert cache.loads == 2  # the failed trial's model was dropped


KEY = "from loratune.training.worker import worker_key; print(worker_key('gpu0.slot1'))"


def test_an_edited_loratune_never_reaches_a_worker_of_the_old_code(tmp_path):
    """The worker key covers the contents of loratune's files: a job that runs an edited copy
    asks for another worker than one running the copy before the edit."""
    import shutil
    import subprocess
    import sys

    import loratune

    copy = tmp_path / "checkout"
    shutil.copytree(Path(loratune.__file__).parent, copy / "loratune", ignore=shutil.ignore_patterns("__pycache__"))
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(copy)}

    def key() -> str:
        run = subprocess.run(
            [sys.executable, "-c", KEY], env=env, cwd=tmp_path, capture_output=True, text=True, check=True
        )
        return run.stdout

    before = key()
    assert key() == before  # stable while nothing changes
    ledger = copy / "loratune" / "ledger.py"
    ledger.write_text(ledger.read_text() + "\n# an edit\n")
    edited = key()
    assert edited != before
    (copy / "loratune" / "__pycache__").mkdir(exist_ok=True)
    (copy / "loratune" / "__pycache__" / "stale.pyc").write_bytes(b"compiled")
    assert key() == edited  # compiled caches are no source


def test_a_trial_alone_on_a_gpu_first_ends_the_idle_workers_holding_memory_there(monkeypatch):
    """Fake GPUs (LORATUNE_GPUS=2), real worker processes: a trial that claims GPU 0 to itself
    ends the idle worker of a sharing slot of GPU 0, keeps its own and GPU 1's; a sharing trial
    then ends GPU 0's lone-trial worker."""
    import shutil
    import subprocess
    import sys
    import tempfile

    from loratune.devices import claim_gpu_share
    from loratune.trial import retire_workers_in_the_way
    from loratune.training.worker import socket_path_for

    for name in [n for n in os.environ if n.startswith("SLURM_")] + ["CUDA_VISIBLE_DEVICES"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LORATUNE_GPUS", "2")
    locks = Path(tempfile.mkdtemp(prefix="lt-", dir="/tmp"))  # a short path: the sockets live beside the locks
    workers = {}
    try:
        for slot in ("gpu0.slot0", "gpu1.slot0", "gpu0"):
            # Keyed as the job that started it keys it, inside its claim (CUDA_VISIBLE_DEVICES set).
            path = socket_path_for(slot, locks, {**os.environ, "CUDA_VISIBLE_DEVICES": slot[3]})
            workers[slot] = subprocess.Popen(
                [sys.executable, "-m", "loratune.training.worker", str(path), "600", slot],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 120
        while len(list(locks.glob("worker-*.slot"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)

        with claim_gpu_share(1, lock_dir=locks) as alone:
            assert (alone.device, alone.slot) == ("0", None)
            retired = retire_workers_in_the_way(alone.device, alone.slot, "gpu0", lock_dir=locks)
        assert retired == [workers["gpu0.slot0"].pid]
        assert workers["gpu0.slot0"].wait(timeout=5) == 0  # exited before the trial would train
        assert workers["gpu0"].poll() is None and workers["gpu1.slot0"].poll() is None

        with claim_gpu_share(4, lock_dir=locks) as shared:
            assert (shared.device, shared.slot) == ("0", 0)
            retired = retire_workers_in_the_way(shared.device, shared.slot, None, lock_dir=locks)
        assert retired == [workers["gpu0"].pid] and workers["gpu0"].wait(timeout=5) == 0
        assert workers["gpu1.slot0"].poll() is None  # another GPU's worker is no one's way
        assert [p.read_text() for p in locks.glob("worker-*.slot")] == ["gpu1.slot0"]
    finally:
        for process in workers.values():
            process.kill()
        shutil.rmtree(locks, ignore_errors=True)


def test_workers_of_long_lock_folders_listen_in_folders_of_their_own(tmp_path):
    """A lock folder too long for a socket's path (a site's TMPDIR, a Slurm allocation's suffix)
    gets a short one under /tmp of its own: another allocation's workers are never in it."""
    from loratune.training.worker import socket_folder

    first, second = tmp_path / ("a" * 80) / "loratune-gpus-0-job7", tmp_path / ("a" * 80) / "loratune-gpus-0-job8"
    folders = [socket_folder(first), socket_folder(first), socket_folder(second)]
    try:
        assert folders[0] == folders[1] != folders[2]
        assert all(len(str(folder)) < 80 and folder.is_dir() for folder in folders)
    finally:
        for folder in set(folders):
            folder.rmdir()
