"""The Task interface: every question ft has about what a run trains, answered by the run's task (ftcore/tasks/).

Who asks what:
- config validation (ftcore/config/schema.py): check_config;
- the data stream (ftcore/data/stream.py): tokenize, truncates_itself, collate, reads_next_sample;
- the recipe (ftcore/train/recipe.py): prepare_data, head_settings, needs_reference, rows_per_step_example,
  filler_batch, start_rollouts, normaliser, build_objective;
- evaluation (ftcore/train/evaluation.py): evaluate; the reporter (ftcore/train/reporting.py): eval_line, step_words;
- `ft plan` (ftcore/tools/plan.py): head, rows_per_step_example, needs_reference, head_settings, rollout_shape;
- `ft data inspect` (ftcore/data/inspect.py): prepare_data, describe;
- the export (ftcore/export/): head.

A task module imports without torch (config validation imports it; the command line stays torch-free), so the
engines are imported in the methods that use them. This module holds the interface, the defaults a causal-LM
style task shares, and the eval loops several tasks use."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ftcore.config import Config, FieldError


def data_sources(cfg: Config) -> list[tuple[str, Any]]:
    """("data.train.0", source), ... then data.eval's: every source with the dotted name of its entry."""
    named = [(f"data.train.{i}", s) for i, s in enumerate(cfg.data.train)]
    return named + [(f"data.eval.{i}", s) for i, s in enumerate(cfg.data.eval or [])]


@dataclass
class ObjectiveSetup:
    """What a task builds its objective from, once the engine exists (every rank builds it)."""

    cfg: Config
    engine: Any  # the DeepSpeed engine (what the objective calls)
    unwrap: Callable[[Any], Any]  # engine -> the model inside
    reference: Any  # the frozen reference copy (full/freeze with needs_reference), else None
    chunk_tokens: int  # tokens per chunk of the chunked head
    cuda: bool
    probe_rows: int  # rows of the loss probe's forward (ftcore/losses/head.py choose_loss_impl)
    all_reduce: Callable[..., list[float]]  # sum (or "max") over ranks
    sequence: Any  # the sequence-parallel group (ftcore/train/sequence_parallel.py), or None


@dataclass
class EvalRun:
    """One evaluation at `step`: this rank's eval batches, the objective and the collectives (what evaluate
    reads). The engine is in eval mode under torch.no_grad."""

    cfg: Config
    engine: Any
    objective: Any  # the run's ftcore.losses.objective.Objective
    batches: list  # this rank's eval Batches (padded to the same count on every rank)
    model_inputs: Callable[[Any], Any]  # Batch -> the objective's ModelInputs on this rank's device
    runtime: Any  # ftcore.train.runtime.Runtime: all_reduce, all_gather_object, is_main
    step: int
    tokenizer: Any = None  # (a task that evaluates by generating)
    unwrap: Optional[Callable[[Any], Any]] = None  # engine -> the model inside (to generate with)


@dataclass
class RolloutSetup:
    """What a task that generates its training samples starts its rollouts from (Task.start_rollouts)."""

    cfg: Config
    runtime: Any  # ftcore.train.runtime.Runtime
    tokenizer: Any
    unwrap: Callable[[Any], Any]  # engine -> the model inside (to generate with)
    pad_id: int
    objective: Any  # the run's objective (task rl: the old policy's log-probs come from it)
    inputs_of: Callable[[Any], Any]  # Batch -> ModelInputs on this rank's device, as the recipe lays it out


@dataclass(frozen=True)
class RolloutShape:
    """What a task's generation holds at once (`ft plan` counts it): the rows generated together, their longest
    length in tokens, and how ZeRO-3 weights meet generation (auto, gather or layered)."""

    rows: int
    tokens: int
    zero3_generation: str = "auto"


