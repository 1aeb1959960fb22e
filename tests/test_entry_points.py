"""Users start ft their way: accelerate launch with their accelerate config (DeepSpeed ZeRO-2/3, a
deepspeed_config_file, MULTI_CPU), the deepspeed launcher, torchrun, and their own DeepSpeed JSON. Each is run for
real with 2 processes on CPU and must train exactly what `ft launch` of the same settings trains; what cannot work
is refused in one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ftcore.dist_env import free_port
from tests.conftest import ROOT, read_jsonl, run_ft

pytestmark = [pytest.mark.multiproc, pytest.mark.trains]

HF_ZERO2 = "examples/deepspeed/zero2_hf_trainer.json"
HF_ZERO3 = "examples/deepspeed/zero3_hf_trainer.json"
# Leaves the distributed section, the accumulation and the precision to the launcher.
TINY = """\
output_dir: {out}
adapter: {{method: lora, r: 8, alpha: 16, dropout: 0.0}}
data:
  train: [{{path: "builtin:chat-demo", format: chat}}]
  max_seq_len: 64
  audit: true
train: {{micro_batch_size: 2, max_steps: 3, lr: 3.0e-3, warmup_steps: 1}}
"""


def accelerate_config(path: Path, distributed_type: str, deepspeed: dict | None = None) -> Path:
    lines = ["compute_environment: LOCAL_MACHINE", f"distributed_type: {distributed_type}", "machine_rank: 0",
             "num_machines: 1", "num_processes: 2", "use_cpu: true", "mixed_precision: 'no'"]
    if deepspeed:
        lines.append("deepspeed_config:")
        lines += [f"  {k}: {v}" for k, v in deepspeed.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def bin_of(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("entry")


def config_file(base: Path, name: str) -> tuple[Path, Path]:
    out = base / name
    path = base / f"{name}.yaml"
    path.write_text(TINY.format(out=out))
    return path, out


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in read_jsonl(out / "audit" / "rank0.jsonl")]


def world(out: Path) -> int:
    import json

    return json.loads((out / "audit" / "rank1_world.json").read_text())["dist_world_size"]


@pytest.fixture(scope="module")
def ft_launch_zero2(base) -> Path:
    cfg, out = config_file(base, "ft_zero2")
    run_ft("launch", str(cfg), "--nproc", "2")
    return out


@pytest.fixture(scope="module")
def ft_launch_zero3_gas2(base) -> Path:
    """ft launch with the user's HF-Trainer ZeRO-3 JSON (no zero_stage in the ft config: the JSON's is taken)."""
    cfg, out = config_file(base, "ft_zero3")
    proc = run_ft("launch", str(cfg), "--nproc", "2", "--set", f"distributed.deepspeed_config={HF_ZERO3}",
                  "--set", "train.grad_accum_steps=2")
    assert f"distributed.zero_stage=3 from {HF_ZERO3}: zero_optimization.stage=3" in proc.stdout
    assert "ZeRO-3" in proc.stdout
    return out


def test_accelerate_launch_with_a_deepspeed_zero3_accelerate_config(base, ft_launch_zero3_gas2):
    cfg, out = config_file(base, "acc_zero3")
    acc = accelerate_config(base / "accelerate_zero3.yaml", "DEEPSPEED",
                            {"zero_stage": 3, "gradient_accumulation_steps": 2, "offload_optimizer_device": "none",
                             "offload_param_device": "none", "zero3_init_flag": "true",
                             "zero3_save_16bit_model": "true"})
    proc = run([bin_of("accelerate"), "launch", "--config_file", str(acc), "--main_process_port", str(free_port()),
                "-m", "launcher.cli", "train", str(cfg)])
    assert "distributed.zero_stage=3 from the accelerate config (zero_stage=3)" in proc.stdout
    assert "train.grad_accum_steps=2 from the accelerate config (gradient_accumulation_steps=2)" in proc.stdout
    assert world(out) == 2
    assert losses(out) == pytest.approx(losses(ft_launch_zero3_gas2), rel=1e-6)


def test_accelerate_launch_with_a_zero2_accelerate_config_and_flags(base, ft_launch_zero2):
    cfg, out = config_file(base, "acc_zero2")
    acc = accelerate_config(base / "accelerate_zero2.yaml", "DEEPSPEED", {"zero_stage": 2})
    run([bin_of("accelerate"), "launch", "--config_file", str(acc), "--main_process_port", str(free_port()),
         "-m", "launcher.cli", "train", str(cfg)])
    assert world(out) == 2 and losses(out) == pytest.approx(losses(ft_launch_zero2), rel=1e-6)


def test_accelerate_launch_with_a_deepspeed_config_file(base, ft_launch_zero2):
    """The HF-Trainer ZeRO-2 JSON, unchanged, given to accelerate as deepspeed_config_file."""
    cfg, out = config_file(base, "acc_file")
    acc = accelerate_config(base / "accelerate_file.yaml", "DEEPSPEED", {"deepspeed_config_file": HF_ZERO2})
    proc = run([bin_of("accelerate"), "launch", "--config_file", str(acc), "--main_process_port", str(free_port()),
                "-m", "launcher.cli", "train", str(cfg)])
    assert f"distributed.deepspeed_config='{HF_ZERO2}' from the accelerate config" in proc.stdout
    assert world(out) == 2 and losses(out) == pytest.approx(losses(ft_launch_zero2), rel=1e-6)
    import json

    ds = json.loads((out / "ds_config.json").read_text())
    from ftcore.preflight import model_config_json

    hidden = model_config_json("builtin:tiny-llama")["hidden_size"]
    assert ds["zero_optimization"]["reduce_bucket_size"] == hidden * hidden  # "auto" filled as HF Trainer does
    assert ds["train_batch_size"] == 4 and "optimizer" not in ds and "scheduler" not in ds


def test_deepspeed_launcher(base, ft_launch_zero2):
    cfg, out = config_file(base, "deepspeed")
    run([bin_of("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "launcher.cli",
         "train", str(cfg)])
    assert world(out) == 2 and losses(out) == pytest.approx(losses(ft_launch_zero2), rel=1e-6)


def test_torchrun(base, ft_launch_zero2):
    cfg, out = config_file(base, "torchrun")
    run([bin_of("torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "launcher.cli",
         "train", str(cfg)])
    assert world(out) == 2 and losses(out) == pytest.approx(losses(ft_launch_zero2), rel=1e-6)


def test_a_one_process_accelerate_launch_asked_for_two_trains_two(base, ft_launch_zero2):
    """accelerate's one-process launcher (--cpu --num_processes 2) starts one process; that process starts the two
    asked for, as ft launch would: the same world and losses, no traceback."""
    cfg, out = config_file(base, "cpu_flag")
    proc = run([bin_of("accelerate"), "launch", "--cpu", "--num_processes", "2", "-m", "launcher.cli", "train",
                str(cfg)])
    assert "accelerate launch started 1 process for num_processes=2" in proc.stderr and "Traceback" not in proc.stderr
    assert world(out) == 2 and losses(out) == pytest.approx(losses(ft_launch_zero2), rel=1e-6)


def test_the_world_an_accelerate_launch_asked_for_is_read_as_accelerate_reads_it(base):
    from ftcore.launch_settings import accelerate_asked_world

    config = accelerate_config(base / "multi_cpu.yaml", "MULTI_CPU")
    assert accelerate_asked_world(["--cpu", "--num_processes", "2", "-m", "launcher.cli", "train", "c.yaml"]) == (2, 1)
    assert accelerate_asked_world(["--config_file", str(config), "-m", "launcher.cli", "train", "c.yaml"]) == (2, 1)
    assert accelerate_asked_world(["--config_file", str(config), "--num_processes", "3", "-m", "launcher.cli",
                                   "train", "c.yaml", "--set", "a=b"]) == (3, 1)


def test_a_contradiction_between_the_accelerate_config_and_the_ft_config_names_both(base):
    cfg, out = config_file(base, "contradiction")
    acc = accelerate_config(base / "acc_z3_only.yaml", "DEEPSPEED", {"zero_stage": 3})
    proc = run([bin_of("accelerate"), "launch", "--config_file", str(acc), "--main_process_port", str(free_port()),
                "-m", "launcher.cli", "train", str(cfg), "--set", "distributed.zero_stage=2"], check=False)
    assert proc.returncode != 0
    # Both ranks read the same config and fail on it; the first to fail is the one the user reads (torchrun's agent
    # stops the other, which under load may not have got as far as its own message).
    assert re.search(r"\[rank [01]\] error: distributed\.zero_stage: --set says 2 but the accelerate config "
                     r"\(zero_stage=3\) says 3", proc.stderr), proc.stderr[-3000:]
    assert not (out / "checkpoints").exists()
