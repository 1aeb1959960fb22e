"""What the read-only commands print: `ft plan`'s table and recommendation, `ft data inspect`'s samples (trained
tokens marked) and statistics. Pure presentation: the numbers come from ftcore.tools.plan and ftcore.data.inspect."""

from __future__ import annotations

import sys
from typing import Optional

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ftcore.config import Config
from ftcore.data.inspect import InspectResult, length_histogram
from ftcore.tasks import task_for
from ftcore.tools.plan import CUDA_OVERHEAD_BYTES, GIB, Plan

PLAN_COLUMNS = ("ZeRO", "offload", "weights", "4-bit base", "trainable", "grads", "optimizer", "model states",
                "act. ckpt", "act. full", "total ckpt", "total full", "host RAM/node", "longest seq")


def gib(nbytes: float) -> str:
    """Bytes as GiB with one decimal."""
    return f"{nbytes / GIB:.1f}"


def print_plan(cfg: Config, plan: Plan, nodes: int, gpus_per_node: int, gpu_mem_gb: Optional[float]) -> None:
    """The per-GPU memory table of every layout, then what fits and the recommended --set overrides."""
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    name = cfg.model.name_or_path
    console.print(f"{name}: {plan.total_params / 1e9:.2f} B parameters, {plan.trainable_params / 1e6:.1f} M trainable"
                  + (f", {plan.quantized_params / 1e9:.2f} B in 4-bit NF4" if plan.quantized_params else "")
                  + f" | {cfg.adapter.method}, {cfg.model.dtype} | {plan.world} GPUs ({nodes} x {gpus_per_node}) | "
                  f"micro batch {cfg.train.micro_batch_size} x {cfg.data.max_seq_len} tokens"
                  + (f" | sequence parallel {sp}: {cfg.data.max_seq_len // sp:,} tokens per GPU"
                     if (sp := cfg.distributed.sequence_parallel) > 1 else ""))
    console.print(plan_table(plan))
    if plan.gpu_mem_bytes is not None:
        console.print("longest seq: the longest data.max_seq_len that fits with gradient checkpointing; (max) = the "
                      "model's max_position_embeddings" + ("" if cfg.distributed.sequence_parallel > 1 else
                                                           "; distributed.sequence_parallel=N gives about N x"))
    loss = plan.loss
    if loss["full_bytes"]:
        console.print(f"loss: {loss['impl']}, {gib(loss['bytes'])} GiB per GPU in the activations"
                      + ("" if loss["impl"] == "full" else
                         f" (loss.impl=full would hold {gib(loss['full_bytes'])} GiB of logits)"))
    for row in plan.rows:
        if not row.supported:
            console.print(f"ZeRO-{row.stage} offload {row.offload}: {row.note}")
    shape = task_for(cfg).rollout_shape(cfg)
    if shape is not None:
        stage3 = [r for r in plan.rows if r.stage == 3 and r.supported]
        console.print(f"rollout (in the totals where it exceeds the activations): "
                      f"{gib(plan.rows[0].rollout)} GiB per GPU for the KV cache of {shape.rows} "
                      f"sequences x {shape.tokens} tokens; ZeRO-3: "
                      + ", ".join(f"offload {r.offload} {gib(r.rollout)} GiB ("
                                  + ("whole model gathered" if r.rollout_gathers else "layer by layer") + ")"
                                  for r in stage3))
    if plan.gpu_mem_bytes is None:
        console.print("give --gpu-mem-gb to see what fits, the longest data.max_seq_len per layout, and which "
                      "layout to use")
        return
    best = plan.recommendation
    if best is None:
        smallest = min((r for r in plan.rows if r.supported), key=lambda r: r.total(True))
        console.print(f"nothing fits in {gpu_mem_gb:g} GiB per GPU: the smallest is {gib(smallest.total(True))} GiB "
                      f"(ZeRO-{smallest.stage}, offload {smallest.offload}, checkpointing). Add GPUs, use "
                      "adapter.method=qlora, or lower train.micro_batch_size / data.max_seq_len.")
        return
    console.print(f"recommended: ZeRO-{best['zero_stage']}, offload {best['offload']}, gradient checkpointing "
                  f"{'on' if best['gradient_checkpointing'] else 'off'}: {gib(best['per_gpu_bytes'])} GiB per GPU of "
                  f"{gpu_mem_gb:g}" + (f", {gib(best['host_ram_per_node_bytes'])} GiB host RAM per node"
                                       if best["host_ram_per_node_bytes"] else ""))
    console.print("  " + " ".join(f"--set {o}" for o in best["overrides"]))


