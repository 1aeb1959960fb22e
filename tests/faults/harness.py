"""Fault injection against the real `ft` CLI: real processes, real signals, real filesystems.

Used by the fault tests (tests/faults/, a few trials each) and by benchmarks/faults.py (full scale). Every
scenario returns counts; a scenario never mocks what it breaks.

- kill:    SIGKILL of `ft launch` (the node's agent; its ranks must die with it) at seeded random moments (during
           start-up, between steps, while a checkpoint is being written, while an old one is pruned), then the same
           command again, until the
           run finishes. After each kill, `latest` must name a complete, loadable checkpoint; at the end the final
           adapter must equal an uninterrupted run's, bit for bit. No process may survive a kill.
- dead:    one rank SIGKILLed while its peer waits in a collective: the launcher must stop, name that rank with
           its log tail, exit non-zero within a bound, and leave no process behind.
- hang:    one rank SIGSTOPped (alive, silent): the collective timeout (distributed.timeout_s) must end the run
           within timeout + the launcher's stop grace, exit non-zero, nothing left behind.
- signal:  SIGTERM or SIGUSR1 to `ft launch` at seeded random moments, including right after an eval step and
           while a checkpoint is written: exit 75 (or 0 if training had already finished); rerunning gives the
           uninterrupted run's final adapter.
- bad inputs: see bad_inputs.py.
- disk full: a size-limited tmpfs filled up before a checkpoint write / during an export.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12
TIMEOUT_S = 15  # distributed.timeout_s in the hang scenario
STOP_GRACE_S = 3  # distributed.stop_grace_s there: torch elastic's SIGTERM -> SIGKILL grace (product default 30)


def run_args(out: Path, *extra: str) -> list[str]:
    """A 2-process ZeRO-2 LoRA run of STEPS steps with a checkpoint every 2 steps and an eval every 3."""
    return ["launch", "examples/chat-demo.yaml", "--nproc", "2", "--set", f"output_dir={out}",
            "--set", f"train.max_steps={STEPS}", "--set", "train.micro_batch_size=4", "--set", "data.max_seq_len=64",
            "--set", "logging.every=1", "--set", "evaluation.every=3", "--set", "checkpoint.every_steps=2",
            "--set", "checkpoint.keep_last=2", "--set", "optimizer.warmup_steps=2", "--set", "logging.report_to=none",
            "--set", "data.audit=true", *extra]


def ft_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher.cli", *args]


def environment() -> dict:
    env = dict(os.environ)
    env.setdefault("FT_CACHE_DIR", str(ROOT / ".pytest_cache" / "ft-cache"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


@dataclass
class Launch:
    """One `ft launch` attempt, its output in a file (so polling it never blocks the process)."""

    args: list[str]
    log: Path
    proc: subprocess.Popen = field(init=False)
    started: float = field(init=False)

    def __post_init__(self) -> None:
        from tests.conftest import check_marked_trains

        check_marked_trains(self.args)
        self.handle = open(self.log, "w")
        self.proc = subprocess.Popen(ft_command(*self.args), cwd=ROOT, stdout=self.handle, stderr=subprocess.STDOUT,
                                     env=environment(), start_new_session=True)
        self.started = time.monotonic()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def step(self) -> int:
        """The last step this attempt has logged."""
        steps = re.findall(r"step (\d+)/\d+ loss", self.text())
        return int(steps[-1]) if steps else 0

    def descendants(self) -> list[int]:
        import psutil

        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.Error:
            return []

    def ranks(self) -> dict[int, int]:
        """rank -> pid of this node's training processes."""
        import psutil

        out = {}
        for pid in self.descendants():
            try:
                rank = psutil.Process(pid).environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None and "launcher.cli" in " ".join(psutil.Process(pid).cmdline()):
                out[int(rank)] = pid
        return out

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.handle.close()

    def kill_all(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def alive(pids: list[int]) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def wait_gone(pids: list[int], within: float = 20.0) -> list[int]:
    """PIDs still running after `within` seconds (orphans)."""
    deadline = time.monotonic() + within
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive(pids)


def wait_until(condition, timeout: float, poll: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll)
    return False


def checkpoint_writing(out: Path) -> bool:
    return any((out / "checkpoints").glob("step-*.tmp"))


def latest_is_sound(out: Path) -> bool:
    """What `latest` names (or, before the first checkpoint, nothing) is complete and loadable; every complete
    step dir verifies."""
    import torch

    from ftcore.checkpoint import CheckpointError, CheckpointManager, verify_checkpoint
    from ftcore.config import CheckpointConfig

    manager = CheckpointManager(out, CheckpointConfig(keep_last=2))
    try:
        latest = manager.latest()
        if latest is None:
            return not (manager.root / "latest").exists()
        for step_dir in manager._complete_dirs():
            verify_checkpoint(step_dir)
        for path in latest.rglob("*.pt"):  # every tensor file loads
            torch.load(path, map_location="cpu", weights_only=False)
        return True
    except (CheckpointError, OSError, RuntimeError, ValueError):
        return False


def logs_whole(out: Path) -> bool:
    """Every line of the run's JSON-lines logs (metrics, per-rank audit) parses: a killed append was cut off."""
    for path in [out / "metrics.jsonl", *sorted((out / "audit").glob("rank*.jsonl"))]:
        try:
            for line in path.read_text().splitlines():
                json.loads(line)
        except (OSError, ValueError):
            return False
    return True


def same_final(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    fa, fb = (load_file(p / "final" / "adapter_model.safetensors") for p in (a, b))
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def reference_run(work: Path) -> Path:
    out = work / "reference"
    launch = Launch(run_args(out), work / "reference.log")
    if launch.wait() != 0:
        raise RuntimeError(f"the uninterrupted reference run failed:\n{launch.text()[-3000:]}")
    return out


# ---------------------------------------------------------------------------------------------- kill -9
MOMENTS = ("startup", "step", "checkpoint", "prune")


def pruning(out: Path) -> bool:
    """A checkpoint was just renamed into place and the oldest beyond keep_last=2 is about to go (or going)."""
    root = out / "checkpoints"
    complete = [p for p in root.glob("step-*") if p.is_dir() and (p / "manifest.json").is_file()
                and not p.name.endswith((".tmp", ".old"))]
    return len(complete) > 2 or any(root.glob("deleting.*"))


def _fire_at_moment(launch: Launch, out: Path, moment: str, rng: random.Random) -> bool:
    """Wait for the chosen moment; False if the attempt finished first."""
    done = lambda: launch.proc.poll() is not None  # noqa: E731
    if moment == "startup":
        deadline = time.monotonic() + rng.uniform(1.0, 8.0)
        wait_until(lambda: done() or time.monotonic() > deadline, 30)
    elif moment == "step":
        target = min(STEPS - 1, launch_step_floor(out) + rng.randint(1, 4))
        wait_until(lambda: done() or launch.step() >= target, 120)
        time.sleep(rng.uniform(0.0, 0.4))
    elif moment == "prune":  # the deletion of an old checkpoint (a few ms): aim at its start
        wait_until(lambda: done() or pruning(out), 120, poll=0.001)
        time.sleep(rng.uniform(0.0, 0.002))
    else:
        wait_until(lambda: done() or checkpoint_writing(out), 120, poll=0.005)
        time.sleep(rng.uniform(0.0, 0.05))
    return not done()


def launch_step_floor(out: Path) -> int:
    """The step `latest` names (cheap enough to poll)."""
    name = (out / "checkpoints" / "latest")
    try:
        return int(name.read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return 0


def resume_step(out: Path) -> int:
    """The step the next attempt resumes from: the newest complete checkpoint, by the product's own rule (a
    kill between a step dir's rename and the `latest` pointer's update leaves a newer complete dir, which the
    resume rightly takes; the pointer alone would name the older step)."""
    from ftcore.checkpoint import CheckpointError, CheckpointManager
    from ftcore.config import CheckpointConfig

    try:
        latest = CheckpointManager(out, CheckpointConfig(keep_last=2)).latest()
    except (CheckpointError, OSError):
        return 0
    return int(latest.name.split("-")[1]) if latest is not None else 0


def kill_campaigns(work: Path, trials: int, seed: int, reference: Path, kills_per_run: int = 4) -> dict:
    rng = random.Random(seed)
    counts = {"kill_trials": 0, "kill_resumed_ok": 0, "corrupt_checkpoints": 0, "orphans_after_kill": 0,
              "kills_mid_deletion": 0, "kill_moments": {m: 0 for m in MOMENTS}, "campaign_failures": []}
    campaign = 0
    while counts["kill_trials"] < trials:
        out = work / f"kill-{campaign}"
        kills_here = 0
        attempt = 0
        resumed_right = True
        expected_resume: Optional[int] = None
        while True:
            launch = Launch(run_args(out), work / f"kill-{campaign}-attempt{attempt}.log")
            attempt += 1
            if expected_resume is not None:  # the attempt must start from the checkpoint `latest` named at the kill
                wait_until(lambda launch=launch: launch.proc.poll() is not None or "world size 2 |" in launch.text(),
                           120)
                found = re.search(r"resumed from \S+step-(\d+) at step", launch.text())
                resumed_right &= (int(found.group(1)) if found else 0) == expected_resume
            if kills_here < kills_per_run and counts["kill_trials"] < trials:
                moment = MOMENTS[counts["kill_trials"] % len(MOMENTS)]  # every moment; when within it is random
                if _fire_at_moment(launch, out, moment, rng):
                    children = launch.descendants()
                    os.kill(launch.proc.pid, signal.SIGKILL)  # the agent only: its ranks must follow it
                    launch.wait()
                    orphans = wait_gone(children)
                    if orphans:
                        counts["orphans_after_kill"] += len(orphans)
                        for pid in orphans:
                            os.kill(pid, signal.SIGKILL)
                    kills_here += 1
                    counts["kill_trials"] += 1
                    counts["kill_moments"][moment] += 1
                    if not latest_is_sound(out):
                        counts["corrupt_checkpoints"] += 1
                    # caught in the middle of deleting an old checkpoint (renamed aside, not yet gone)
                    counts["kills_mid_deletion"] += int(any((out / "checkpoints").glob("deleting.*")))
                    expected_resume = resume_step(out)
                    continue
            code = launch.wait()
            if code != 0:
                raise RuntimeError(f"kill campaign {campaign}: the rerun failed ({code}):\n{launch.text()[-3000:]}")
            break
        checks = {"same_final": same_final(out, reference), "latest_sound": latest_is_sound(out),
                  "resumed_from_latest": resumed_right, "logs_whole": logs_whole(out),
                  "finished": launch_step_floor(out) == STEPS}
        if all(checks.values()):
            counts["kill_resumed_ok"] += kills_here
        else:  # which property a campaign broke, so a count below kill_trials can be read
            counts["campaign_failures"].append(
                {"campaign": campaign, "kills": kills_here, "failed": [k for k, ok in checks.items() if not ok]})
        campaign += 1
    return counts


# ---------------------------------------------------------------------------------------------- stop signals
def signal_campaigns(work: Path, trials: int, seed: int, reference: Path) -> dict:
    rng = random.Random(seed + 1)
    counts = {"signal_trials": 0, "signal_resumed_equal": 0, "signal_exit_75": 0, "signal_moments": {},
              "signal_failures": []}
    for trial in range(trials):
        out = work / f"signal-{trial}"
        signum = rng.choice([signal.SIGTERM, signal.SIGUSR1])
        moment = ("startup", "step", "eval", "checkpoint")[trial % 4]  # every moment, even at CI scale
        launch = Launch(run_args(out), work / f"signal-{trial}.log")
        if moment == "eval":  # the eval runs right after steps 3, 6, 9
            target = rng.choice((3, 6, 9))
            wait_until(lambda launch=launch, target=target: launch.proc.poll() is not None
                       or launch.step() >= target, 120, poll=0.005)
        else:
            _fire_at_moment(launch, out, moment, rng)
        if launch.proc.poll() is None:
            launch.proc.send_signal(signum)
        code = launch.wait()
        key = f"{signum.name}@{moment}"
        counts["signal_moments"][key] = counts["signal_moments"].get(key, 0) + 1
        counts["signal_trials"] += 1
        if code == 75:
            counts["signal_exit_75"] += 1
            rerun = Launch(run_args(out), work / f"signal-{trial}-rerun.log")
            code = rerun.wait()
        if code == 0 and same_final(out, reference):
            counts["signal_resumed_equal"] += 1
        else:
            counts["signal_failures"].append({"trial": trial, "moment": key, "exit": code, "log": str(launch.log)})
    return counts


# ---------------------------------------------------------------------------------------------- dead and hung ranks
def dead_or_hung_rank(work: Path, trial: int, hang: bool) -> dict:
    """SIGKILL (dead) or SIGSTOP (hung) rank 1 after step 3; the launcher must end everything in bounded time."""
    out = work / f"{'hang' if hang else 'dead'}-{trial}"
    launch = Launch(run_args(out, "--set", f"distributed.timeout_s={TIMEOUT_S}",
                              "--set", f"distributed.stop_grace_s={STOP_GRACE_S}", "--set", "train.max_steps=400",
                              "--set", "checkpoint.every_steps=0", "--set", "evaluation.every=0"),
                    work / f"{'hang' if hang else 'dead'}-{trial}.log")
    wait_until(lambda: launch.proc.poll() is not None or launch.step() >= 3, 180)
    ranks = launch.ranks()
    children = launch.descendants()
    victim = ranks.get(1)
    if victim is None:
        launch.kill_all()
        raise RuntimeError(f"rank 1 not found among {ranks}:\n{launch.text()[-2000:]}")
    injected = time.monotonic()
    os.kill(victim, signal.SIGSTOP if hang else signal.SIGKILL)
    bound = TIMEOUT_S + STOP_GRACE_S + 30 if hang else 60
    try:
        code = launch.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        launch.kill_all()
        launch.wait()
        return {"detected": False, "seconds": None, "orphans": 0, "named": False, "code": None}
    seconds = time.monotonic() - injected
    orphans = wait_gone(children, within=10)
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)
    text = launch.text()
    named = "rank 1 failed first" in text and "last " in text
    return {"detected": code != 0 and named, "seconds": round(seconds, 1), "orphans": len(orphans),
            "named": named, "code": code}


# ---------------------------------------------------------------------------------------------- disk full
def mount_tmpfs(path: Path, size_mb: int) -> Optional[str]:
    """Mount a size-limited tmpfs at path; the reason it cannot be, or None."""
    if os.geteuid() != 0:
        return "mounting a size-limited tmpfs needs root"
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    return None if proc.returncode == 0 else f"mount -t tmpfs failed: {proc.stderr.strip()}"


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path, leave_bytes: int) -> None:
    """Take all but leave_bytes of the filesystem's free space."""
    chunk = b"\0" * (1 << 20)
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while shutil.disk_usage(directory).free > leave_bytes + len(chunk):
                f.write(chunk)
            f.write(b"\0" * max(shutil.disk_usage(directory).free - leave_bytes, 0))
        except OSError as e:  # a writer took some of it meanwhile: the disk is full either way
            if e.errno != 28:
                raise


def disk_full_checkpoint(work: Path, reference: Path) -> dict:
    """The disk holds room for two checkpoints and a half: the step-2 and step-4 saves fit, the step-6 save must
    fail clearly, leaving step 4 intact and named by `latest`; with space freed, the rerun resumes from step 4 and
    ends equal to the reference. The disk is filled before the run starts, sized by the reference's own
    checkpoint (the same config writes the same files), so where the run is when space runs out does not depend
    on how fast a filler races a running process on a busy machine."""
    mount = work / "small-checkpoint-disk"
    reason = mount_tmpfs(mount, 64)
    if reason:
        return {"skipped": reason}
    try:
        out = mount / "run"
        one_checkpoint = sum(f.stat().st_size for f in (reference / "checkpoints" / "step-000010").rglob("*")
                             if f.is_file())
        fill(mount, int(2.5 * one_checkpoint))
        launch = Launch(run_args(out, "--set", "evaluation.every=0"), work / "disk-full-checkpoint.log")
        code = launch.wait()
        text = launch.text()
        latest = launch_step_floor(out)
        leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-") and
                     p.name not in ("step-000002", "step-000004")]
        clean = (code != 0 and "no space left on device" in text and "step-000004 is intact" in text
                 and latest == 4 and latest_is_sound(out) and not leftovers
                 and "Traceback (most recent call last)" not in text)
        (mount / "filler").unlink()
        rerun = Launch(run_args(out, "--set", "evaluation.every=0"), work / "disk-full-checkpoint-rerun.log")
        resumed = rerun.wait() == 0 and "resumed from" in rerun.text()
        return {"clean": clean, "exit": code, "latest_after": latest, "leftovers": leftovers,
                "resumed_after_freeing": resumed,
                "line": next((line for line in text.splitlines() if "no space left" in line), "")[:400]}
    finally:
        unmount(mount)