class Task:
    """One thing a run can train. Subclasses set the class attributes and override what differs; the defaults
    are those of next-token training of a causal LM on tokenized samples."""

    formats: tuple[str, ...] = ()
    """The data formats (DataSource.format) it reads."""
    selected_by: str = ""
    """How a config selects it, for messages: "task: classification"."""
    head: str = "causal_lm"
    """The model's output head: causal_lm (next-token logits) or sequence_classification (class logits)."""
    rows_per_example: int = 1
    """Rows of a forward per example of a micro batch (a preference pair: its chosen and its rejected row)."""
    truncates_itself: bool = False
    """Its samples are cut to data.max_seq_len by its own rule (its sample has .truncated and .trainable);
    otherwise data.overflow applies to a plain tokenized sample."""
    reads_next_sample: bool = False
    """collate also takes each sample's successor in stream order (the same at any world size)."""
    generates: bool = False
    """evaluation.generate can score it (answers generated from the eval prompts)."""

    # ------------------------------------------------------------------------------------------ config
    def check_config(self, cfg: Config) -> None:
        """Raise FieldError naming the field when cfg sets something this task cannot do (its data formats
        included); the default refuses evaluation.generate / evaluation.rewards for a task that does not generate;
        evaluation.rewards' functions must exist."""
        if cfg.evaluation.generates and not self.generates:
            field = "evaluation.generate" if cfg.evaluation.generate else "evaluation.rewards"
            raise FieldError(field, f"scores generated answers of task causal_lm, not {cfg.task}")
        if cfg.evaluation.rewards:
            from ftcore.rewards import RewardError, check_rules, rules_of

            try:
                check_rules(rules_of(cfg.evaluation.rewards))
            except RewardError as e:
                raise FieldError("evaluation.rewards", str(e)) from None

    def needs_reference(self, cfg: Config) -> bool:
        """Does the objective read a frozen reference model (the adapter disabled, or under full/freeze a copy)?"""
        return bool(cfg.loss.base_kl)

    # ------------------------------------------------------------------------------------------ data
    def prepare_data(self, data_cfg: Any) -> Optional[str]:
        """Settle what the task derives from the data before anything is read for training (in place, so it is
        recorded in the run's config); returns a line for the log, or None."""
        return None

    def tokenize(self, record: Any, spec: Any, tokenizer: Any, max_seq_len: int) -> Any:
        """A parsed record -> its sample (ftcore.data.formats.Tokenized by default); RecordError when malformed."""
        from ftcore.data.formats import tokenize_record

        return tokenize_record(record, spec, tokenizer)

    def collate(self, samples: list, sample_ids: list[str], collation: Any,
                next_samples: Optional[list] = None) -> Any:
        """Samples -> one right-padded micro batch (ftcore.data.batch.Batch)."""
        from ftcore.data.batch import collate

        return collate(samples, collation.pad_id, sample_ids)

    def filler_batch(self, pad_id: int) -> Any:
        """A batch with nothing to train on, counting as no example: evens out the ranks' eval batch counts."""
        from ftcore.data.batch import collate, filler_sample

        return collate([filler_sample(pad_id)], pad_id, [])

    def describe(self, batch: Any, data_cfg: Any) -> list[tuple[str, list[int], list[int], int]]:
        """`ft data inspect`: a one-example batch as (what to add to the sample id, token ids, labels marking the
        trained tokens, targets trained) per row shown."""
        return [("", *token_row(batch, 0))]

    # ------------------------------------------------------------------------------------------ training
    def head_settings(self, data_cfg: Any, pad_id: Optional[int]) -> Optional[dict]:
        """The model config settings of a new output head (num_labels...), or None to keep the model's own."""
        return None

    def normaliser(self, cfg: Config, examples: float, trained_tokens: float) -> int:
        """What a step's summed loss is divided by, from the step's totals over every rank: trained tokens by
        default (the mean per trained token); `examples` counts a sequence group's examples once."""
        return max(int(trained_tokens), 1)

    def start_rollouts(self, setup: RolloutSetup) -> Optional[Any]:
        """For a task whose training samples the policy generates (rl): the object that makes each step's micro
        batches, called as rollouts(next_batch, count, engine, step) on every rank (collective; it reads the data
        stream's prompt batches through next_batch() when it needs them), with state_dict() saved in every
        checkpoint (one file per rank), load_state_dict(every saved rank's state, checkpoint step) on resume, and
        close() at the end. None (the default): the stream's batches train as they are."""
        return None

    def rollout_shape(self, cfg: Config) -> Optional[RolloutShape]:
        """For a task whose policy generates its samples: what one generation holds (ft plan's rollout memory);
        None (the default): no generation in the loop."""
        return None

    def build_objective(self, setup: ObjectiveSetup) -> tuple[Any, str]:
        """(the objective the recipe calls per micro batch, its words for the log)."""
        raise NotImplementedError

    def rows_per_step_example(self, cfg: Config) -> int:
        """Rows of a forward per example of a micro batch under `cfg` (rows_per_example, unless the config
        decides: task rl's num_generations completions per prompt)."""
        return self.rows_per_example

    def step_words(self, metrics: dict) -> str:
        """The task's own numbers in a logged step's line, after the loss ("" by default; each ends in a space)."""
        return ""

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(self, run: EvalRun) -> dict:
        """The eval metrics at run.step (the same on every rank; collective): loss per trained token and
        perplexity by default."""
        loss_sum, tokens = summed_eval_loss(run)
        loss = loss_sum / max(tokens, 1)
        return {"step": run.step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def eval_line(self, metrics: dict, run_dir: Any) -> str:
        """The log line of an evaluation's metrics (after "step N: "): the loss, then every other number."""
        rest = "".join(f" {name[5:]} {value:.4g}" for name, value in metrics.items()
                       if name.startswith("eval_") and name != "eval_loss" and not name.startswith("eval_gen_")
                       and isinstance(value, (int, float)))
        return f"eval loss {metrics['eval_loss']:.4f}{rest}"


def token_row(batch: Any, row: int) -> tuple[list[int], list[int], int]:
    """A batch row's real tokens, their labels and how many of them train."""
    from ftcore.data.formats import IGNORE_INDEX

    ids = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
    labels = batch.labels[row][: len(ids)].tolist()
    return ids, labels, sum(1 for label in labels if label != IGNORE_INDEX)


def summed_eval_loss(run: EvalRun, keep_output: Optional[Callable[[Any, Any], None]] = None) -> tuple[float, float]:
    """(summed eval loss, trained tokens) over every rank's eval batches; `keep_output(batch, output)` sees each
    batch's model output (e.g. to collect predictions)."""
    loss_sum = tokens = 0.0
    for batch in run.batches:
        result = run.objective.eval_loss(run.engine, run.model_inputs(batch))  # -> sum over tokens (samples)
        loss_sum += result.loss.item()
        tokens += batch.trained_tokens
        if keep_output is not None:
            keep_output(batch, result.output)
    run.engine.train()
    loss_sum, tokens = run.runtime.all_reduce([loss_sum, tokens])
    return loss_sum, tokens


def summed_eval_terms(run: EvalRun) -> dict:
    """An objective with a quantity of the whole set (start_step) and its own eval_report: its terms summed over
    every batch and rank, reported as `eval_<term>`."""
    sums: dict[str, float] = {}
    run.objective.start_step(run.engine, (run.model_inputs(batch) for batch in run.batches))
    for batch in run.batches:
        result = run.objective.eval_loss(run.engine, run.model_inputs(batch))
        for name, value in result.terms.items():
            sums[name] = sums.get(name, 0.0) + float(value)
    run.engine.train()
    names = sorted(sums)
    totals = dict(zip(names, run.runtime.all_reduce([sums[n] for n in names])))
    return {"step": run.step, **{f"eval_{name}": value for name, value in run.objective.eval_report(totals).items()}}
