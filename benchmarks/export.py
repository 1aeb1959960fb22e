"""Export benchmark: peak RSS and wall time of `ft export` against PEFT, zero_to_fp32 and `cp`. Prints JSON.

    python benchmarks/export.py           # a 1.1B bf16 TinyLlama-shaped model (2.2 GB) in ~1 GB shards; a ~1.2 GB
                                          # ZeRO-3 checkpoint
    python benchmarks/export.py --quick   # ~270 MB model, small checkpoint; under two minutes

Merge: a multi-shard base with random weights and a random LoRA adapter on every linear layer is merged by
(a) `ft export --adapter` and (b) PEFT `merge_and_unload()` + `save_pretrained`, and the base shards are copied
with `cp` + `sync` (what the disk allows; ft export fsyncs its output). Three such adapters are merged into one by
TIES with `ft export --adapter x3 --merge ties` and with PEFT's `add_weighted_adapter(combination_type="ties")` +
`merge_and_unload()`. Consolidation: a real 2-process ZeRO-3
full fine-tuning checkpoint (`ft launch`, one step) is consolidated by (c) `ft export --checkpoint` and (d)
DeepSpeed's zero_to_fp32. Every command runs in its own process, which reports its own peak RSS. The merge runs
twice: with --no-verify, and as users run it by default (verification on: the probe through both models layer by
layer); both are reported against the largest shard (peak RSS) and against each other and `cp` (wall time).
Shards of ~1 GB, because the interpreter and imports alone take several hundred MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from commands import ft, run_checked  # benchmarks/commands.py: ft by sys.executable, failures say why

ROOT = Path(__file__).resolve().parents[1]

# The measurement is printed by an atexit handler: the ft command line ends its process through os._exit after
# the atexit handlers (launcher/cli.py exit_without_finalizing), so a `finally` would never run.
MEASURE = """
import atexit, resource, sys, json, time, runpy
t = time.perf_counter()
sys.argv = {argv!r}
atexit.register(lambda: print("BENCH " + json.dumps({{"wall_s": time.perf_counter() - t,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}), flush=True))
if True:
    {body}
"""


def measured(body: str, argv: list[str] = ()) -> dict:
    code = MEASURE.format(argv=list(argv), body=textwrap.indent(textwrap.dedent(body), "    ").strip())
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    line = [text for text in proc.stdout.splitlines() if text.startswith("BENCH ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"benchmark step failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return {**json.loads(line[-1][6:]), "stdout": proc.stdout}


def build_base(directory: Path, hidden: int, layers: int, vocab: int, shard: str, intermediate: int,
               kv_heads: int) -> None:
    body = f"""
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
torch.manual_seed(0)
config = LlamaConfig(vocab_size={vocab}, hidden_size={hidden}, intermediate_size={intermediate},
                     num_hidden_layers={layers}, num_attention_heads={hidden // 64}, num_key_value_heads={kv_heads},
                     tie_word_embeddings=False)
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained({str(directory)!r}, max_shard_size={shard!r})
from peft import LoraConfig, get_peft_model
for i, name in enumerate(("adapter", "adapter2", "adapter3")):  # three adapters: one merged, or three by TIES
    torch.manual_seed(i)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                            init_lora_weights=False))
    peft.save_pretrained({str(directory)!r} + "/" + name)
    model = peft.unload()
