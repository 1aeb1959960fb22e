"""The offline tools: `ft generate`, `ft export`, `ft plan`, `ft plot` and `ft data inspect`. None starts a process
group; each reads what a run wrote (or the config) and prints one result or one error line."""

from __future__ import annotations

from typing import List, Optional

import typer

from ftcore.config import ConfigError
from ftcore.run_dir import RunDir
from launcher.app import CONFIG_ARG, SET_OPT, app, fail, fail_rank, load_run_config, record_unexpected
from launcher.workstation import EvalRequest


@app.command()
def generate(model: str = typer.Option(..., "--model", help="A final/ dir: PEFT adapter or full HF model."),
             prompt: List[str] = typer.Option(..., "--prompt", help="User message (repeatable)."),
             max_new_tokens: int = typer.Option(32, "--max-new-tokens")) -> None:
    """Greedy generation from a fine-tuned model (base + adapter, or a full model), with its chat template.

    Example: ft generate --model outputs/demo/final --prompt "What is the capital of France?"
    """
    from ftcore.tools.generate import generate as run_generate

    try:
        for p, answer in zip(prompt, run_generate(model, prompt, max_new_tokens)):
            typer.echo(f"user: {p}\nassistant: {answer}")
    except (OSError, ValueError) as e:
        fail(e, code=1)


