"""Pure parts of the Slurm launch: hostlist expansion, rendezvous from the allocation's variables (with scontrol's
answers given as text), the rendered sbatch script, and the CLI's refusals. The real cluster is in
tests/test_slurm_cluster.py."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.hostlist import HostlistError, expand_hostlist
from launcher.slurm import (
    PORT_BASE,
    PORT_SPAN,
    TEMPLATE,
    SbatchOptions,
    SlurmError,
    derive_port,
    render_sbatch,
    rendezvous_from_slurm,
)
from tests.conftest import ft_in_process

HOSTLISTS = [
    ("gpu[01-04,07],cpu3", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]),
    ("n1", ["n1"]),
    ("n[1-2]", ["n1", "n2"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("node[098-101]", ["node098", "node099", "node100", "node101"]),
    ("a[1,3,5-6]b", ["a1b", "a3b", "a5b", "a6b"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("x1,x1", ["x1", "x1"]),
    ("gpu-a100-[0-1].cluster", ["gpu-a100-0.cluster", "gpu-a100-1.cluster"]),
    ("n[0]", ["n0"]),
]


@pytest.mark.parametrize("expression,hosts", HOSTLISTS)
def test_hostlist_expansion(expression, hosts):
    assert expand_hostlist(expression) == hosts


@pytest.mark.parametrize("bad,needle", [("", "empty"), ("n[1-2", "not closed"), ("n1-2]", "without '['"),
                                        ("n[2-1]", "ends before"), ("n[a-b]", "bad range"), ("n1,,n2", "empty"),
                                        ("n[[1]]", "nested")])
def test_hostlist_errors_name_the_problem(bad, needle):
    with pytest.raises(HostlistError, match=re.escape(needle)):
        expand_hostlist(bad)


class FakeScontrol:
    """scontrol's answers as text (what the real command prints), or None where it is not installed."""

    def __init__(self, nodes: dict[str, tuple[str, str]] | None, hostnames: bool = True):
        self.nodes, self.hostnames = nodes, hostnames

    def __call__(self, args):
        if self.nodes is None:
            return None
        if args[:2] == ["show", "hostnames"]:
            return "\n".join(expand_hostlist(args[2])) + "\n" if self.hostnames else None
        if args[:3] == ["show", "node", "-o"]:
            addr, host = self.nodes[args[3]]
            return f"NodeName={args[3]} Arch=x86_64 NodeAddr={addr} NodeHostName={host} State=ALLOCATED\n"
        raise AssertionError(args)


def slurm_env(nodelist="gpu[01-04]", nnodes="4", nodeid="2", job="4242", **extra):
    env = {"SLURM_JOB_ID": job, "SLURM_JOB_NODELIST": nodelist, "SLURM_NNODES": nnodes, "SLURM_NODEID": nodeid}
    env.update(extra)
    return env


FOUR_NODES = {f"gpu0{i}": (f"10.0.0.{i}", f"gpu0{i}") for i in range(1, 5)}


def test_rendezvous_from_a_four_node_allocation():
    rdzv = rendezvous_from_slurm(slurm_env(SLURMD_NODENAME="gpu03", SLURM_STEP_NUM_TASKS="4"),
                                 FakeScontrol(FOUR_NODES), this_host="gpu03")
    assert (rdzv.nnodes, rdzv.node_rank, rdzv.master_addr) == (4, 2, "10.0.0.1")
    assert rdzv.hosts == ("gpu01", "gpu02", "gpu03", "gpu04")
    assert rdzv.master_port == derive_port("4242", 0)
    # Every node computes the same head and port on its own.
    others = [rendezvous_from_slurm(slurm_env(nodeid=str(i)), FakeScontrol(FOUR_NODES), this_host=f"gpu0{i + 1}")
              for i in range(4)]
    assert {(r.master_addr, r.master_port) for r in others} == {("10.0.0.1", rdzv.master_port)}


def test_rendezvous_without_scontrol_uses_the_parser_and_dns():
    seen = []

    def resolve(name):
        seen.append(name)
        return "192.168.1.7"

    rdzv = rendezvous_from_slurm(slurm_env("gpu[01-04,07],cpu3", nnodes="6", nodeid="5"), FakeScontrol(None),
                                 this_host="cpu3", resolve=resolve)
    assert rdzv.master_addr == "gpu01" and seen == ["gpu01"]
    assert rdzv.hosts[-1] == "cpu3" and rdzv.node_rank == 5