"""
    measured(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        merge_model = dict(hidden=1024, layers=8, vocab=8000, shard="80MB", intermediate=3072, kv_heads=16)
        ckpt_model = dict(hidden=512, layers=4, vocab=32000)
    else:
        # TinyLlama-1.1B's shape: 1.1B parameters, 2.2 GB in bf16.
        merge_model = dict(hidden=2048, layers=22, vocab=32000, shard="1GB", intermediate=5632, kv_heads=4)
        ckpt_model = dict(hidden=1024, layers=16, vocab=32000)
    tmp = Path(tempfile.mkdtemp(prefix="ft-export-bench-", dir=os.environ.get("TMPDIR")))
    try:
        base = tmp / "base"
        build_base(base, **merge_model)
        shards = sorted(base.glob("*.safetensors"))
        largest_mb = max(s.stat().st_size for s in shards) / 2**20
        total_mb = sum(s.stat().st_size for s in shards) / 2**20

        t = time.perf_counter()
        (tmp / "copy").mkdir()
        subprocess.run(["cp", *map(str, shards), str(tmp / "copy")], check=True)
        subprocess.run(["sync"], check=True)  # ft export fsyncs what it writes; a fair copy reaches the disk too
        cp_s = time.perf_counter() - t
        shutil.rmtree(tmp / "copy")

        cli = "from launcher.cli import main\nmain()"
        ours = measured(cli, ["ft", "export", "--adapter", str(base / "adapter"), "--base", str(base), "--out",
                              str(tmp / "ours"), "--no-verify", "--shard-size", merge_model["shard"]])
        shutil.rmtree(tmp / "ours")
        verified = measured(cli, ["ft", "export", "--adapter", str(base / "adapter"), "--base", str(base), "--out",
                                  str(tmp / "ours"), "--shard-size", merge_model["shard"]])
        shutil.rmtree(tmp / "ours")
        # A deliberately wrong merge: one merged tensor (the MLP output of the middle block) scaled by 4.
        wrong_name = f"model.layers.{merge_model['layers'] // 2}.mlp.down_proj.weight"
        wrong = measured(f"""
from pathlib import Path
from ftcore.export.lora import Adapter
from ftcore.export.export import ExportError, export_adapter
merged = Adapter.apply
Adapter.apply = lambda self, name, tensor: merged(self, name, tensor) * (4 if name == {wrong_name!r} else 1)
try:
    export_adapter(Path({str(base / 'adapter')!r}), {str(base)!r}, Path({str(tmp / 'wrong')!r}),
                   shard_size={merge_model['shard']!r}, log=lambda _: None)
    print("WRONG-MERGE not caught")
except ExportError as e:
    print("WRONG-MERGE " + str(e))
""")
        wrong_line = next(t for t in wrong["stdout"].splitlines() if t.startswith("WRONG-MERGE "))[12:]
        peft = measured(f"""
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(base)!r}, dtype=torch.bfloat16)
merged = PeftModel.from_pretrained(model, {str(base / 'adapter')!r}).merge_and_unload()
merged.save_pretrained({str(tmp / 'peft')!r}, max_shard_size={merge_model['shard']!r})
""")
        shutil.rmtree(tmp / "peft")

        # Three adapters merged into one by TIES (weights 0.5/0.3/0.2, density 0.5): ft export in its one pass over
        # the base, vs PEFT's add_weighted_adapter (which applies TIES to the A and B factors, not to the deltas)
        # + merge_and_unload, loading the whole model.
        three = [str(base / name) for name in ("adapter", "adapter2", "adapter3")]
        ties_args = ["--merge", "ties", "--weight", "0.5", "--weight", "0.3", "--weight", "0.2", "--density", "0.5"]
        ties = measured(cli, ["ft", "export", *[w for a in three for w in ("--adapter", a)], *ties_args, "--base",
                              str(base), "--out", str(tmp / "ties"), "--no-verify", "--shard-size",
                              merge_model["shard"]])
        peft_ties = measured(f"""
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(base)!r}, dtype=torch.bfloat16)
adapters = {three!r}
model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
for i, path in enumerate(adapters[1:], 1):
    model.load_adapter(path, adapter_name=f"a{{i}}")
model.add_weighted_adapter(["a0", "a1", "a2"], [0.5, 0.3, 0.2], "ties", combination_type="ties", density=0.5)
model.set_adapter("ties")
for name in ("a0", "a1", "a2"):
    model.delete_adapter(name)
model.merge_and_unload().save_pretrained({str(tmp / 'peft_ties')!r}, max_shard_size={merge_model['shard']!r})
""")
        shutil.rmtree(tmp / "ties")
        shutil.rmtree(tmp / "peft_ties", ignore_errors=True)

        # A real ZeRO-3 checkpoint: one step of 2-process full fine-tuning of a model built from a config.
        ckpt_base = tmp / "ckpt_base"
        measured(f"""