def plan_table(plan: Plan) -> Table:
    """One row per ZeRO stage and offload mode; totals marked ✓/✗ against --gpu-mem-gb when given."""
    table = Table(title="per-GPU memory, GiB (model states exact; activations estimated; +"
                  f"{CUDA_OVERHEAD_BYTES / GIB:.0f} GiB CUDA overhead in totals)")
    for column in PLAN_COLUMNS:
        table.add_column(column, justify="right")
    for row in plan.rows:
        if not row.supported:
            table.add_row(str(row.stage), row.offload, *["-"] * (len(PLAN_COLUMNS) - 2))
            continue
        totals = []
        for checkpointing in (True, False):
            total = row.total(checkpointing)
            mark = "" if plan.gpu_mem_bytes is None else (" ✓" if total <= plan.gpu_mem_bytes else " ✗")
            totals.append(gib(total) + mark)
        table.add_row(str(row.stage), row.offload, gib(row.weights), gib(row.quantized_base),
                      gib(row.trainable_weights), gib(row.gradients), gib(row.optimizer), gib(row.model_states),
                      gib(row.activations_checkpointed), gib(row.activations_full), *totals,
                      gib(row.host_ram_per_node) if row.host_ram_per_node else "-",
                      (f"{row.longest_seq_len:,}" + (" (max)" if row.longest_is_model_limit else ""))
                      if row.longest_seq_len else "-")
    return table


def print_inspection(cfg: Config, result: InspectResult) -> None:
    """Samples with trained tokens marked (green on a terminal, «» in plain output), then the statistics."""
    console = Console(soft_wrap=True)
    plain = not console.is_terminal or console.no_color
    console.print(("legend: «trained tokens» masked tokens" if plain else
                   Text.assemble("legend: ", ("trained tokens", "bold green"), " ", ("masked tokens", "dim"))))
    for sample_id, runs in result.shown:
        if len(sample_id) + 6 <= console.width:
            console.rule(sample_id)
        else:  # a rule would cut the id (file:line, pair side) short
            console.rule()
            console.print(sample_id)
        text = Text()
        for piece, trained in runs:
            if plain:
                text.append(f"«{piece}»" if trained else piece)
            else:
                text.append(piece, style="bold green" if trained else "dim")
        console.print(text)
    console.rule("statistics")
    for line in inspection_statistics(cfg, result):
        console.print(line)


def inspection_statistics(cfg: Config, result: InspectResult) -> list[str]:
    """The statistics lines of `ft data inspect`."""
    c, n = result.counters, len(result.lengths)
    tokens, trained = sum(result.lengths), sum(result.trained)
    lines = [f"source {path}: {records:,} records in {files} file{'s' if files > 1 else ''}"
             for path, records, files in result.sources]
    lines += [f"samples scanned: {n:,} (from {c['records']:,} records, in training order)",
              f"tokens: {tokens:,} (mean {tokens / max(n, 1):.1f}, max {max(result.lengths, default=0)}); "
              f"trained: {trained:,} ({trained / max(tokens, 1):.1%})",
              f"truncated: {c['truncated']}, dropped (too long): {c['dropped_too_long']}, split: "
              f"{c['split_records']} records into {c['split_pieces']} pieces, skipped (malformed): "
              f"{c['skipped_errors']}, skipped (nothing to train): {c['skipped_no_trained_tokens']}",
              f"packing efficiency at max_seq_len {cfg.data.max_seq_len}: {result.packing_efficiency:.3f} "
              f"({result.packing_rows} rows; data.packing is {'on' if cfg.data.packing else 'off'})",
              f"length histogram (tokens, max_seq_len {cfg.data.max_seq_len}):"]
    lines += ["  " + line for line in length_histogram(result.lengths, cfg.data.max_seq_len)]
    return lines + [f"skipped: {example}" for example in result.error_examples]


def print_eval_summary(summary: dict) -> None:
    """`ft eval`'s table: each metric's mean over the samples, then where the predictions are."""
    table = Table(title=f"ft eval: {summary['target']} on {', '.join(summary['data'])}")
    table.add_column("metric")
    table.add_column("score", justify="right")
    for name, value in summary["metrics"].items():
        table.add_row(name, f"{value:.4f}")
    console = Console(file=sys.stdout, soft_wrap=True)
    console.print(table)
    speed = f"{summary['samples_per_s']:.2f} samples/s" if summary["samples_per_s"] else ""
    console.print(f"{summary['samples']} samples on {summary['world_size']} process(es), {speed}; predictions in "
                  f"{summary['out']}/predictions.jsonl, summary in {summary['out']}/summary.json")