def test_loopback_head_of_a_multi_node_job_is_refused():
    nodes = {"gpu01": ("gpu01", "gpu01"), "gpu02": ("gpu02", "gpu02")}
    with pytest.raises(SlurmError, match=r"head node gpu01 resolves to 127\.0\.1\.1 \(loopback\) in a 2-node "
                                         r"allocation that spans other machines \(gpu01\)"):
        rendezvous_from_slurm(slurm_env("gpu[01-02]", nnodes="2", nodeid="1"), FakeScontrol(nodes),
                              this_host="gpu02", resolve=lambda _: "127.0.1.1")


def test_loopback_head_is_fine_when_every_node_is_this_machine():
    nodes = {"n1": ("127.0.0.1", "vm"), "n2": ("127.0.0.1", "vm")}
    rdzv = rendezvous_from_slurm(slurm_env("n[1-2]", nnodes="2", nodeid="1"), FakeScontrol(nodes), this_host="vm")
    assert rdzv.master_addr == "127.0.0.1" and rdzv.node_rank == 1
    single = rendezvous_from_slurm(slurm_env("n1", nnodes="1", nodeid="0"), FakeScontrol({"n1": ("127.0.0.1", "x")}),
                                   this_host="vm")
    assert single.nnodes == 1


def test_explicit_master_addr_and_port_win():
    rdzv = rendezvous_from_slurm(slurm_env(), FakeScontrol(FOUR_NODES), master_addr="ib-gpu01", master_port=31000)
    assert (rdzv.master_addr, rdzv.master_port) == ("ib-gpu01", 31000)


@pytest.mark.parametrize("env,needle", [
    (slurm_env(nnodes="3"), r"SLURM_NNODES=3 but SLURM_JOB_NODELIST='gpu\[01-04\]' names 4 hosts"),
    (slurm_env(nodeid="4"), r"SLURM_NODEID=4 is outside 0\.\.3"),
    (slurm_env(SLURMD_NODENAME="gpu01"), r"SLURMD_NODENAME=gpu01 but SLURM_NODEID=2 is gpu03"),
    (slurm_env(SLURM_STEP_NUM_TASKS="32"), r"SLURM_STEP_NUM_TASKS=32 but SLURM_NNODES=4.*--ntasks-per-node=1"),
    (slurm_env(SLURM_STEP_NUM_NODES="2"), r"SLURM_STEP_NUM_NODES=2 but SLURM_NNODES=4"),
    ({k: v for k, v in slurm_env().items() if k != "SLURM_NODEID"}, r"SLURM_NODEID is not set"),
    (slurm_env(nnodes="four"), r"SLURM_NNODES='four' is not an integer"),
    ({}, r"SLURM_JOB_ID is not set"),
])
def test_inconsistent_allocation_variables_are_named(env, needle):
    with pytest.raises(SlurmError, match=needle):
        rendezvous_from_slurm(env, FakeScontrol(FOUR_NODES), this_host="gpu03")


def test_ports_differ_between_jobs_and_attempts_and_stay_in_range():
    ports = {derive_port(str(job), attempt) for job in range(1000, 1100) for attempt in range(3)}
    assert len(ports) == 300
    assert all(PORT_BASE <= p < PORT_BASE + PORT_SPAN for p in ports)
    assert derive_port("123_4", 0) == derive_port("1234", 0)  # array job ids


def options(**kw):
    base = dict(config_path="examples/chat-demo.yaml", overrides=("optimizer.lr=1e-4", "output_dir=/runs/my run"),
                nodes=4,
                gpus_per_node=8, nproc_per_node=8, ft_command=("/venv/bin/python", "-m", "launcher.cli"),
                workdir="/home/u/proj", log_dir="/runs/my run/logs")
    base.update(kw)
    return SbatchOptions(**base)


def directives(script: str) -> list[str]:
    return [shlex.split(line[len("#SBATCH "):])[0] for line in script.splitlines() if line.startswith("#SBATCH ")]


