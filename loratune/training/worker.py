"""A trial worker: one process that trains the trials of one GPU slot one after another.

A trial job spends most of its time on a small model before training starts: the process, the
imports (torch, transformers, peft), loading the base model and compiling kernels. The worker pays
for them once: the first trial job of a slot that finds no worker starts one (``run_in_worker``),
later jobs of that slot hand their trial to it over a Unix socket, and it keeps the base model
loaded (``models.BaseModels``), only the adapter being new for each trial. It exits once idle for
``idle_seconds``.

Each trial stays its own Snakemake job with its own files: the job keeps its trial lock, its GPU
slot and its metrics.json; the worker only runs ``run_trial`` and appends the trial's log to the
job's log file. A trial that fails fails alone (the worker drops the base model after a failed
trial and loads it again for the next). If the worker dies, the job waiting on it fails
(``WorkerDied``) and the next job starts a fresh worker; if the job dies, the worker stops
training its trial at once by exiting, so a trial never has two trainers.

An idle worker still holds its GPU memory. A job that claims a GPU asks the idle workers in its way
to exit first (``retire_workers``): a trial that has the GPU to itself those of every other slot of
the GPU, a sharing trial those of the GPU's lone-trial slot. The job's claim guarantees they are
idle: no job can hand them a trial while it holds it.

A worker is found by a key over what must match for it to stand in for a fresh process: the
Python and loratune it runs (the package's folder and the contents of its files, so a worker
started before an edit never trains a trial with the old code), the slot, and the environment
that configures the libraries.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

IDLE_SECONDS = 300
START_SECONDS = 300  # how long a new worker may take to listen (a cold import on a busy node)
# Environment variables that change what a trial computes or how the libraries behave.
KEYED_ENV = ("PYTHONPATH", "HF_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "CUDA_", "OMP_", "MKL_", "LORATUNE_")


class WorkerDied(RuntimeError):
    """The worker ended before answering: the job fails, as it would had its own process died."""


class TrialRaised(RuntimeError):
    """``run_trial`` raised in the worker; the message is ``"<ExceptionName>: <message>"``."""


def source_digest(package: Path) -> str:
    """A digest of every file of the package folder ``package`` (names and contents; compiled
    caches left out): it changes with any edit of the code a worker would run."""
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(package)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def worker_key(slot: str, environ=os.environ) -> str:
    import loratune

    package = Path(loratune.__file__).resolve().parent
    keyed = sorted((name, value) for name, value in environ.items() if name.startswith(KEYED_ENV))
    identity = [sys.executable, str(package), source_digest(package), slot, keyed]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def _send(conn: socket.socket, message: dict) -> None:
    conn.sendall((json.dumps(message) + "\n").encode())


def _receive(conn: socket.socket) -> dict | None:
    """One JSON line from ``conn``, or None if it closed first."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(1 << 16)
        if not chunk:
            return None
        data += chunk
    return json.loads(data)