def disk_full_export(work: Path, adapter: Path, during_write: bool) -> dict:
    """Export onto a disk that is too small from the start (the pre-check), or that fills while shards are being
    written: a clear error, nothing at --out, no staging directory left."""
    mount = work / f"small-export-disk-{'write' if during_write else 'precheck'}"
    needed_mb = 40 if not during_write else 64 + 40 + 8  # the export is ~37 MB; the pre-check keeps 64 MiB spare
    reason = mount_tmpfs(mount, 16 if not during_write else needed_mb)
    if reason:
        return {"skipped": reason}
    try:
        out = mount / "merged"
        log = work / f"disk-full-export-{'write' if during_write else 'precheck'}.log"
        with open(log, "w") as handle:
            proc = subprocess.Popen(ft_command("export", "--adapter", str(adapter), "--out", str(out),
                                               "--shard-size", "4MB", "--dtype", "float32"),
                                    cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=environment())
            if during_write:
                wait_until(lambda: proc.poll() is not None or any(mount.glob(".merged.tmp-*/model-00001-*")), 120,
                           poll=0.002)
                if proc.poll() is None:
                    # The export is paused while the disk fills: otherwise the two race for the space, and on a
                    # busy machine the export can win (write every shard before the filler is done) and pass.
                    os.kill(proc.pid, signal.SIGSTOP)
                    try:
                        fill(mount, 256 << 10)
                    finally:
                        os.kill(proc.pid, signal.SIGCONT)
            code = proc.wait(timeout=300)
        text = log.read_text()
        staging = list(mount.glob(".merged.tmp-*"))
        expect = "failed: No space left on device" if during_write else "not enough disk space"
        clean = (code != 0 and expect in text and not out.exists() and not staging
                 and "Traceback (most recent call last)" not in text)
        return {"clean": clean, "exit": code, "line": next((ln for ln in text.splitlines() if expect in ln), "")[:400]}
    finally:
        unmount(mount)
