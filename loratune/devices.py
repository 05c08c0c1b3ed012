"""Which GPU a training trial runs on.

Snakemake schedules jobs against a `gpu` resource count but never says *which* GPU a job
gets. Under Slurm the scheduler does: it sets ``CUDA_VISIBLE_DEVICES`` from the job's GRES,
and we keep it. On a workstation, concurrent trials claim a GPU each through advisory lock
files, one per device, so two trials never share a GPU. A lock is an ``flock`` on an open
file: the kernel drops it when the process exits, crash or kill included, so a stale lock
cannot outlive its trial.

``CUDA_VISIBLE_DEVICES`` is read once, when CUDA initializes, so the claim must happen
before the first CUDA call of the process.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from pathlib import Path

GPU_COUNT_ENV = "LORATUNE_GPUS"
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"


def default_lock_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``${TMPDIR:-/tmp}/loratune-gpus-<uid>``: per user, so users of a shared machine never block each other's locks."""
    return Path(environ.get("TMPDIR") or "/tmp") / f"loratune-gpus-{os.getuid()}"


def under_slurm(environ: Mapping[str, str] = os.environ) -> bool:
    """True inside a Slurm job (batch script or job step)."""
    return bool(environ.get("SLURM_JOB_ID"))


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
    UUIDs or MIG names); otherwise every GPU counts, by index.
    """
    visible = environ.get(VISIBLE_ENV)
    if visible is not None:
        return [device.strip() for device in visible.split(",") if device.strip()]
    return [str(index) for index in range(gpu_count(environ))]


def _lock_name(device: str) -> str:
    # UUIDs and MIG names hold characters that are awkward in file names.
    return re.sub(r"[^A-Za-z0-9_.-]", "_", device) + ".lock"


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive lock on ``path``, or None if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
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

    ``count=0`` (a CPU trial) claims nothing and yields None. Inside a Slurm job, yield what
    Slurm put in ``CUDA_VISIBLE_DEVICES`` for the job (None if it got no GPU) and take no
    lock. Locally, yield None on a machine without GPUs; otherwise lock ``count`` free
    devices of ``local_pool``, waiting ``poll_seconds`` between attempts while too few are
    free (for ever, or until ``timeout_seconds``, then ``TimeoutError``), set
    ``CUDA_VISIBLE_DEVICES`` to them ("0" or "2,3") and yield that. On exit the previous
    ``CUDA_VISIBLE_DEVICES`` is restored and the locks released.
    """
    if count < 0:
        raise ValueError(f"claim_gpu: count must be >= 0, got {count}")
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        raise RuntimeError(
            "claim_gpu: CUDA is already initialized in this process; "
            "claim the GPU before the first CUDA call"
        )
    if count == 0:
        yield None
        return
    if under_slurm(environ):
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
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    while (held := _lock_free(pool, lock_dir, count)) is None:
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(
                f"claim_gpu: fewer than {count} free GPU(s) among {pool} after {timeout_seconds} s "
                f"(locks in {lock_dir})"
            )
        time.sleep(poll_seconds)

    previous = environ.get(VISIBLE_ENV)
    devices = ",".join(device for device, _ in held)
    environ[VISIBLE_ENV] = devices
    try:
        yield devices
    finally:
        if previous is None:
            environ.pop(VISIBLE_ENV, None)
        else:
            environ[VISIBLE_ENV] = previous
        for _, fd in held:
            os.close(fd)  # closing the descriptor releases the flock
