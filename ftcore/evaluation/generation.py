"""Evaluation by generation (`ft eval`, evaluation.generate): each held-out record's prompt -- rendered as training
rendered it, with the same chat template -- is answered by batched greedy generation and the answer scored against
the record's reference (ftcore/evaluation/scoring.py).

Distributed: rank r answers records r, r + world, ...; every rank runs the same number of generation batches
(a rank that has run out answers a filler batch and drops it), because under ZeRO-3 each forward step gathers the
partitioned weights from all ranks (transformers' synced_gpus keeps the ranks stepping together until every one
is done). The answers are gathered back into input order, so the result does not depend on the world size.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ftcore.config import DataConfig
from ftcore.data.batch import pad_token_id
from ftcore.data.formats import RecordError, prompt_and_reference
from ftcore.data.stream import DataError, SourceGroup, parse_record
from ftcore.durable import atomic_write_text
from ftcore.evaluation.scoring import mean_scores, score
from ftcore.rewards import RewardSample


@dataclass
class EvalPrompt:
    """One held-out record: where it is, its prompt's token ids, the reference answer and the whole record (reward
    functions see it)."""

    where: str
    ids: list[int]
    reference: str
    record: dict = field(default_factory=dict)


def read_prompts(data_cfg: DataConfig, tokenizer: Any, max_new_tokens: int) -> tuple[list[EvalPrompt], dict]:
    """Every record of data.eval as a prompt, in file order; a prompt longer than data.max_seq_len minus the answer
    keeps its last tokens. Malformed records follow data.on_error. Returns the prompts and their counts."""
    prompts: list[EvalPrompt] = []
    counts = {"records": 0, "truncated": 0, "skipped_errors": 0}
    room = max(data_cfg.max_seq_len - max_new_tokens, 1)
    for i, source in enumerate(data_cfg.eval or []):
        group = SourceGroup(source, data_cfg, i, 0)
        for raw in group.all_records():
            counts["records"] += 1
            try:
                record = parse_record(raw, group.spec)
                ids, reference = prompt_and_reference(record, group.spec, tokenizer)
            except RecordError as e:
                if data_cfg.on_error == "raise":
                    raise DataError(f"{raw.where}: {e} (data.on_error=skip skips such records)") from None
                counts["skipped_errors"] += 1
                continue
            if len(ids) > room:
                counts["truncated"] += 1
                ids = ids[-room:]
            prompts.append(EvalPrompt(raw.where, ids, reference, dict(record)))
    return prompts, counts


@torch.no_grad()
def answer_ids(model: torch.nn.Module, tokenizer: Any, batch: list[list[int]], max_new_tokens: int,
               synced: bool, device: torch.device) -> list[list[int]]:
    """Greedy answers to a batch of prompts (left-padded), as token ids up to and including EOS."""
    pad = pad_token_id(tokenizer)
    width = max(len(ids) for ids in batch)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, synced_gpus=synced, use_cache=True)
    answers = []
    for row in out[:, width:].tolist():
        cut = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        answers.append(row[:cut])
    return answers


def evaluate_by_generation(model: torch.nn.Module, tokenizer: Any, prompts: list[EvalPrompt], metrics: list[str],
                           *, batch_size: int, max_new_tokens: int, rank: int = 0, world_size: int = 1,
                           gather: Optional[Callable[[Any], list]] = None, synced: bool = False,
                           device: Optional[torch.device] = None,
                           rewards: Optional[Any] = None) -> tuple[list[dict], dict[str, float]]:
    """This rank's share answered and scored (`rewards`: also by a ftcore.rewards.pool.RewardPool's rules), then
    every rank's gathered (`gather`: all_gather_object) into input order. Returns (one row per prompt: where,
    reference, prediction, scores, rewards; the mean of each metric and reward)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    mine = list(range(rank, len(prompts), world_size))
    steps = math.ceil(math.ceil(len(prompts) / world_size) / batch_size) if prompts else 0
    answered: list[tuple[int, str, int]] = []
    try:
        for step in range(steps):
            chunk = mine[step * batch_size:(step + 1) * batch_size]
            batch = [prompts[i].ids for i in chunk] or [prompts[0].ids]  # a filler batch, dropped
            for i, ids in zip(chunk, answer_ids(model, tokenizer, batch, max_new_tokens, synced, device)):
                answered.append((i, tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids)))
    finally:
        model.train(was_training)
    mine_rows = [(i, text, rewarded) for (i, text, _), rewarded in
                 zip(answered, _rewards(rewards, tokenizer, prompts, answered))]
    everyone = [row for part in gather(mine_rows) for row in part] if gather else mine_rows
    rows = []
    for index, prediction, rewarded in sorted(everyone, key=lambda row: row[0]):
        prompt = prompts[index]
        rows.append({"index": index, "where": prompt.where, "reference": prompt.reference,
                     "prediction": prediction, **score(prediction, prompt.reference, metrics), **rewarded})
    means = mean_scores(rows, metrics)
    if rewards is not None:
        for name in [k for k in (rows[0] if rows else {}) if k.startswith("reward")]:
            got = [r[name] for r in rows if r[name] is not None]
            means[name] = sum(got) / len(got) if got else 0.0
    return rows, means


def _rewards(pool: Optional[Any], tokenizer: Any, prompts: list[EvalPrompt], answered: list) -> list[dict]:
    """Each answer's rewards: reward (the weighted total, None when a rule gave none) and reward_<rule> ({} each
    without a pool)."""
    if pool is None or not answered:
        return [{} for _ in answered]
    scores = pool.score([RewardSample(tokenizer.decode(prompts[i].ids, skip_special_tokens=True), text,
                                      prompts[i].reference, prompts[i].where, prompts[i].record, n)
                         for i, text, n in answered])
    return [{"reward": scores.total[k], **{f"reward_{label}": values[k] for label, values in scores.per_rule.items()}}
            for k in range(len(answered))]


def write_predictions(path: Path, rows: list[dict]) -> None:
    """The scored answers as JSON lines, written atomically (the directory is made when missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
