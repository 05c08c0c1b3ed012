"""A real single-node Slurm cluster on localhost, started and stopped by a test.

Debian's slurm-wlm daemons (slurmctld, slurmd) and munge run in the foreground as children
of the test process, with all their state in one temporary folder. Two fake GPUs are
character devices in that folder, declared through gres.conf: Slurm schedules them and sets
CUDA_VISIBLE_DEVICES for each job exactly as on a GPU cluster. No slurmdbd: the profile
under test must work on sites without job accounting.

Slurm's job-step plugin drops SLURM_CONF before its nested srun, so the configuration has
to live at the default path, /etc/slurm/slurm.conf. We write it there with a marker line
and refuse to touch one without it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = REPO / ".ci" / "slurm-setup.sh"
SLURM_CONF = Path("/etc/slurm/slurm.conf")
GRES_CONF = Path("/etc/slurm/gres.conf")
MARKER = "# written by loratune tests/slurm/cluster.py: a throwaway test cluster"
REQUIRED_PROGRAMS = ("slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "munged", "munge")


@dataclass(frozen=True)
class ClusterSpec:
    gpus: int = 2
    gpu_type: str = "v100"
    partition: str = "gpu"
    # More than this machine has: the node is a scheduling fiction (SlurmdParameters=
    # config_overrides), sized so that small CPU jobs never wait behind GPU jobs.
    cpus: int = 8
    memory_mb: int = 64000
    # squeue (the profile's status command) sees a finished job for MinJobAge seconds.
    min_job_age_s: int = 300


def unavailable_reason(install: bool = True) -> str | None:
    """Why a test cluster cannot run here, or None. Installs the packages when missing and allowed."""
    if os.geteuid() != 0:
        return "starting a Slurm cluster needs root (daemons, /etc/slurm/slurm.conf)"
    if _missing_programs() and install:
        try:
            subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=900, check=True)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            output = getattr(error, "stderr", "") or ""
            return f"could not install Slurm with {SETUP_SCRIPT}: {output.strip()[-300:] or error}"
    if missing := _missing_programs():
        return f"Slurm programs not installed: {', '.join(missing)} (run {SETUP_SCRIPT} as root)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "the munge user does not exist (the munge package creates it)"
    if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text():
        return f"{SLURM_CONF} belongs to a real Slurm installation; not replacing it"
    if running := running_daemons():
        return f"Slurm daemons already running on this machine: {running}"
    return None


def _missing_programs() -> list[str]:
    return [program for program in REQUIRED_PROGRAMS if shutil.which(program) is None]


def running_daemons() -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                name = (proc / "comm").read_text().strip()
            except OSError:
                continue
            if name in ("slurmctld", "slurmd", "slurmstepd"):
                found.append(f"{name}[{proc.name}]")
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    """Poll ``predicate`` until true; every wait of the harness and its tests is bounded."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {timeout_s} s: {what}")
        time.sleep(interval_s)


