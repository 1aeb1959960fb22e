"""distributed.sequence_parallel: Ulysses sequence parallelism through DeepSpeed's implementation
(deepspeed.runtime.sequence_parallel.ulysses_sp, arXiv 2506.13996), not ours.

Groups of N consecutive ranks share each sample: every rank of a group reads the same batch from the data stream
(the stream is sharded over world / N data-parallel groups) and keeps its contiguous 1/N of every row's tokens
(Batch.sequence_shard: labels shifted before the split, global position ids). In each attention layer DeepSpeed's
UlyssesSPAttentionHF exchanges sequence for heads (all-to-all): a rank attends over the whole sequence with heads
/ N of the heads, then exchanges back. Everything else (embeddings, MLPs, norms, the chunked loss) runs on the
rank's own tokens, so activations shrink by N. The loss of a step stays the mean over its trained tokens: each
token is on exactly one rank, and the recipe's normaliser counts every rank's. Gradients are averaged over the
whole world by DeepSpeed (which sees every rank as data parallel; ZeRO shards over the world), and the recipe's
rescale by the world size turns that average into the sum the per-token mean needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

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
