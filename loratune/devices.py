"""Which GPU a training trial runs on.

Snakemake schedules jobs against a `gpu` resource count but never says *which* GPU a job
gets. Under Slurm the scheduler does: it sets ``CUDA_VISIBLE_DEVICES`` from the job's GRES,
and we keep it. On a workstation, concurrent trials claim a GPU each through advisory lock
files, one per device: a trial that has the GPU to itself holds the device's lock exclusively;
trials that share a GPU (``claim_gpu_share``, small models: ``loratune.packing``) hold it shared,
plus one of the device's ``trials_per_gpu`` slot locks each, so a lone trial and sharers never
mix and at most ``trials_per_gpu`` share. A lock is an ``flock`` on an open file: the kernel
drops it when the process exits, crash or kill included, so a stale lock cannot outlive its trial.

Slurm is either of two things to a trial. A job that Snakemake's Slurm executor submitted for
one trial got its GPU from Slurm (``CUDA_VISIBLE_DEVICES``), and we keep it: ``slurm_placed``. A
Snakemake head that runs *inside* a Slurm allocation (``sbatch profiles/wave/study.sbatch``)
runs its trials as local jobs on the allocation's GPUs, and they claim them as on a workstation:
the head marks its job (``mark_allocation_head``), its jobs inherit the mark, and the pool is the
allocation's ``CUDA_VISIBLE_DEVICES``, with locks of its own (``default_lock_dir``).

``CUDA_VISIBLE_DEVICES`` is read once, when CUDA initializes, so the claim must happen
before the first CUDA call of the process.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

GPU_COUNT_ENV = "LORATUNE_GPUS"
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
ALLOCATION_ENV = "LORATUNE_SLURM_ALLOCATION"  # the Slurm job id of the allocation a head runs in


def default_lock_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``${TMPDIR:-/tmp}/loratune-gpus-<uid>``: per user, so users of a shared machine never block
    each other's locks; inside a head's allocation ``...-<uid>-job<id>``: two allocations of one
    user on one node hold different GPUs that Slurm may number alike (both "0" under cgroups)."""
    name = f"loratune-gpus-{os.getuid()}"
    if in_allocation(environ):
        name += f"-job{environ['SLURM_JOB_ID']}"
    return Path(environ.get("TMPDIR") or "/tmp") / name


def in_allocation(environ: Mapping[str, str] = os.environ) -> bool:
    """True in the Slurm job of a Snakemake head that runs inside it (the head and its local jobs):
    the allocation's GPUs are this head's to share out, as a workstation's are."""
    job = environ.get("SLURM_JOB_ID")
    return bool(job) and environ.get(ALLOCATION_ENV) == job


def slurm_placed(environ: Mapping[str, str] = os.environ) -> bool:
    """True in a Slurm job that is not a head's allocation: a job that Snakemake's Slurm executor
    submitted for one trial, whose GPU Slurm chose (its ``CUDA_VISIBLE_DEVICES``) and which ends
    with that trial."""
    return bool(environ.get("SLURM_JOB_ID")) and not in_allocation(environ)


