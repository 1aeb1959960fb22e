"""How a batch's tokens meet the model on this rank: the attention layout of packed rows, and Ulysses sequence
parallelism (distributed.sequence_parallel) through DeepSpeed's implementation
(deepspeed.runtime.sequence_parallel.ulysses_sp, arXiv 2506.13996), not ours.

model_inputs lays a Batch out for the run's attention: plain rows with their padding mask; packed rows with
per-sample position ids and a block-causal mask (sdpa, eager), or joined into one varlen row (flash-attention,
joined_row), so that no sample attends to another.

Groups of N consecutive ranks share each sample: every rank of a group reads the same batch from the data stream
(the stream is sharded over world / N data-parallel groups) and keeps its contiguous 1/N of every row's tokens
(sequence_shard: labels shifted before the split, global position ids). In each attention layer DeepSpeed's
UlyssesSPAttentionHF exchanges sequence for heads (all-to-all): a rank attends over the whole sequence with heads
/ N of the heads, then exchanges back. Everything else (embeddings, MLPs, norms, the chunked loss) runs on the
rank's own tokens, so activations shrink by N. The loss of a step stays the mean over its trained tokens: each
token is on exactly one rank, and the recipe's normaliser counts every rank's. Gradients are averaged over the
whole world by DeepSpeed (which sees every rank as data parallel; ZeRO shards over the world), and the recipe's
rescale by the world size turns that average into the sum the per-token mean needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ftcore.data.batch import Batch, ModelInputs
from ftcore.data.formats import IGNORE_INDEX
from ftcore.data.packing import packed_attention_mask, varlen_segments
from ftcore.errors import TrainError

SUPPORTED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class SequenceGroup:
    """The ranks that share this rank's samples: what an objective needs to sum per-row quantities (a response's
    log-prob, its token count) over the parts of each row."""

    degree: int
    group: Any  # the torch process group of the sequence group

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (not part of the autograd graph) summed over the group, in place; returned."""
        torch.distributed.all_reduce(tensor, group=self.group)
        return tensor


def start_sequence_parallel(model: Any, attn_implementation: str, degree: int, rows: int,
                            backend: str) -> SequenceGroup:
    """Make every attention call of this process's models Ulysses' (collective: every rank calls it, once): the
    sequence groups are created here, and transformers' `attn_implementation` function is wrapped. `rows`: the
    rows of every forward (micro_batch_size; two per pair for preference pairs)."""
    if attn_implementation not in SUPPORTED_ATTENTION:
        raise TrainError(f"distributed.sequence_parallel={degree}: this model runs attention "
                         f"{attn_implementation}, which Ulysses cannot split (it needs sdpa or flash_attention_2)")
    import deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    deepspeed.init_distributed(dist_backend=backend)  # joins the process group that already exists
    try:
        mpu = UlyssesSPAttentionHF.register_with_transformers(model, attn_implementation, degree, rows,
                                                              seq_length_is_variable=True)
    except (ValueError, RuntimeError) as e:
        raise TrainError(f"distributed.sequence_parallel={degree}: {e}") from None
    return SequenceGroup(degree, mpu.get_sequence_parallel_group())


def model_inputs(batch: Batch, device: Any, attn_implementation: str = "sdpa",
                 dtype: Optional[torch.dtype] = None) -> ModelInputs:
    """`batch` on `device` as the objective takes it (packed rows: position ids, and what keeps their samples
    apart for this attention; a sequence shard: its global position ids and shifted labels, no mask)."""
    extra = None
    if batch.extra is not None:  # read by the task's objective, never passed to the model
        extra = batch.extra.on_device(device, lambda rows: model_inputs(rows, device, attn_implementation, dtype))
    if batch.shifted:
        return ModelInputs(batch.input_ids.to(device), batch.labels.to(device),
                           position_ids=batch.position_ids.to(device), shifted=True, extra=extra)
    if batch.position_ids is None:
        return ModelInputs(batch.input_ids.to(device), batch.labels.to(device),
                           attention_mask=batch.attention_mask.to(device), extra=extra)
    if attn_implementation == "flash_attention_2":  # one varlen sequence: rows joined
        row = joined_row(batch)
        return ModelInputs(row.input_ids.to(device), row.labels.to(device), position_ids=row.position_ids.to(device),
                           varlen=varlen_segments(row.seq_lens[0]).to(device), extra=extra)
    mask = packed_attention_mask(batch.seq_lens, batch.input_ids.shape[1], attn_implementation, dtype)
    return ModelInputs(batch.input_ids.to(device), batch.labels.to(device), attention_mask=mask.to(device),
                       position_ids=batch.position_ids.to(device), extra=extra)