@dataclass
class SlurmCluster:
    """Use as a context manager: ``with SlurmCluster() as cluster: ...``."""

    spec: ClusterSpec = field(default_factory=ClusterSpec)
    root: Path = field(init=False)
    node: str = field(init=False)
    _daemons: dict[str, subprocess.Popen] = field(init=False, default_factory=dict)

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- paths -------------------------------------------------------------------------
    @property
    def munge_socket(self) -> Path:
        return self.root / "munge-socket" / "munge.socket"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def gpu_device(self, index: int) -> Path:
        return self.root / "dev" / f"gpu{index}"

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        reason = unavailable_reason(install=False)
        if reason:
            raise RuntimeError(f"test cluster: {reason}")
        self.root = Path(tempfile.mkdtemp(prefix="loratune-slurm-"))
        self.root.chmod(0o755)  # munged, running as munge, must reach its socket folder
        self.node = socket.gethostname().split(".")[0]
        try:
            self._prepare_munge()
            self._write_configuration()
            self._start_daemons()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel every job, wait for the job steps to end, stop the daemons, remove all state."""
        try:
            if "slurmctld" in self._daemons and self._daemons["slurmctld"].poll() is None:
                subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True, timeout=30)
                # A job step outlives slurmd: let every step end before the daemons go.
                wait_until(lambda: not self.active_jobs(), 60, "all jobs of the test cluster ended")
        finally:
            self._terminate_daemons()
            for path in (SLURM_CONF, GRES_CONF):
                if path.exists() and MARKER in path.read_text():
                    path.unlink()
            shutil.rmtree(self.root, ignore_errors=True)

    def _prepare_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        private = self.root / "munge"
        public = self.munge_socket.parent
        for folder, mode in ((private, 0o700), (public, 0o755)):
            folder.mkdir()
            os.chown(folder, munge.pw_uid, munge.pw_gid)
            folder.chmod(mode)
        key = private / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)

    def _write_configuration(self) -> None:
        for name in ("state", "spool", "log", "run", "dev"):
            (self.root / name).mkdir()
        for index in range(self.spec.gpus):
            # gres.conf accepts only character devices; /dev/null's numbers will do.
            os.mknod(self.gpu_device(index), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        spec, root = self.spec, self.root
        slurm_conf = f"""{MARKER}
ClusterName=loratune-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd.log
# No cgroups: the test machine may not delegate them.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge={spec.min_job_age_s}
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
GresTypes=gpu
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={spec.cpus} RealMemory={spec.memory_mb} Gres=gpu:{spec.gpu_type}:{spec.gpus} State=UNKNOWN
PartitionName={spec.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        gres_conf = MARKER + "\n" + "".join(
            f"NodeName={self.node} Name=gpu Type={spec.gpu_type} File={self.gpu_device(i)}\n"
            for i in range(spec.gpus)
        )
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text(slurm_conf)
        GRES_CONF.write_text(gres_conf)

    def _spawn(self, name: str, command: list[str], user: str | None = None) -> None:
        log = open(self.log_dir / f"{name}.out", "wb")
        self._daemons[name] = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, user=user,
            start_new_session=True,  # a Ctrl-C of the test reaches the test, which stops us in order
        )
        log.close()

    def _start_daemons(self) -> None:
        private = self.root / "munge"
        self._spawn("munged", [
            "munged", "--foreground", f"--key-file={private}/munge.key", f"--socket={self.munge_socket}",
            f"--pid-file={private}/munged.pid", f"--log-file={private}/munged.log",
            f"--seed-file={private}/munged.seed",
        ], user="munge")
        wait_until(self.munge_socket.exists, 10, "munge socket")
        self._spawn("slurmctld", ["slurmctld", "-D"])
        wait_until(lambda: self._quiet(["scontrol", "ping"]), 20, "slurmctld answering")
        self._spawn("slurmd", ["slurmd", "-D"])
        wait_until(self._node_idle, 30, f"node {self.node} idle")

    def _terminate_daemons(self) -> None:
        # Reverse start order: slurmd before slurmctld, munge last.
        for name in reversed(list(self._daemons)):
            process = self._daemons.pop(name)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)

    # -- queries -----------------------------------------------------------------------
    def _quiet(self, command: list[str]) -> bool:
        return subprocess.run(command, capture_output=True, timeout=10).returncode == 0

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=10)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still remembers (finished ones for MinJobAge seconds)."""
        out = subprocess.run(
            ["squeue", "--states=all", "--noheader", "--format=%i|%T|%j|%k"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        keys = ("id", "state", "name", "comment")
        return [dict(zip(keys, line.split("|"), strict=True)) for line in out.stdout.splitlines() if line]

    def active_jobs(self) -> list[dict[str, str]]:
        return [job for job in self.jobs() if job["state"] in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING")]

    def log_tail(self, lines: int = 40) -> str:
        """The daemons' recent log lines, for a failing test's message."""
        parts = []
        for log in sorted(self.log_dir.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(parts)