def mark_allocation_head(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Called once by the Snakemake head (rules/common.smk): inside a Slurm job, mark the job as
    the head's allocation, for the head and every job it starts (they inherit the mark); the job
    id, or None outside Slurm. The jobs that a head's Slurm executor submits carry the mark too
    (sbatch passes the environment on) but run in jobs of their own ids, so they stay
    ``slurm_placed``; the executor itself drops the head's ``SLURM_*`` before it submits."""
    job = environ.get("SLURM_JOB_ID")
    if job:
        environ[ALLOCATION_ENV] = job
    return job or None


def gpu_count(environ: Mapping[str, str] = os.environ) -> int:
    """Number of local GPUs: ``LORATUNE_GPUS`` if set, else what torch sees.

    torch is asked in a child process: ``torch.cuda.device_count()`` may initialize CUDA,
    which would freeze ``CUDA_VISIBLE_DEVICES`` in the calling process before we set it.
    Without the NVIDIA driver's control device there is nothing to count and no reason
    to pay for importing torch.
    """
    raw = environ.get(GPU_COUNT_ENV)
    if raw is not None:
        if not re.fullmatch(r"\s*\d+\s*", raw):
            raise ValueError(f"{GPU_COUNT_ENV}: expected a non-negative integer, got {raw!r}")
        return int(raw)
    if not Path("/dev/nvidiactl").exists():
        return 0
    return _probed_gpu_count(tuple(sorted(environ.items())))


def trial_threads(config: Mapping, environ: Mapping[str, str] = os.environ) -> int:
    """CPU threads of a trial job: Snakemake's ``threads``, which it also exports to the job as
    ``OMP_NUM_THREADS`` (and MKL's, OpenBLAS's), so torch computes with that many threads.

    A trial that trains on the CPU gets ``resources.cpus_per_trial`` (Snakemake caps it at
    ``--cores``): without it a job gets one thread, half of a 2-core machine. A trial on a GPU
    keeps one: its CPU side is one Python thread feeding the GPU, and the trials that share a
    GPU (``trials_per_gpu``) must not be held back by cores they do not use."""
    if config.get("backend") != "qlora":
        return 1
    cpus = int(config["resources"]["cpus_per_trial"])
    on_cpu = config["resources"]["gpus_per_trial"] == 0 or config["training"].get("device") == "cpu"
    return cpus if on_cpu or gpu_count(environ) == 0 else 1


@functools.cache
def _probed_gpu_count(environ: tuple[tuple[str, str], ...]) -> int:
    """torch's device count in a child process, once per process and environment: a trial job
    asks twice (how many trials share a GPU, then which GPU), and the probe costs an import of torch."""
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
        env=dict(environ),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(probe.stdout.strip().splitlines()[-1])


def local_pool(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The device ids a local trial may claim.

    A ``CUDA_VISIBLE_DEVICES`` set by the user restricts the pool to those devices (ids,
    UUIDs or MIG names), as Slurm's does inside a head's allocation (none there without it);
    otherwise every GPU counts, by index.
    """
    visible = environ.get(VISIBLE_ENV)
    if visible is not None:
        return [device.strip() for device in visible.split(",") if device.strip()]
    if in_allocation(environ):
        return []  # Slurm names every GPU it allocates there; the node's others are not ours
    return [str(index) for index in range(gpu_count(environ))]


def _lock_name(device: str) -> str:
    # UUIDs and MIG names hold characters that are awkward in file names.
    return re.sub(r"[^A-Za-z0-9_.-]", "_", device) + ".lock"


def _slot_name(device: str, slot: int) -> str:
    return _lock_name(device).removesuffix(".lock") + f".slot{slot}.lock"


def _try_lock(path: Path, shared: bool = False) -> int | None:
    """An open descriptor holding a lock on ``path`` (exclusive, or ``shared``), or None if
    another process holds it in a conflicting way."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if not shared:
        # For a person wondering who holds the GPU; the lock itself is the flock.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _lock_free(pool: list[str], lock_dir: Path, count: int) -> list[tuple[str, int]] | None:
    """Locks on ``count`` free devices of ``pool``, or None (holding nothing) if fewer are free."""
    held = []
    for device in pool:
        fd = _try_lock(lock_dir / _lock_name(device))
        if fd is not None:
            held.append((device, fd))
            if len(held) == count:
                return held
    for _, fd in held:
        os.close(fd)
    return None


def _wait(attempt, what: str, lock_dir: Path, poll_seconds: float, timeout_seconds: float | None):
    """``attempt()`` until it returns something, polling; ``TimeoutError`` naming ``what`` after ``timeout_seconds``."""
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    while (held := attempt()) is None:
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"claim_gpu: {what} after {timeout_seconds} s (locks in {lock_dir})")
        time.sleep(poll_seconds)
    return held


def _check_cuda_untouched() -> None:
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        raise RuntimeError(
            "claim_gpu: CUDA is already initialized in this process; " "claim the GPU before the first CUDA call"
        )


@contextmanager
def _visible(devices: str, environ: MutableMapping[str, str]) -> Iterator[None]:
    previous = environ.get(VISIBLE_ENV)
    environ[VISIBLE_ENV] = devices
    try:
        yield
    finally:
        if previous is None:
            environ.pop(VISIBLE_ENV, None)
        else:
            environ[VISIBLE_ENV] = previous


@contextmanager
def claim_gpu(
    count: int = 1,
    *,
    lock_dir: Path | None = None,
    poll_seconds: float = 2.0,
    timeout_seconds: float | None = None,
    environ: MutableMapping[str, str] = os.environ,
) -> Iterator[str | None]:
    """Claim ``count`` GPUs for the duration of the ``with`` block; yield their ids, or None.

    ``count=0`` (a CPU trial) claims nothing and yields None. In a Slurm job of one trial
    (``slurm_placed``), yield what Slurm put in ``CUDA_VISIBLE_DEVICES`` for the job (None if it
    got no GPU) and take no lock. Locally and inside a head's allocation, yield None without
    GPUs; otherwise lock ``count`` free devices of ``local_pool``, waiting ``poll_seconds`` between attempts while too few are
    free (for ever, or until ``timeout_seconds``, then ``TimeoutError``), set
    ``CUDA_VISIBLE_DEVICES`` to them ("0" or "2,3") and yield that. On exit the previous
    ``CUDA_VISIBLE_DEVICES`` is restored and the locks released.
    """
    if count < 0:
        raise ValueError(f"claim_gpu: count must be >= 0, got {count}")
    _check_cuda_untouched()
    if count == 0:
        yield None
        return
    if slurm_placed(environ):
        yield environ.get(VISIBLE_ENV) or None
        return

    pool = local_pool(environ)
    if not pool:
        yield None
        return
    if count > len(pool):
        raise ValueError(f"claim_gpu: {count} GPUs requested per trial, but this machine offers {len(pool)}: {pool}")

    lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir(environ)
    lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    held = _wait(
        lambda: _lock_free(pool, lock_dir, count),
        f"fewer than {count} free GPU(s) among {pool}",
        lock_dir,
        poll_seconds,
        timeout_seconds,
    )
    devices = ",".join(device for device, _ in held)
    try:
        with _visible(devices, environ):
            yield devices
    finally:
        for _, fd in held:
            os.close(fd)  # closing the descriptor releases the flock


@dataclass(frozen=True)
class GpuShare:
    """A trial's claim on one GPU that it may share: the device (None: no GPU, or Slurm's choice
    unknown), its slot on it (None: the GPU to itself, or Slurm's), how many trials may share it,
    and how many held it when the claim was made (this one included)."""

    device: str | None
    slot: int | None
    trials_per_gpu: int
    trials_at_start: int


def occupants(device: str, lock_dir: Path, trials_per_gpu: int) -> int:
    """How many of ``device``'s first ``trials_per_gpu`` slots are held now (by any process, the
    caller's own slot included: a second descriptor cannot lock what the first holds)."""
    held = 0
    for slot in range(trials_per_gpu):
        fd = _try_lock(lock_dir / _slot_name(device, slot))
        if fd is None:
            held += 1
        else:
            os.close(fd)
    return held


def _lock_slot(pool: list[str], lock_dir: Path, trials_per_gpu: int) -> tuple[str, int, list[int]] | None:
    """A shared lock on a device and an exclusive lock on one of its slots, or None (holding
    nothing) if every slot of every device is taken or a lone trial holds the device. Slot 0 of
    every device comes before slot 1 of any: trials spread over the GPUs before they pile up."""
    for slot in range(trials_per_gpu):
        for device in pool:
            device_fd = _try_lock(lock_dir / _lock_name(device), shared=True)
            if device_fd is None:
                continue
            slot_fd = _try_lock(lock_dir / _slot_name(device, slot))
            if slot_fd is not None:
                return device, slot, [device_fd, slot_fd]
            os.close(device_fd)
    return None


@contextmanager
def claim_gpu_share(
    trials_per_gpu: int,
    *,
    lock_dir: Path | None = None,
    poll_seconds: float = 2.0,
    timeout_seconds: float | None = None,
    environ: MutableMapping[str, str] = os.environ,
) -> Iterator[GpuShare]:
    """Claim one GPU that up to ``trials_per_gpu`` trials share, for the ``with`` block.

    ``trials_per_gpu`` 1 is ``claim_gpu(1)``: the GPU to itself. Otherwise, as ``claim_gpu`` does
    (Slurm's choice kept, None on a machine without GPUs, waiting while none is free), but the
    GPU is one with a free slot and no lone trial on it; ``CUDA_VISIBLE_DEVICES`` names it.
    """
    if trials_per_gpu < 1:
        raise ValueError(f"claim_gpu_share: trials_per_gpu must be >= 1, got {trials_per_gpu}")
    if trials_per_gpu == 1 or slurm_placed(environ) or not local_pool(environ):
        with claim_gpu(
            1, lock_dir=lock_dir, poll_seconds=poll_seconds, timeout_seconds=timeout_seconds, environ=environ
        ) as device:
            yield GpuShare(device=device, slot=None, trials_per_gpu=1, trials_at_start=1)
        return
    _check_cuda_untouched()
    pool = local_pool(environ)
    lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir(environ)
    lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    device, slot, fds = _wait(
        lambda: _lock_slot(pool, lock_dir, trials_per_gpu),
        f"no free slot of {trials_per_gpu} per GPU among {pool}",
        lock_dir,
        poll_seconds,
        timeout_seconds,
    )
    try:
        with _visible(device, environ):
            yield GpuShare(device, slot, trials_per_gpu, occupants(device, lock_dir, trials_per_gpu))
    finally:
        for fd in fds:
            os.close(fd)