def joined_row(batch: Batch) -> Batch:
    """The batch's rows joined into one varlen row, as flash-attention takes packed rows: every sample (or
    unpacked row) told apart by its position ids restarting at 0; its segment lengths in seq_lens[0]."""
    count, width = batch.input_ids.shape
    positions = batch.position_ids if batch.position_ids is not None else torch.arange(width).expand(count, width)
    lengths = ([n for row in batch.seq_lens for n in row] if batch.seq_lens is not None else [width] * count)
    return Batch(batch.input_ids.reshape(1, -1), batch.attention_mask.reshape(1, -1), batch.labels.reshape(1, -1),
                 sample_ids=list(batch.sample_ids), position_ids=positions.reshape(1, -1), seq_lens=[lengths],
                 positions=list(batch.positions), examples=batch.examples)


def sequence_shard(batch: Batch, part: int, parts: int, rows: int, one_row: bool = False) -> Batch:
    """Rank `part` of `parts` in a sequence group: its contiguous 1/parts of every row's tokens. Labels are
    shifted first, so the last token of a part still learns the first token of the next; rows are padded to
    `rows` (a pair batch keeps its chosen half, then its rejected half) and the width to a multiple of `parts`
    (padding never trains), as Ulysses needs the same shapes on every rank; position ids stay global (packed
    rows: per sample). Without a mask: Ulysses attends causally (right padding is never attended to by a real
    token). The task's extra rows (KTO's mismatched rows) are split alike.

    one_row (packing, which sequence parallelism allows with flash_attention_2 only): the rows are first joined
    into one varlen row (joined_row), as the flash-attention path without sequence parallelism takes packed
    rows."""
    if one_row and batch.input_ids.shape[0] > 1:
        return sequence_shard(joined_row(batch), part, parts, 1)
    count, width = batch.input_ids.shape
    rows = max(rows, count)
    wide = -(-width // parts) * parts
    if batch.blocks > 1:  # pad each block to its share of the rows (pairs: chosen and rejected halves)
        share = rows // batch.blocks
        order = [i for b in range(batch.blocks)
                 for i in [b * batch.examples + j for j in range(batch.examples)] + [-1] * (share - batch.examples)]
    else:
        order = list(range(count)) + [-1] * (rows - count)
    ids = torch.zeros((rows, wide), dtype=torch.long)
    labels = torch.full((rows, wide), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((rows, wide), dtype=torch.long)
    positions = torch.arange(wide).expand(rows, wide).clone()
    for row, source in enumerate(order):
        if source < 0:
            continue
        ids[row, :width] = batch.input_ids[source]
        labels[row, :width - 1] = batch.labels[source, 1:]
        mask[row, :width] = batch.attention_mask[source]
        if batch.position_ids is not None:  # (joined) packed: per-sample positions, the padding counting on
            positions[row, :width] = batch.position_ids[source]
            positions[row, width:] = batch.position_ids[source, -1] + 1 + torch.arange(wide - width)
    extra = None
    if batch.extra is not None:
        extra = batch.extra.sequence_shard(lambda own: sequence_shard(own, part, parts, rows), rows, count)
    span = slice(part * wide // parts, (part + 1) * wide // parts)
    return Batch(ids[:, span].contiguous(), mask[:, span].contiguous(), labels[:, span].contiguous(),
                 sample_ids=list(batch.sample_ids), position_ids=positions[:, span].contiguous(),
                 positions=list(batch.positions), examples=batch.examples, shifted=True, blocks=batch.blocks,
                 extra=extra)
