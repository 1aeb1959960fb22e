"""The KTO task (task preference with preference.loss kto; Ethayarajh et al. 2024, arXiv 2402.01306): records
{prompt, completion, label: true|false} (format kto), one completion each, desirable or not; the loss per sample
against a reference point estimated over the whole step from mismatched rows (each sample's prompt followed by the
next sample's completion in stream order; ftcore/losses/preference.py KTOLoss). The step loss is the mean over the
step's samples. Eval: the samples' mean loss, reward accuracy, rewards and log-probs, and the reference point.

Imports without torch (ftcore/tasks/__init__.py says why): the engines are imported where a method runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ftcore.tasks.base import ObjectiveSetup, token_row
from ftcore.tasks.preference import Preference


@dataclass
class KTOBatch:
    """What a KTO batch holds beside its rows (its Batch.extra; on the device, its ModelInputs.extra):
    desirable[i] for row i, and the mismatched rows (a Batch; on the device, their ModelInputs)."""

    desirable: Any  # bool tensor, one per row
    mismatched: Any

    def on_device(self, device: Any, inputs_of: Any) -> KTOBatch:
        """The KTO objective's part of the inputs: the flags on `device`, the mismatched rows laid out as the
        batch's (ModelInputs)."""
        return KTOBatch(self.desirable.to(device), inputs_of(self.mismatched))

    def sequence_shard(self, shard_of: Any, rows: int, count: int) -> KTOBatch:
        """This rank's share under sequence parallelism: the flags padded to `rows` (padding rows are not
        desirable and train nothing), the mismatched rows split like the batch's."""
        import torch

        desirable = torch.zeros(rows, dtype=torch.bool)
        desirable[:count] = self.desirable
        return KTOBatch(desirable, shard_of(self.mismatched))


def collate_kto(samples: list, partners: list, pad_id: int, sample_ids: list[str], limit: int, bos: Any) -> Any:
    """The samples' rows, right-padded, with their KTOBatch: which are desirable, and the mismatched rows (sample
    i's prompt, partners[i]'s completion, truncated to `limit` like a sample) as their own padded batch."""
    import torch

    from ftcore.data.batch import collate

    batch = collate([s.sample for s in samples], pad_id, sample_ids)
    mismatched = collate([s.with_completion_of(p, limit, bos) for s, p in zip(samples, partners)], pad_id, [])
    batch.extra = KTOBatch(torch.tensor([s.desirable for s in samples]), mismatched)
    batch.examples = len(samples)
    return batch


class KTO(Preference):
    """One row per sample, plus a mismatched row the loss scores without training on it."""

    formats = ("kto",)
    selected_by = "task: preference and preference.loss: kto"
    record_shape = "{prompt, completion, label}"
    rows_per_example = 1
    reads_next_sample = True  # the mismatched row takes the next sample's completion

    def tokenize(self, record: Any, spec: Any, tokenizer: Any, max_seq_len: int) -> Any:
        """A KTOSample (ftcore/data/preference.py), truncated by the pairs' rule."""
        from ftcore.data.preference import tokenize_kto

        return tokenize_kto(record, spec, tokenizer, max_seq_len)

    def collate(self, samples: list, sample_ids: list[str], collation: Any,
                next_samples: Optional[list] = None) -> Any:
        """collate_kto with each sample's successor as its partner."""
        return collate_kto(samples, next_samples, collation.pad_id, sample_ids, collation.max_seq_len,
                           collation.bos_id)

    def filler_batch(self, pad_id: int) -> Any:
        """One padding row with one padding mismatched row (no sample to the loss)."""
        import torch

        from ftcore.data.batch import collate, filler_sample

        batch = collate([filler_sample(pad_id)], pad_id, [])
        batch.examples = 1
        batch.extra = KTOBatch(torch.tensor([True]), collate([filler_sample(pad_id)], pad_id, []))
        return batch

    def describe(self, batch: Any, data_cfg: Any) -> list[tuple[str, list[int], list[int], int]]:
        """The sample, named desirable or undesirable."""
        name = "desirable" if bool(batch.extra.desirable[0]) else "undesirable"
        return [(f" ({name})", *token_row(batch, 0))]

    def _loss(self, setup: ObjectiveSetup, transform: Any) -> Any:
        """KTOLoss on the samples' log-probs; its reference point all-reduced over the step."""
        from ftcore.losses.preference import KTOLoss

        return KTOLoss(setup.cfg.preference, setup.unwrap, setup.chunk_tokens, transform, setup.reference,
                       setup.all_reduce, setup.sequence)

    def eval_line(self, metrics: dict, run_dir: Any) -> str:
        """Loss, reward accuracy and margin over the samples, with the reference point."""
        return f"{self._reward_line(metrics)}kl {metrics['eval_kl']:.4f} ({metrics['eval_samples']} samples)"
