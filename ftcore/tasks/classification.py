"""Task classification: a sequence-classification head on the model (AutoModelForSequenceClassification) trained
by cross-entropy on each record's class (format classification, {text, label}); eval loss per sample, accuracy,
macro-F1 and the confusion matrix, from every sample's prediction, which is written to output_dir/eval/step{N}.json
(so anyone can recompute the scores).

Imports without torch (ftcore/tasks/__init__.py says why): the engines are imported where a method runs."""

from __future__ import annotations

from typing import Any, Optional

from ftcore.config import Config, FieldError
from ftcore.data.formats import IGNORE_INDEX, tokenize_labelled_text
from ftcore.run_dir import RunDir
from ftcore.tasks.base import EvalRun, ObjectiveSetup, Task, data_sources, summed_eval_loss


class Classification(Task):
    """One class per record; the loss is the mean over the step's samples."""

    formats = ("classification",)
    selected_by = "task: classification"
    head = "sequence_classification"

    def check_config(self, cfg: Config) -> None:
        """Format classification only, one label per sample (no packing, no train_on, no base KL), two or more
        distinct classes, and neither sequence parallelism nor an explicit chunked loss (class logits are one row
        per sample, read at its last token)."""
        data = cfg.data
        for where, source in data_sources(cfg):
            if source.format != "classification":
                raise FieldError(f"{where}.format", f"task classification reads format classification ({{text, "
                                 f"label}} records); {source.path} is {source.format}")
        for name, bad in (("data.packing", data.packing), ("data.train_on", data.train_on is not None)):
            if bad:
                raise FieldError(name, "does not apply to task classification (one label per sample trains)")
        if cfg.loss.base_kl:
            raise FieldError("loss.base_kl", "applies to task causal_lm (a classification head has no base model "
                             "predictions to stay close to)")
        if data.labels is not None and (len(data.labels) < 2 or len(set(data.labels)) != len(data.labels)):
            raise FieldError("data.labels", f"needs at least two distinct class names (got {data.labels})")
        super().check_config(cfg)
        n = cfg.distributed.sequence_parallel
        if n > 1:
            raise FieldError("task", f"classification does not apply with distributed.sequence_parallel={n} (a "
                             "classification head reads each sample's last token; use distributed.sequence_parallel=1)")
        if cfg.loss.impl in ("chunked", "fused"):
            raise FieldError("loss.impl", f"{cfg.loss.impl} applies to task causal_lm (a classification "
                             "head's logits are one row per sample); use auto or full")

    def prepare_data(self, data_cfg: Any) -> Optional[str]:
        """data.labels settled (found in the data when unset): recorded in the run's config, and so in
        checkpoints, final/ and the export's id2label."""
        from ftcore.data.stream import discover_labels

        found = data_cfg.labels is None
        data_cfg.labels = discover_labels(data_cfg)
        return (f"classes ({len(data_cfg.labels)}{', found in the data' if found else ''}): "
                + ", ".join(f"{i}={name}" for i, name in enumerate(data_cfg.labels)))

    def tokenize(self, record: Any, spec: Any, tokenizer: Any, max_seq_len: int) -> Any:
        """The text as the tokenizer gives it at inference, and [class id] as its labels."""
        return tokenize_labelled_text(record, spec, tokenizer)

    def head_settings(self, data_cfg: Any, pad_id: Optional[int]) -> Optional[dict]:
        """A new classification head over data.labels (`ft plan` passes no pad id: only the head's size)."""
        from ftcore.model import classification_head_kwargs

        if pad_id is None:  # the head's size hardly matters to a plan; the label set may only be known from data
            return {"num_labels": len(data_cfg.labels or [0, 1])}
        return classification_head_kwargs(data_cfg.labels, pad_id)

    def collate(self, samples: list, sample_ids: list[str], collation: Any,
                next_samples: Optional[list] = None) -> Any:
        """Right-padded rows; labels is one class id per row (the model reads its prediction at the last real
        token)."""
        batch = super().collate(samples, sample_ids, collation)
        batch.labels = batch.labels[:, 0].clone()
        return batch

    def filler_batch(self, pad_id: int) -> Any:
        """One row of padding whose class is ignored."""
        batch = super().filler_batch(pad_id)
        batch.labels = batch.labels[:, 0].clone()
        return batch

    def describe(self, batch: Any, data_cfg: Any) -> list[tuple[str, list[int], list[int], int]]:
        """The text with its class: one label per sample trains, no token is a target."""
        ids = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
        return [(f" (label {data_cfg.labels[int(batch.labels[0])]})", ids, [IGNORE_INDEX] * len(ids), 1)]

    def build_objective(self, setup: ObjectiveSetup) -> tuple[Any, str]:
        """Cross-entropy of each sample's class from the model's own (small) logits."""
        from ftcore.losses.objective import ClassificationLoss

        return ClassificationLoss(), "full"

    def evaluate(self, run: EvalRun) -> dict:
        """Loss per sample, accuracy, macro-F1, the confusion matrix; every prediction saved by rank 0."""
        from ftcore.metrics import classification_scores, write_summary

        predictions: list[tuple[str, int, int]] = []  # (sample id, label, predicted class)

        def keep(batch: Any, output: Any) -> None:
            predicted = output.logits.argmax(dim=-1).tolist()
            predictions.extend((sample_id, int(label), int(p)) for sample_id, label, p
                               in zip(batch.sample_ids, batch.labels.tolist(), predicted) if label != IGNORE_INDEX)

        loss_sum, samples = summed_eval_loss(run, keep)
        gathered = run.runtime.all_gather_object(predictions)
        everything = sorted((p for part in gathered for p in part), key=_file_order)  # the same at any world size
        labels = run.cfg.data.labels
        scores = classification_scores([label for _, label, _ in everything], [p for _, _, p in everything],
                                       len(labels))
        if run.runtime.is_main:
            directory = RunDir(run.cfg.output_dir).eval_predictions
            directory.mkdir(parents=True, exist_ok=True)
            write_summary(directory / f"step{run.step:06d}.json",
                          {"step": run.step, "labels": labels, **scores,
                           "predictions": [{"id": sample_id, "label": labels[label], "prediction": labels[p]}
                                           for sample_id, label, p in everything]})
        return {"step": run.step, "eval_loss": loss_sum / max(samples, 1), "eval_accuracy": scores["accuracy"],
                "eval_macro_f1": scores["macro_f1"], "eval_samples": len(everything),
                "eval_confusion": scores["confusion"]}


    def eval_line(self, metrics: dict, run_dir: Any) -> str:
        """Loss, accuracy and macro-F1, and where the predictions are."""
        return (f"eval loss {metrics['eval_loss']:.4f} accuracy {metrics['eval_accuracy']:.4f} macro-F1 "
                f"{metrics['eval_macro_f1']:.4f} ({metrics['eval_samples']} samples; predictions in "
                f"{run_dir.eval_predictions})")


def _file_order(prediction: tuple[str, int, int]) -> tuple[str, int]:
    """Sample ids are `file:line` (or `file:row`): order by file, then line number."""
    where, _, number = prediction[0].rpartition(":")
    return (where, int(number)) if number.isdigit() else (prediction[0], 0)