@pytest.mark.parametrize("kw,present,absent", [
    ({}, ["--nodes=4", "--gpus-per-node=8", "--ntasks-per-node=1", "--requeue", "--signal=B:USR1@120",
          "--chdir=/home/u/proj", "--open-mode=append", "--output=/runs/my run/logs/slurm-%x-%j.out"],
     ["--partition", "--time"]),
    (dict(nodes=1, gpus_per_node=0, nproc_per_node=2, cpus_per_task=4, mem="64G"),
     ["--nodes=1", "--cpus-per-task=4", "--mem=64G"], ["--gpus-per-node"]),
    (dict(nodes=64, partition="gpu", time="2-00:00:00", account="proj1", qos="high", grace_s=600,
          extra_sbatch=("--exclusive", "--constraint=h100")),
     ["--nodes=64", "--partition=gpu", "--time=2-00:00:00", "--account=proj1", "--qos=high", "--signal=B:USR1@600",
      "--exclusive", "--constraint=h100"], []),
])
def test_rendered_sbatch_script(kw, present, absent, tmp_path):
    script = render_sbatch(TEMPLATE.read_text(), options(**kw))
    found = directives(script)
    for item in present:
        assert item in found, (item, found)
    for prefix in absent:
        assert not any(d.startswith(prefix) for d in found)
    assert found.count("--nodes=" + str(kw.get("nodes", 4))) == 1  # the template's own defaults are replaced
    o = options(**kw)
    assert f"NPROC_PER_NODE={o.nproc_per_node}" in script.splitlines()
    assert "FT=(/venv/bin/python -m launcher.cli)" in script.splitlines()
    assert ("set -- examples/chat-demo.yaml --set optimizer.lr=1e-4 --set 'output_dir=/runs/my run'"
            in script.splitlines())
    assert "@ft-slurm" not in script
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0  # valid bash


@pytest.mark.parametrize("kw,needle", [(dict(nodes=0), "--nodes must be >= 1"),
                                       (dict(nproc_per_node=0), "--nproc-per-node >= 1"),
                                       (dict(grace_s=0), "--grace must be >= 1")])
def test_bad_sbatch_options(kw, needle):
    with pytest.raises(SlurmError, match=needle):
        render_sbatch(TEMPLATE.read_text(), options(**kw))


def test_template_is_usable_by_hand():
    assert subprocess.run(["bash", "-n", str(TEMPLATE)]).returncode == 0
    proc = subprocess.run(["bash", str(TEMPLATE)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "usage: sbatch [sbatch options] slurm/ft.sbatch CONFIG" in proc.stderr


def test_ft_slurm_dry_run_prints_the_script():
    proc = ft_in_process("slurm", "examples/chat-demo.yaml", "--nodes", "2", "--gpus-per-node", "4", "--partition",
                         "debug", "--time", "01:00:00", "--set", "train.max_steps=10", "--dry-run")
    found = directives(proc.stdout)
    assert {"--nodes=2", "--gpus-per-node=4", "--partition=debug", "--time=01:00:00",
            "--job-name=chat-demo"} <= set(found)
    assert f"FT=({sys.executable} -m launcher.cli)" in proc.stdout
    assert "set -- examples/chat-demo.yaml --set train.max_steps=10" in proc.stdout
    assert f"--chdir={Path.cwd()}" in found or any(d.startswith("--chdir=") for d in found)


def test_ft_launch_refuses_bad_node_arguments():
    outside = ft_in_process("launch", "examples/chat-demo.yaml", "--slurm", "--dry-run", check=False,
                            env_remove=("SLURM_JOB_ID", "SLURM_JOBID"))
    assert outside.returncode == 2 and "ft launch --slurm: SLURM_JOB_ID is not set" in outside.stderr
    missing = ft_in_process("launch", "examples/chat-demo.yaml", "--nnodes", "2", "--node-rank", "1", "--dry-run",
                            check=False)
    assert missing.returncode == 2 and "--nnodes > 1 needs --master-addr" in missing.stderr
    bad_rank = ft_in_process("launch", "examples/chat-demo.yaml", "--nnodes", "2", "--node-rank", "2", "--dry-run",
                             check=False)
    assert bad_rank.returncode == 2 and "--node-rank must be in 0..1" in bad_rank.stderr
    both = ft_in_process("launch", "examples/chat-demo.yaml", "--slurm", "--nnodes", "2", "--dry-run", check=False)
    assert both.returncode == 2 and "--slurm takes --nnodes and --node-rank from the allocation" in both.stderr


def test_ft_launch_multi_node_dry_run():
    proc = ft_in_process("launch", "examples/chat-demo.yaml", "--nproc", "4", "--nnodes", "3", "--node-rank", "2",
                         "--master-addr", "10.1.2.3", "--master-port", "29555", "--dry-run")
    words = shlex.split(proc.stdout.strip())
    flag = lambda name: words[words.index(name) + 1]  # noqa: E731
    assert (flag("--num_processes"), flag("--num_machines"), flag("--machine_rank")) == ("12", "3", "2")
    assert (flag("--main_process_ip"), flag("--main_process_port")) == ("10.1.2.3", "29555")
    assert flag("--deepspeed_multinode_launcher") == "standard"