import shutil, torch
from ftcore.builtin import resolve_model_path
from transformers import AutoModelForCausalLM, LlamaConfig
torch.manual_seed(0)
h, n, v = {ckpt_model['hidden']}, {ckpt_model['layers']}, {ckpt_model['vocab']}
config = LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=h * 3, num_hidden_layers=n,
                     num_attention_heads=h // 64, num_key_value_heads=h // 64)
AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained({str(ckpt_base)!r})
tiny = resolve_model_path("builtin:tiny-llama")
for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(f"{{tiny}}/{{f}}", {str(ckpt_base)!r})
""")
        run = tmp / "run"
        run_checked(ft("launch", "examples/chat-demo.yaml", "--nproc", "2",
                        "--set", f"model.name_or_path={ckpt_base}", "--set", "adapter.method=full",
                        "--set", "distributed.zero_stage=3", "--set", f"output_dir={run}", "--set",
                        "train.max_steps=1", "--set", "optimizer.warmup_steps=0", "--set", "train.micro_batch_size=1",
                        "--set", "data.max_seq_len=32", "--set", "evaluation.every=0", "--set", "data.eval=null",
                        "--set", "checkpoint.every_steps=0"))
        ckpt = run / "checkpoints" / "step-000001"
        fp32_mb = sum(f.stat().st_size for f in (ckpt / "engine").glob("*optim_states.pt")) / 2**20
        consolidate = measured(cli, ["ft", "export", "--checkpoint", str(ckpt), "--out", str(tmp / "cons"),
                                     "--no-verify", "--dtype", "float32", "--shard-size", "500MB"])
        zero_to_fp32 = measured(f"""
from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict
convert_zero_checkpoint_to_fp32_state_dict({str(ckpt)!r}, {str(tmp / 'z2f')!r}, tag="engine",
                                           safe_serialization=True, max_shard_size="500MB")
""")
        result = {
            "merge_peak_rss_over_largest_shard": round(ours["peak_rss_mb"] / largest_mb, 3),
            "merge_wall_over_cp": round(ours["wall_s"] / cp_s, 2),
            "verified_peak_rss_over_largest_shard": round(verified["peak_rss_mb"] / largest_mb, 3),
            "verified_wall_over_no_verify_wall": round(verified["wall_s"] / ours["wall_s"], 2),
            "verified_wall_over_cp": round(verified["wall_s"] / cp_s, 2),
            "wrong_merge_perturbed": f"{wrong_name} x 4", "wrong_merge_report": wrong_line,
            "wrong_merge_left_nothing": not (tmp / "wrong").exists(),
            "consolidate_peak_rss_over_zero_to_fp32": round(consolidate["peak_rss_mb"] / zero_to_fp32["peak_rss_mb"],
                                                            3),
            "model_mb": round(total_mb), "shards": len(shards), "largest_shard_mb": round(largest_mb),
            "ft_export_peak_rss_mb": round(ours["peak_rss_mb"]), "ft_export_wall_s": round(ours["wall_s"], 1),
            "ft_export_with_verify_wall_s": round(verified["wall_s"], 1),
            "ft_export_with_verify_peak_rss_mb": round(verified["peak_rss_mb"]),
            "cp_wall_s": round(cp_s, 2),
            "peft_merge_peak_rss_mb": round(peft["peak_rss_mb"]), "peft_merge_wall_s": round(peft["wall_s"], 1),
            "ties_3_adapters_peak_rss_mb": round(ties["peak_rss_mb"]),
            "ties_3_adapters_wall_s": round(ties["wall_s"], 1),
            "ties_3_adapters_peak_rss_over_largest_shard": round(ties["peak_rss_mb"] / largest_mb, 3),
            "peft_ties_3_adapters_peak_rss_mb": round(peft_ties["peak_rss_mb"]),
            "peft_ties_3_adapters_wall_s": round(peft_ties["wall_s"], 1),
            "checkpoint_fp32_and_optimizer_mb": round(fp32_mb),
            "ft_consolidate_peak_rss_mb": round(consolidate["peak_rss_mb"]),
            "ft_consolidate_wall_s": round(consolidate["wall_s"], 1),
            "zero_to_fp32_peak_rss_mb": round(zero_to_fp32["peak_rss_mb"]),
            "zero_to_fp32_wall_s": round(zero_to_fp32["wall_s"], 1),
            "quick": args.quick,
        }
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
