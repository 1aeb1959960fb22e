"""A real Slurm cluster on this machine for the tests: slurmctld + two slurmd daemons emulating nodes n1 and n2.

Debian's Slurm runs as root without systemd or cgroups; both emulated nodes are this host (127.0.0.1) and share
its filesystem. `make slurm-deps` installs the packages. `LocalSlurm.start()` raises `ClusterUnavailable` with
the reason when the cluster cannot come up (not root, packages missing, daemons failing), and the tests skip
with that reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NODES = ("n1", "n2")


class ClusterUnavailable(RuntimeError):
    pass


class LocalSlurm:
    def __init__(self, root: Path, ctld_port: int = 16817, slurmd_ports: tuple[int, ...] = (17001, 17002)):
        self.root = Path(root)
        self.ctld_port = ctld_port
        self.slurmd_ports = slurmd_ports
        self.conf = self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment Slurm client commands (sbatch, squeue, scontrol) need to reach this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _config(self) -> str:
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        memory_mb = max(1024, _total_memory_mb() // len(NODES))
        d = self.root
        lines = [
            "ClusterName=fttest", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={self.ctld_port}", "AuthType=auth/none", "CredType=cred/none",
            # A requeued job waits cred_expire + 1 s before it may start again (the default is 121 s).
            "AuthInfo=cred_expire=10",
            f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/run/slurmctld.pid", f"SlurmdPidFile={d}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log", f"SlurmdLogFile={d}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SwitchType=switch/none",
            "MpiDefault=none", "MailProg=/bin/true", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill", "SchedulerParameters=bf_interval=1,sched_interval=2",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2", "KillWait=10",
        ]
        for name, port in zip(NODES, self.slurmd_ports):
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
                         f"RealMemory={memory_mb} State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def start(self, timeout_s: float = 30.0) -> "LocalSlurm":
        missing = [b for b in ("slurmctld", "slurmd", "sbatch", "srun", "scontrol") if shutil.which(b) is None]
        if missing:
            raise ClusterUnavailable(f"Slurm is not installed ({', '.join(missing)} missing): run `make slurm-deps`")
        if os.geteuid() != 0:
            raise ClusterUnavailable("the local Slurm cluster runs its daemons as root; this user is not root")
        for sub in ("state", "run", "log", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._config())
        env = self.env
        self._run(["slurmctld", "-f", str(self.conf)], env)
        for node in NODES:
            self._run(["slurmd", "-f", str(self.conf), "-N", node], env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            idle = subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], env=env, capture_output=True,
                                  text=True).stdout.split()
            if sorted(set(idle)) == sorted(NODES):
                return self
            time.sleep(0.3)
        logs = "; ".join(f"{p.name}: {p.read_text()[-300:]!r}" for p in sorted((self.root / "log").glob("*.log")))
        self.stop()
        raise ClusterUnavailable(f"Slurm nodes did not become idle within {timeout_s:.0f} s ({logs})")

    def _run(self, argv: list[str], env: dict[str, str]) -> None:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            self.stop()
            raise ClusterUnavailable(f"{' '.join(argv)} failed: {(proc.stderr or proc.stdout).strip()[-400:]}")

    def stop(self) -> None:
        """Stop the daemons by the PIDs in their pid files (never by name: other clusters may be running)."""
        for pid_file in sorted((self.root / "run").glob("*.pid")):
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                continue
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)

    # ------------------------------------------------------------------ job helpers for tests
    def job_state(self, job_id: str) -> dict[str, str]:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.env, capture_output=True,
                             text=True).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait_for(self, job_id: str, states: tuple[str, ...], timeout_s: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_state(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} did not reach {states} in {timeout_s:.0f} s; last: "
                           f"{info.get('JobState')} {info.get('Reason')}")


def _total_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 4096