@app.command()
def export(adapter: Optional[list[str]] = typer.Option(None, "--adapter", help="PEFT LoRA adapter dir (e.g. "
                                                       "final/); several, with --merge, to merge them into one."),
           checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="A training checkpoint step dir."),
           base: Optional[str] = typer.Option(None, "--base", help="Base model dir (default: from the run config "
                                              "or adapter_config.json)."),
           out: str = typer.Option(..., "--out", help="Output HF model dir (must not exist unless --force)."),
           dtype: Optional[str] = typer.Option(None, "--dtype", help="bfloat16 | float16 | float32 (default: the "
                                               "base's)."),
           shard_size: str = typer.Option("5GB", "--shard-size", help="Largest output shard, e.g. 5GB, 500MB."),
           merge_base: str = typer.Option("auto", "--merge-base", help="auto | quantized | original: merge a QLoRA "
                                          "adapter onto dequant(NF4(W)) (auto when the run was qlora) or onto W."),
           verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare logits with the model as "
                                       "trained before the output is put in place."),
           force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
           merge: Optional[str] = typer.Option(None, "--merge", help="Several adapters: linear | task_arithmetic | "
                                               "ties | dare_linear | dare_ties, on their exact deltas."),
           weight: Optional[list[float]] = typer.Option(None, "--weight", help="Per adapter (or one for all; "
                                                        "default 1)."),
           density: Optional[list[float]] = typer.Option(None, "--density", help="ties/dare: the share of each "
                                                         "delta kept (per adapter or one for all; default 1)."),
           lambda_: float = typer.Option(1.0, "--lambda", help="Scale of the combined delta (not linear)."),
           seed: int = typer.Option(0, "--seed", help="DARE's masks: seeded by this and each tensor's name.")) -> None:
    """Merge or consolidate into a plain Hugging Face safetensors model, out of core; offline, CPU only.

    Examples: ft export --adapter outputs/demo/final --out outputs/demo/merged
              ft export --checkpoint outputs/run/checkpoints/step-000100 --out merged --dtype bfloat16
              ft export --adapter task/final --adapter style/final --merge ties --weight 0.7 --weight 0.3
                        --density 0.5 --out merged
    """
    from pathlib import Path

    from ftcore.dtypes import DTYPES
    from ftcore.export.combine import expand
    from ftcore.export.export import ExportError, MergeRecipe, export_adapter, export_adapters, export_checkpoint
    from ftcore.export.st_io import return_freed_tensors_to_the_system

    # This process only exports: every freed tensor may go back to the system (a library caller keeps its own
    # allocator settings).
    return_freed_tensors_to_the_system()

    adapters = adapter or []
    if bool(adapters) == (checkpoint is not None):
        fail("ft export: give --adapter (one, or several with --merge) or --checkpoint")
    if len(adapters) > 1 and merge is None:
        fail(f"ft export: {len(adapters)} adapters need --merge (linear, task_arithmetic, ties, dare_linear or "
             "dare_ties) to say how they combine")
    if merge is not None and len(adapters) < 2:
        fail("ft export: --merge combines two or more --adapter dirs")
    if dtype is not None and dtype not in DTYPES:
        fail(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if merge_base not in ("auto", "quantized", "original"):
        fail(f"--merge-base {merge_base}: expected auto, quantized or original")
    args = dict(out=Path(out), dtype=dtype, shard_size=shard_size, merge_base=merge_base, verify=verify,
                force=force, log=typer.echo)
    try:
        if len(adapters) > 1:
            recipe = MergeRecipe(merge, expand(weight, len(adapters), 1.0), expand(density, len(adapters), 1.0),
                                 lambda_, seed)
            report = export_adapters([Path(a) for a in adapters], base, recipe=recipe, **args)
        elif adapters:
            report = export_adapter(Path(adapters[0]), base, **args)
        else:
            report = export_checkpoint(Path(checkpoint), base, **args)
    except (ExportError, ConfigError, OSError) as e:
        fail(e, code=1)
    typer.echo(f"exported {report.tensors} tensors ({report.bytes / 1e6:.1f} MB; {report.merged} LoRA-merged, "
               f"{report.replaced} replaced; merge base: {report.merge_base}; verification: {report.verified}) "
               f"to {report.out}")


@app.command("plan")
def plan_memory(config: Optional[str] = CONFIG_ARG, sets: List[str] = SET_OPT,
                gpus_per_node: int = typer.Option(..., "--gpus-per-node", help="GPUs (training processes) per node."),
                nodes: int = typer.Option(1, "--nodes"),
                gpu_mem_gb: Optional[float] = typer.Option(None, "--gpu-mem-gb", help="Memory per GPU in GiB: mark "
                                                           "what fits and recommend the cheapest layout."),
                as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON.")) -> None:
    """Per-GPU memory for this config under ZeRO 0-3, with and without offload, before you launch. Builds the
    model on the meta device from its config.json: no weights needed.

    Example: ft plan examples/llama-2-70b-qlora.yaml --gpus-per-node 2 --gpu-mem-gb 40
    """
    import json

    from ftcore.builtin import builtin_config_path, gguf_path, is_builtin
    from ftcore.gguf_base import GGUFError

    # The plan needs the model's config.json and the shapes of the batch, not the data: data paths that do not
    # exist yet (the usual case when planning) are not checked.
    from ftcore.preflight import check_combinations, check_model_path
    from ftcore.tools.plan import PlanError, build_facts, make_plan

    cfg = load_run_config(config, sets)
    try:
        check_model_path(cfg.model.name_or_path)
        check_combinations(cfg)
    except ConfigError as e:
        fail(e)
    name = cfg.model.name_or_path
    try:
        # A GGUF (or a built-in real model, which ships as one) is planned from its metadata: nothing dequantized.
        gguf = gguf_path(name)
    except (GGUFError, ValueError) as e:
        fail(f"ft plan: {e}")
    model_dir = str(gguf) if gguf else str(builtin_config_path(name).parent) if is_builtin(name) else name
    try:
        plan = make_plan(cfg, build_facts(cfg, model_dir), gpus_per_node, nodes, gpu_mem_gb)
    except (PlanError, OSError, ValueError) as e:
        fail(f"ft plan: {e}")
    if as_json:
        typer.echo(json.dumps(plan.to_json(), indent=1))
        return
    from launcher.views import print_plan

    print_plan(cfg, plan, nodes, gpus_per_node, gpu_mem_gb)


@app.command("plot")
def plot(run_dir: str = typer.Argument(..., help="A run's output_dir (holds metrics.jsonl)."),
         out: Optional[str] = typer.Option(None, "--out", help="PNG to write (default: RUN_DIR/metrics.png).")) -> None:
    """One PNG of a run: loss (train and eval), learning rate and tokens/s over steps.

    Example: ft plot outputs/demo --out demo.png
    """
    from pathlib import Path

    from ftcore.tools.plot import PlotError, plot_run

    target = Path(out) if out else RunDir(run_dir).metrics_plot
    try:
        series = plot_run(Path(run_dir), target)
    except (PlotError, OSError) as e:
        fail(f"ft plot: {e}", code=1)
    typer.echo(f"wrote {target} ({len(series['loss'])} steps"
               + (f", {len(series['eval_loss'])} evals" if "eval_loss" in series else "") + ")")


data_app = typer.Typer(no_args_is_help=True, help="Look at the training data as the model will see it.")
app.add_typer(data_app, name="data")


@data_app.command("inspect")
def data_inspect(config: Optional[str] = CONFIG_ARG, sets: List[str] = SET_OPT,
                 show: int = typer.Option(3, "-n", "--show", help="Samples to print."),
                 scan: int = typer.Option(1000, "--scan", help="Samples to read for the statistics.")) -> None:
    """Show processed samples (trained tokens marked) and statistics of the first --scan samples in training
    order: samples, tokens, length histogram, share of trained tokens, packing efficiency, skipped/truncated.

    Example: ft data inspect examples/demo.yaml -n 2 --set data.max_seq_len=128
    """
    from ftcore.builtin import resolve_model_path
    from ftcore.data.inspect import inspect_data
    from ftcore.data.stream import DataError
    from ftcore.model import load_tokenizer

    cfg = load_run_config(config, sets, check_paths=True)
    try:
        tokenizer = load_tokenizer(resolve_model_path(cfg.model.name_or_path, cfg.model.dtype))
        result = inspect_data(cfg, tokenizer, show, scan)
    except (DataError, OSError, ValueError) as e:
        fail(e, code=1)
    from launcher.views import print_inspection

    print_inspection(cfg, result)


@app.command("eval")
def evaluate(target: str = typer.Argument(..., help="A run's YAML config, a final/ adapter dir, a merged export, a "
                                         "checkpoint step dir, or builtin:tiny-llama."),
             data: List[str] = typer.Option([], "--data", help="Held-out records (repeatable; default: the run's "
                                            "data.eval)."),
             fmt: Optional[str] = typer.Option(None, "--format", help="chat | alpaca | prompt_completion (default: "
                                               "the run's eval format, else chat)."),
             metric: List[str] = typer.Option(["exact_match", "rouge_l"], "--metric", help="exact_match | accuracy "
                                              "| contains | rouge_l (repeatable)."),
             reward: List[str] = typer.Option([], "--reward", help="Also score the answers with this reward rule "
                                              "(repeatable): a built-in (exact_answer, numeric_answer, regex, "
                                              "char_share, length, overlong) or package.module:function, its "
                                              "arguments as JSON after it: 'regex {\"pattern\": \"^[0-9]+$\"}'."),
             out: Optional[str] = typer.Option(None, "--out", help="Where predictions.jsonl and summary.json go "
                                               "(default: output_dir/eval, or eval-NAME beside the model)."),
             batch_size: int = typer.Option(8, "--batch-size", help="Prompts per generation batch (per rank)."),
             max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
             nproc: int = typer.Option(1, "--nproc", help="Ranks to split the set over (torchrun on this machine)."),
             zero3: bool = typer.Option(False, "--zero3", help="Partition the model over the ranks with DeepSpeed "
                                        "ZeRO-3 (for models one rank cannot hold)."),
             sets: List[str] = SET_OPT) -> None:
    """Score a model by greedy generation on held-out records; every prediction to predictions.jsonl.

    Examples: ft eval examples/demo.yaml --metric exact_match --metric rouge_l
              ft eval outputs/demo/merged --data held_out.jsonl --format prompt_completion --nproc 2
              ft eval outputs/demo/final --reward numeric_answer --reward mypackage.rewards:score
    """
    import os

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_launch_eval(EvalRequest(target, tuple(data), fmt, tuple(metric), out, batch_size,
                                                  max_new_tokens, zero3, tuple(sets), tuple(reward)), nproc))
    from ftcore.errors import TrainError
    from ftcore.evaluation.command import EvalError, run_eval
    from ftcore.preemption import die_with_launcher, end_on_stop_signals

    die_with_launcher()  # a rank of `ft eval --nproc N` dies with its supervisor
    end_on_stop_signals()
    try:
        summary = run_eval(target, data, fmt, metric, out, batch_size, max_new_tokens, zero3, sets,
                           rewards=tuple(reward))
    except (ConfigError, EvalError, TrainError, OSError, ValueError) as e:
        fail_rank(e)
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as e:  # a lost peer is one line; anything else keeps its traceback
        record_unexpected(e)
        raise
    if "out" in summary:  # rank 0
        from launcher.views import print_eval_summary

        print_eval_summary(summary)


def _launch_eval(request: EvalRequest, nproc: int) -> int:
    """`ft eval --nproc N`: N ranks of `ft eval` under the same supervised accelerate launch as training (stop
    signals, the first failing rank and its log tail, a hung rank ended); their exit status."""
    import os
    import shutil
    import sys
    import tempfile
    from pathlib import Path

    from ftcore.builtin import is_builtin, resolve_model_path
    from ftcore.dist_env import free_port
    from ftcore.gguf_base import GGUFError, gguf_file
    from launcher.supervise import NodeContext, block_stop_signals, run_node
    from launcher.workstation import build_eval_command

    block_stop_signals()  # before anything can start a thread (see launcher/supervise.py)
    try:  # a built-in or GGUF base is built once here, not by every rank at once
        if is_builtin(request.target) or gguf_file(request.target) is not None:
            resolve_model_path(request.target)
    except (GGUFError, ValueError, OSError) as e:
        fail(e, code=1)
    # The attempt's per-rank logs and failure records: kept for the report while it runs, removed after success.
    attempt_dir = Path(tempfile.mkdtemp(prefix="ft-eval-"))
    tee = not sys.stdout.isatty()
    argv, env = build_eval_command(request, nproc, free_port(), os.environ,
                                   log_dir=str(attempt_dir / "node0") if tee else None,
                                   failure_dir=str(attempt_dir / "failures"))
    status = run_node(argv, env, NodeContext(node_rank=0, nproc=nproc, attempt_dir=attempt_dir, tee=tee,
                                             job="evaluation"))
    if status == 0:
        shutil.rmtree(attempt_dir, ignore_errors=True)
    return status
