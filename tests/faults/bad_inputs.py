"""Bad inputs, each run through the real `ft` CLI: non-zero exit, one line naming the file:line or the field with what
to do, no traceback (unless --debug), and nothing partially written where the output would have gone.

A case is (name, setup) where setup(work, prepared) writes what it needs under `work` and returns (argv, the text
the error line must contain, the destination that must stay untouched or absent).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from tests.faults.harness import ROOT, environment, ft_command

FAST = ["--set", "train.max_steps=2", "--set", "train.micro_batch_size=2", "--set", "data.max_seq_len=64",
        "--set", "logging.report_to=none"]


def _train(out: Path, *sets: str) -> list[str]:
    return ["train", "--set", f"output_dir={out}", *FAST, *[a for s in sets for a in ("--set", s)]]


def _data(work: Path, name: str, lines: list, fmt: str = "chat", raw: bytes = b"") -> tuple[list[str], Path]:
    path = work / name
    path.write_bytes(raw or "".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                                    for line in lines).encode())
    out = work / "out"
    return _train(out, f"data.train=[{{path: {path}, format: {fmt}}}]"), path


GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def cases() -> list[tuple[str, Callable]]:
    out: list[tuple[str, Callable]] = []

    def case(name):
        def register(fn):
            out.append((name, fn))
            return fn
        return register

    # ---- config
    @case("config: unknown key (YAML line)")
    def _(w, p):
        cfg = w / "cfg.yaml"
        cfg.write_text("train:\n  max_steps: 2\n  learning_rate: 0.1\n")
        return ["train", str(cfg)], f"{cfg}:3: train.learning_rate: unknown key", w / "outputs"

    @case("config: wrong type")
    def _(w, p):
        return _train(w / "o", "optimizer.lr=fast"), "optimizer.lr: Input should be a valid number", w / "o"

    @case("config: impossible batch arithmetic")
    def _(w, p):
        return (["launch", "--nproc", "2", "--set", f"output_dir={w / 'o'}", "--set", "train.effective_batch_size=7"],
                "train.effective_batch_size", w / "o")

    @case("config: warmup beyond max_steps")
    def _(w, p):
        return (_train(w / "o", "optimizer.warmup_steps=50"), "optimizer.warmup_steps: 50 exceeds train.max_steps=2",
                w / "o")

    @case("config: invalid YAML (line)")
    def _(w, p):
        cfg = w / "cfg.yaml"
        cfg.write_text("train:\n  max_steps: [2\n")
        return ["train", str(cfg)], f"{cfg}:3: invalid YAML", w / "outputs"

    @case("config: missing file")
    def _(w, p):
        return ["train", str(w / "nope.yaml")], f"cannot read {w / 'nope.yaml'}", w / "outputs"

    @case("config: parameter offload without ZeRO-3")
    def _(w, p):
        return (_train(w / "o", "distributed.offload=all"), "distributed.offload: 'all' (parameter offload) needs",
                w / "o")

    @case("config: eval_every without eval data")
    def _(w, p):
        return _train(w / "o", "evaluation.every=5"), "evaluation.every: is set but data.eval has no sources", w / "o"

    @case("config: bad --set syntax")
    def _(w, p):
        return ["train", "--set", "optimizer.lr"], "expected KEY=VALUE", w / "outputs"

    # ---- data
    @case("data: invalid JSON")
    def _(w, p):
        argv, path = _data(w, "d.jsonl", [GOOD_CHAT, "{not json"])
        return argv, f"{path}:2: invalid JSON", w / "out"

    @case("data: missing messages")
    def _(w, p):
        argv, path = _data(w, "d.jsonl", [GOOD_CHAT, {"text": "x"}])
        return argv, f"{path}:2: chat field 'messages' must be a non-empty list", w / "out"

    @case("data: unknown role")
    def _(w, p):
        argv, path = _data(w, "d.jsonl", [GOOD_CHAT, {"messages": [{"role": "human", "content": "x"}]}])
        return argv, f"{path}:2: messages[0].role is 'human'", w / "out"

    @case("data: no assistant turn")
    def _(w, p):
        argv, path = _data(w, "d.jsonl", [GOOD_CHAT, {"messages": [{"role": "user", "content": "x"}]}])
        return argv, f"{path}:2: chat record has no assistant turn", w / "out"

    @case("data: content not a string")
    def _(w, p):
        argv, path = _data(w, "d.jsonl", [GOOD_CHAT, {"messages": [{"role": "user", "content": 5},
                                                                   {"role": "assistant", "content": "x"}]}])
        return argv, f"{path}:2: messages[0].content is int", w / "out"

    @case("data: alpaca without output")
    def _(w, p):
        argv, path = _data(w, "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a"}], "alpaca")
        return argv, f"{path}:2: alpaca field 'output' is missing", w / "out"

    @case("data: text not a string")
    def _(w, p):
        argv, path = _data(w, "d.jsonl", [{"text": "fine"}, {"text": ["x"]}], "text")
        return argv, f"{path}:2: text field 'text' is list", w / "out"

    @case("data: invalid UTF-8")
    def _(w, p):
        argv, path = _data(w, "d.jsonl", [], raw=(json.dumps(GOOD_CHAT) + "\n").encode() + b'{"x": "\xff\xfe"}\n')
        return argv, f"{path}:2: invalid UTF-8", w / "out"

    @case("data: empty file")
    def _(w, p):
        argv, path = _data(w, "d.jsonl", [], raw=b"")
        (path).write_bytes(b"")
        return argv, f"{path}: no records", w / "out"

    @case("data: missing file")
    def _(w, p):
        return _train(w / "out", f"data.train=[{{path: {w / 'absent.jsonl'}}}]"), str(w / "absent.jsonl"), w / "out"

    @case("data: JSON array instead of JSON Lines")
    def _(w, p):
        argv, path = _data(w, "d.json", [], raw=json.dumps([GOOD_CHAT, GOOD_CHAT]).encode())
        return argv, f"{path}", w / "out"

    @case("data: classification label outside the label set")
    def _(w, p):
        argv, path = _data(w, "d.jsonl", [{"text": "a", "label": "ham"}, {"text": "b", "label": "eggs"}],
                           "classification")
        return argv + ["--set", "task=classification", "--set", "data.labels=[ham, spam]"], \
            f"{path}:2: label 'eggs' is not one of data.labels", w / "out"

    # ---- model dir
    @case("model: directory does not exist")
    def _(w, p):
        return _train(w / "o", f"model.name_or_path={w / 'no-model'}"), "model.name_or_path", w / "o"

    @case("model: config.json without weights")
    def _(w, p):
        model = w / "m"
        model.mkdir()
        shutil.copy(Path(p["model"]) / "config.json", model / "config.json")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(p["model"]) / f, model / f)
        return _train(w / "o", f"model.name_or_path={model}"), f"model.name_or_path: {model}: no weights", w / "o"

    @case("model: wrong architecture")
    def _(w, p):
        model = _copy(Path(p["model"]), w / "m")
        config = json.loads((model / "config.json").read_text())
        config["model_type"], config["architectures"] = "no-such-arch", ["NoSuchForCausalLM"]
        (model / "config.json").write_text(json.dumps(config))
        return _train(w / "o", f"model.name_or_path={model}"), "model.name_or_path", w / "o"

    # ---- checkpoints
    def _resume(w, p, damage) -> tuple[list[str], str, Path]:
        run = _copy(p["run"], w / "run")
        step = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
        expect = damage(step)
        argv = [a if not a.startswith("output_dir=") else f"output_dir={run}" for a in json.loads(p["run_args"])]
        argv += ["--set", "train.max_steps=14"] if "different config" not in expect else []
        return argv, expect, run / "final" / "adapter_model.safetensors"

    @case("checkpoint: a rank's shard missing")
    def _(w, p):
        def damage(step):
            victim = next((step / "engine").glob("*rank_1*optim_states.pt"))
            victim.unlink()
            return f"{step}: missing engine/{victim.name}"
        return _resume(w, p, damage)

    @case("checkpoint: truncated file")
    def _(w, p):
        def damage(step):
            victim = next((step / "engine").glob("*rank_0*optim_states.pt"))
            victim.write_bytes(victim.read_bytes()[:100])
            return f"engine/{victim.name} is 100 bytes, manifest says"
        return _resume(w, p, damage)

    @case("checkpoint: written by another config")
    def _(w, p):
        def damage(step):
            return "was written by a different config: optimizer.lr"
        argv, expect, dest = _resume(w, p, damage)
        return argv + ["--set", "optimizer.lr=1e-5"], expect, dest

    @case("checkpoint: --resume of a missing directory")
    def _(w, p):
        # The run dir gets its config files before the resume is read; no checkpoint or final/ may appear.
        return (_train(w / "o") + ["--resume", str(w / "step-000009")], "no such checkpoint directory",
                w / "o" / "checkpoints")

    # ---- adapters and export
    @case("export: adapter on the wrong base")
    def _(w, p):
        base = _copy(Path(p["model"]), w / "other-base")
        config = json.loads((base / "config.json").read_text())
        config["intermediate_size"] = 256
        (base / "config.json").write_text(json.dumps(config))
        from safetensors.torch import load_file, save_file
        tensors = load_file(base / "model.safetensors")
        tensors = {k: (v[:256] if "gate_proj" in k or "up_proj" in k else v[:, :256] if "down_proj" in k else v)
                   .contiguous() for k, v in tensors.items()}
        save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
        return (["export", "--adapter", str(p["run"] / "final"), "--base", str(base), "--out", str(w / "x")],
                "adapter does not fit the base", w / "x")

    @case("export: corrupted safetensors header")
    def _(w, p):
        adapter = _copy(p["run"] / "final", w / "adapter")
        f = adapter / "adapter_model.safetensors"
        data = bytearray(f.read_bytes())
        data[8:20] = b"{garbage!!!!"
        f.write_bytes(bytes(data))
        return ["export", "--adapter", str(adapter), "--out", str(w / "x")], str(f), w / "x"

    @case("export: not an adapter directory")
    def _(w, p):
        (w / "empty").mkdir()
        return ["export", "--adapter", str(w / "empty"), "--out", str(w / "x")], "no adapter_config.json", w / "x"

    @case("export: output exists")
    def _(w, p):
        (w / "x").mkdir()
        (w / "x" / "keep.txt").write_text("mine")
        return (["export", "--adapter", str(p["run"] / "final"), "--out", str(w / "x")],
                f"{w / 'x'}: already exists (use --force", w / "x")

    @case("export: unwritable destination")
    def _(w, p):
        parent = w / "a-file"  # a directory cannot be made under a file (chmod would not stop root)
        parent.write_text("not a directory")
        return (["export", "--adapter", str(p["run"] / "final"), "--out", str(parent / "x")],
                f"{parent}: cannot write the export there", parent / "x")

    @case("export: checkpoint directory missing")
    def _(w, p):
        return (["export", "--checkpoint", str(w / "step-1"), "--out", str(w / "x")],
                f"--checkpoint {w / 'step-1'}: no such directory", w / "x")

    @case("export: bad --dtype")
    def _(w, p):
        return (["export", "--adapter", str(p["run"] / "final"), "--out", str(w / "x"), "--dtype", "int3"],
                "--dtype int3: expected one of", w / "x")

    return out


def snapshot(path: Path) -> object:
    """What is at a destination (to show it was not touched)."""
    if not path.exists():
        return None
    if path.is_file():
        return path.stat().st_size, path.stat().st_mtime_ns
    return sorted((str(f.relative_to(path)), f.stat().st_size) for f in path.rglob("*") if f.is_file())


def found_by_the_training_runtime(name: str, argv: list[str]) -> bool:
    """The error comes from the training runtime (a launch's ranks; data, model and checkpoint errors found once
    `ft train` has started its process group and DeepSpeed): a real process either way. Config and export errors
    are found before anything starts."""
    return argv[:1] == ["launch"] or name.split(":")[0] in ("data", "model", "checkpoint")


def run_case(name: str, setup: Callable, work: Path, prepared: dict, debug: bool = False,
             in_process: bool = False) -> dict:
    """in_process: run the command in this process (tests: the same CLI code and output, without ~8 s of imports
    per case); a case whose error the training runtime finds runs as a real process either way. Default: a real
    `ft` process, as a user types it (benchmarks/faults.py, and the tests that prove the real CLI gives the same
    line)."""
    work.mkdir(parents=True, exist_ok=True)
    argv, expect, destination = setup(work, prepared)
    before = snapshot(destination)
    args = (["--debug"] if debug else []) + argv
    if in_process and not found_by_the_training_runtime(name, argv):
        from tests.conftest import ft_in_process

        proc = ft_in_process(*args, check=False)
    else:
        proc = subprocess.run(ft_command(*args), cwd=ROOT, capture_output=True, text=True, env=environment(),
                              timeout=300)
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if expect in line]
    staging = [p for p in destination.parent.glob(f".{destination.name}.tmp-*")] if destination.parent.exists() else []
    partial = snapshot(destination) != before or bool(staging)
    if destination.name == "adapter_model.safetensors":  # a resumed run must not have written a new final
        partial = snapshot(destination) != before
    return {"name": name, "exit": proc.returncode, "clear": proc.returncode != 0 and bool(lines),
            "traceback": "Traceback (most recent call last)" in output, "partial": partial,
            "line": lines[0][:300] if lines else output.strip().splitlines()[-1:] or [""], "argv": args}