@contextmanager
def _start_lock(socket_path: Path) -> Iterator[None]:
    """Held by a job while it connects or starts the worker, and by the worker while it decides to
    exit: so no job connects to a worker that is closing."""
    with open(socket_path.with_suffix(".start.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _exit_if_client_leaves(conn: socket.socket, done: threading.Event) -> None:
    """While a trial trains, end the worker if its job is gone (killed, cancelled): a rerun's job
    may then train the trial, and it must not have two trainers."""
    while not done.wait(1.0):
        readable, _, _ = select.select([conn], [], [], 0)
        if readable and not conn.recv(1, socket.MSG_PEEK):
            log.error("the job of this trial ended; the worker stops training it and exits")
            os._exit(3)


def _handle(conn: socket.socket, request: dict, base_models, served: int) -> int:
    """Train the trial ``request`` (from ``conn``) asks for; returns how many trials this worker has trained."""
    from loratune.training.trainer import run_trial

    done = threading.Event()
    threading.Thread(target=_exit_if_client_leaves, args=(conn, done), daemon=True).start()
    Path(request["log_path"]).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(request["log_path"], mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    previous_stderr = sys.stderr
    sys.stderr = handler.stream  # the step lines and warnings go to the job's log too
    root.addHandler(handler)
    try:
        log.info("trial worker (pid %d) trains this trial, its trial %d", os.getpid(), served + 1)
        try:
            os.chdir(request["cwd"])  # the job's relative paths (trial folder, data) are the job's
            metrics = run_trial(**request["kwargs"], base_models=base_models)
            served += 1
            reply = {
                "metrics": {
                    **metrics,
                    "worker": {"pid": os.getpid(), "trial": served, "base_model_loads": base_models.loads},
                }
            }
        except Exception as error:  # bad settings or data: the job raises it as its own
            log.error("run_trial raised:\n%s", traceback.format_exc())
            base_models.forget()
            reply = {"raised": f"{type(error).__name__}: {error}"}
    finally:
        done.set()
        sys.stderr = previous_stderr
        root.removeHandler(handler)
        handler.close()
    from loratune.files import jsonable

    try:
        _send(conn, jsonable(reply))
    except OSError:
        pass  # the job is gone; the watcher ends the worker
    return served


def _slot_file(socket_path: Path) -> Path:
    """Beside a worker's socket, for as long as it listens: the slot it trains (``retire_workers``)."""
    return socket_path.with_suffix(".slot")


@contextmanager
def _closing_if_alone(server: socket.socket, socket_path: Path) -> Iterator[bool]:
    """Under the start lock: close the server and take its files away unless a job is waiting to
    connect; yields whether it closed (the worker then exits)."""
    with _start_lock(socket_path):
        alone = not select.select([server], [], [], 0)[0]
        if alone:
            socket_path.unlink(missing_ok=True)
            _slot_file(socket_path).unlink(missing_ok=True)
            server.close()
        yield alone


def serve(socket_path: Path, idle_seconds: float, slot: str) -> None:
    """Answer trial requests on ``socket_path`` one at a time until idle for ``idle_seconds`` or
    asked to retire while idle."""
    from loratune.training.models import BaseModels

    base_models = BaseModels()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    socket_path.unlink(missing_ok=True)
    server.bind(str(socket_path))
    server.listen(8)
    _slot_file(socket_path).write_text(slot)
    import loratune.training.trainer  # noqa: F401  (the imports a job would pay, paid once here)

    log.info("trial worker %d of slot %s listening on %s", os.getpid(), slot, socket_path)
    served = 0
    while True:
        readable, _, _ = select.select([server], [], [], idle_seconds)
        if not readable:
            with _closing_if_alone(server, socket_path) as closed:
                if closed:
                    log.info("trial worker %d idle for %s s: exiting", os.getpid(), idle_seconds)
                    return
        conn, _ = server.accept()
        with conn:
            request = _receive(conn)
            if request is None:
                continue
            if request.get("retire"):
                with _closing_if_alone(server, socket_path) as closed:
                    _send(conn, {"retired": os.getpid()} if closed else {"busy": os.getpid()})
                    if closed:
                        log.info("trial worker %d asked to free its GPU: exiting", os.getpid())
                        # At once, the connection still open: the kernel closes it as it frees the
                        # process's GPU memory, which is what the asking job waits for.
                        os._exit(0)
                continue
            served = _handle(conn, request, base_models, served)


def _connect(socket_path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(socket_path))
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None
    return conn


def _start(socket_path: Path, idle_seconds: float, slot: str) -> socket.socket:
    """Start a worker in its own session (it outlives the job that started it) and connect."""
    import loratune

    log_path = socket_path.with_suffix(".log")
    # The worker imports the loratune this job runs (the key says so), wherever it came from.
    here = str(Path(loratune.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    with open(log_path, "a") as worker_log:
        process = subprocess.Popen(
            [sys.executable, "-m", "loratune.training.worker", str(socket_path), str(idle_seconds), slot],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=worker_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise WorkerDied(f"the trial worker exited at start ({process.returncode}); see {log_path}")
        conn = _connect(socket_path)
        if conn is not None:
            return conn
        time.sleep(0.1)
    process.kill()
    raise WorkerDied(f"the trial worker did not listen within {START_SECONDS} s; see {log_path}")


def socket_folder(lock_dir: Path) -> Path:
    """Where the workers of ``lock_dir``'s GPUs listen (a short path: a socket's is limited): the
    lock folder, or one under /tmp named after it, so that the workers of another lock folder (a
    Slurm allocation's: ``devices.default_lock_dir``) are never asked to retire."""
    short = hashlib.sha256(str(lock_dir).encode()).hexdigest()[:12]
    folder = Path(lock_dir) if len(str(lock_dir)) < 80 else Path("/tmp") / f"loratune-workers-{os.getuid()}-{short}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def socket_path_for(slot: str, lock_dir: Path, environ=os.environ) -> Path:
    return socket_folder(lock_dir) / f"worker-{worker_key(slot, environ)}.sock"


def retire_workers(
    lock_dir: Path, retire: Callable[[str], bool], keep: Path | None = None, timeout_seconds: float = 60
) -> list[int]:
    """Ask every listening worker whose slot ``retire`` names (but the one on ``keep``) to exit,
    and wait until each has (its GPU memory is freed with its process); the pids that exited. The
    caller's GPU claim must make them idle; one that is not answers busy and is left alone."""
    retired = []
    for slot_file in sorted(socket_folder(lock_dir).glob("worker-*.slot")):
        socket_path = slot_file.with_suffix(".sock")
        try:
            slot = slot_file.read_text()
        except OSError:
            continue  # it exited meanwhile
        if socket_path == keep or not retire(slot):
            continue
        conn = _connect(socket_path)
        if conn is None:
            continue  # it exited meanwhile, or died: nothing holds memory
        with conn:
            conn.settimeout(timeout_seconds)
            try:
                _send(conn, {"retire": True})
                reply = _receive(conn) or {}
                if "retired" in reply:
                    conn.recv(1)  # returns at the worker's exit, as the kernel closes its files and frees its GPU
            except OSError as error:  # a timeout included
                reply = {"error": str(error)}
        if "retired" not in reply:
            log.warning("the trial worker on %s (slot %s) did not retire: %s", socket_path, slot, reply or "no answer")
            continue
        log.info("the idle trial worker %d of slot %s exited to free its GPU", reply["retired"], slot)
        retired.append(reply["retired"])
    return retired


def run_in_worker(
    kwargs: dict[str, Any], *, slot: str, lock_dir: Path, log_path: str | Path, idle_seconds: float = IDLE_SECONDS
) -> dict[str, Any]:
    """``run_trial(**kwargs)`` in the worker of ``slot`` (started if there is none); its log is
    appended to ``log_path``. Raises ``TrialRaised`` where ``run_trial`` raised, ``WorkerDied``
    where the worker ended without an answer."""
    socket_path = socket_path_for(slot, lock_dir)
    with _start_lock(socket_path):
        conn = _connect(socket_path)
        started = conn is None
        if started:
            conn = _start(socket_path, idle_seconds, slot)
    with conn:
        log.info(
            "trial handed to the %s trial worker of slot %s (%s)", "new" if started else "running", slot, socket_path
        )
        sys.stderr.flush()
        _send(conn, {"kwargs": kwargs, "log_path": str(Path(log_path).resolve()), "cwd": os.getcwd()})
        reply = _receive(conn)
    if reply is None:
        raise WorkerDied(
            f"the trial worker of slot {slot} ended before it answered; see {socket_path.with_suffix('.log')}"
        )
    if "raised" in reply:
        raise TrialRaised(reply["raised"])
    return reply["metrics"]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3])
