"""Task rl's rollouts (ftcore/tasks/rl.py says what a step does): each rl.num_iterations steps the policy answers the
data stream's prompts (seeded sampling, under ZeRO-3 with the whole model gathered or layer by layer), the rewards
score the answers in worker processes, dynamic sampling replaces groups without signal, and the step's micro batches
are built with their advantages (and the old policy's log-probs); the rollout batch is kept, and checkpointed, for
the steps that reuse it.

Imports without torch (ftcore/tasks/__init__.py says why): the engines are imported where a method runs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class RolloutExtra:
    """A rollout micro batch's extra: each row's advantage, and the rollout's counts for the step's metrics
    (summed over micro batches and ranks by the recipe, turned into means by ftcore.losses.grpo.rollout_report)."""

    advantages: Any  # float tensor, one per row
    counts: dict = field(default_factory=dict)  # name -> 0-dim float64 tensor
    old_logps: Any = None  # rl.num_iterations > 1: the sampling policy's per-token log-probs [rows, width]

    def on_device(self, device: Any, inputs_of: Any) -> RolloutExtra:
        """The advantages and old log-probs on `device` (the counts stay where they are: they are only summed)."""
        old = self.old_logps.to(device) if self.old_logps is not None else None
        return RolloutExtra(self.advantages.to(device), self.counts, old)

    def sequence_shard(self, shard_of: Any, rows: int, count: int) -> RolloutExtra:
        """(task rl refuses sequence parallelism)"""
        raise NotImplementedError("task rl does not split samples over ranks")


def score_completions(pool: Any, tokenizer: Any, answered: list, max_new_tokens: int) -> tuple[list, dict]:
    """(each completion's total reward, or None; the counts rollout_report turns into metrics) of (prompt, where,
    completion ids) triples."""
    from ftcore.rewards import RewardSample

    eos = tokenizer.eos_token_id
    samples = [RewardSample(p.prompt, tokenizer.decode(ids, skip_special_tokens=True), p.reference, where,
                            p.record, len(ids)) for p, where, ids in answered]
    scores = pool.score(samples) if samples else None
    totals = scores.total if scores else []
    valid = [t for t in totals if t is not None]
    counts = {"completions": len(answered), "rewarded": len(valid), "reward_sum": sum(valid),
              "reward_sq_sum": sum(v * v for v in valid),
              "completion_tokens": sum(len(ids) for _, _, ids in answered),
              "truncated": sum(1 for _, _, ids in answered if _is_truncated(ids, eos, max_new_tokens)),
              "timeouts": sum(scores.timeouts.values()) if scores else 0}
    for label, values in (scores.per_rule.items() if scores else []):
        counts[f"reward_rule_{label}"] = sum(v for v, t in zip(values, totals) if t is not None)
    return totals, {k: float(v) for k, v in counts.items()}


def _is_truncated(ids: list[int], eos: Any, max_new_tokens: int) -> bool:
    return len(ids) >= max_new_tokens and (not ids or ids[-1] != eos)


def _add(counts: dict, more: dict) -> dict:
    return {k: counts.get(k, 0.0) + more.get(k, 0.0) for k in {**counts, **more}}


@dataclass
class Group:
    """One prompt's completions in a rollout: the prompt's tokens as answered (cut to leave room for
    rl.max_new_tokens), where it was read, and each completion's ids and reward (None: it timed out)."""

    prompt: Any  # ftcore.tasks.rl.RLPrompt
    where: str
    position: int
    prompt_ids: list[int]
    completions: list[list[int]]
    totals: list = field(default_factory=list)

    @property
    def has_signal(self) -> bool:
        """Do its rewards differ (else every advantage is 0: nothing to learn from it)?"""
        return len({t for t in self.totals if t is not None}) > 1


class Rollouts:
    """Turns the data stream's prompt batches into each step's training batches (module docstring); the rollout
    batch is kept for rl.num_iterations steps (state_dict: in every checkpoint). close() ends the reward workers.
    Collective: every rank calls it at every step."""

    def __init__(self, setup: Any):
        from ftcore.rewards import rules_of
        from ftcore.rewards.pool import RewardPool

        self.cfg, self.runtime, self.tokenizer, self.unwrap = setup.cfg, setup.runtime, setup.tokenizer, setup.unwrap
        self.pad_id, self.objective, self.inputs_of = setup.pad_id, setup.objective, setup.inputs_of
        self.pool = RewardPool(rules_of(self.cfg.rl.rewards), self.cfg.rl.reward_workers,
                               self.cfg.rl.reward_timeout_s)
        self.buffer: Optional[dict] = None  # {"step": the step that generated it, "micro": micro batches' rows}
        self.gathers: Optional[bool] = None  # ZeRO-3: did the last rollout gather the whole model?

    def close(self) -> None:
        """Stop the reward workers."""
        self.pool.close()

    def __call__(self, next_batch: Any, count: int, engine: Any, step: int) -> list:
        """The `count` micro batches step `step` (0-based) trains: a new rollout batch from next_batch()'s prompt
        batches every rl.num_iterations steps, the kept one in between."""
        iterations = self.cfg.rl.num_iterations
        iteration = step % iterations
        if iteration == 0:
            self.buffer = {"step": step, "micro": self._roll_out(next_batch, count, engine, step)}
        elif self.buffer is None or self.buffer["step"] != step - iteration:
            raise RuntimeError(f"step {step + 1} is update {iteration + 1} of {iterations} on the rollout batch of "
                               f"step {step - iteration + 1}, which this process does not hold")
        return [self._batch(micro, again=iteration > 0) for micro in self.buffer["micro"]]

    # ---- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The kept rollout batch (this rank's micro batches: rows, advantages, the old policy's log-probs and the
        metrics' counts), when rl.num_iterations > 1; else nothing (every step generates anew)."""
        return dict(self.buffer) if self.buffer is not None and self.cfg.rl.num_iterations > 1 else {}

    def load_state_dict(self, states: list[dict], checkpoint_step: int) -> None:
        """Continue from every saved rank's state_dict (rank order) at checkpoint_step. Mid rollout batch, this
        rank takes its share of the saved micro batches, in rank order (the same share on the same world size)."""
        iterations = self.cfg.rl.num_iterations
        if checkpoint_step % iterations == 0:
            return  # the next step generates anew
        rollout_step = checkpoint_step - checkpoint_step % iterations
        if not states or any(s.get("step") != rollout_step for s in states):
            raise ValueError(f"it was saved at step {checkpoint_step}, inside the rollout batch of step "
                             f"{rollout_step + 1} (rl.num_iterations {iterations}), without that rollout batch")
        micro = [m for s in states for m in s["micro"]]
        rt, rows = self.runtime, self.cfg.train.micro_batch_size * self.cfg.rl.num_generations
        if len(micro) % rt.world_size or any(len(m["rows"]) != rows for m in micro):
            raise ValueError(f"its rollout batch ({len(micro)} micro batches of {len(micro[0]['rows'])} rows) "
                             f"cannot be split into {rt.world_size} ranks' micro batches of {rows} rows; resume "
                             f"it with train.micro_batch_size as it was, or from a checkpoint at a rollout boundary")
        share = len(micro) // rt.world_size
        mine = [dict(m) for m in micro[rt.rank * share:(rt.rank + 1) * share]]
        # The step's counts are summed over ranks key by key: every rank's first micro batch carries all the keys
        # (those of the saved micro batches it took, zeros for the others).
        names = sorted({k for m in micro for k in m["counts"]})
        mine[0]["counts"] = {k: sum(m["counts"].get(k, 0.0) for m in mine) for k in names}
        for m in mine[1:]:
            m["counts"] = {}
        self.buffer = {"step": rollout_step, "micro": mine}

    # ---- one rollout batch ---------------------------------------------------------------------------
    def _roll_out(self, next_batch: Any, count: int, engine: Any, step: int) -> list[dict]:
        """Generate, score (dynamic sampling: replace groups without signal), advantage over the whole step, and
        with rl.num_iterations > 1 the old policy's log-probs: this rank's micro batches as plain rows."""
        import torch

        cfg, r = self.cfg, self.cfg.rl
        g, per_micro = r.num_generations, cfg.train.micro_batch_size
        started = time.perf_counter()
        engine.eval()
        with self._generation_model(engine) as (model, synced):
            drawn, counts = self._draw(next_batch, count, model, synced, step)
        counts.update(groups=float(len(drawn)), equal_groups=float(sum(1 for grp in drawn if not grp.has_signal)),
                      generation_s=time.perf_counter() - started, ranks=1.0)
        groups = self._choose(drawn, count * per_micro, counts) if r.dynamic_sampling_draws else drawn
        advantages = self._advantages(groups, drawn, counts)
        micro, eos = [], self.tokenizer.eos_token_id
        for index in range(count):
            part = groups[index * per_micro:(index + 1) * per_micro]
            micro.append({
                "rows": [[grp.prompt_ids, ids, t is not None and not (r.mask_truncated and _is_truncated(
                    ids, eos, r.max_new_tokens))] for grp in part for ids, t in zip(grp.completions, grp.totals)],
                "sample_ids": [f"{grp.where}#{k}" for grp in part for k in range(g)],
                "positions": [grp.position for grp in part for _ in range(g)],
                "advantages": advantages[index * per_micro * g:(index + 1) * per_micro * g].clone(),
                # The step's counts ride on its first micro batch (they are summed over micro batches and ranks).
                "counts": counts if index == 0 else {}, "old_logps": None})
        if r.num_iterations > 1:  # the sampling policy's log-probs, for the ratio of the later updates
            with torch.no_grad():
                for m in micro:
                    m["old_logps"] = self.objective.old_token_logps(engine, self.inputs_of(self._batch(m))).cpu()
        engine.train()
        return micro

    def _draw(self, next_batch: Any, count: int, model: Any, synced: bool, step: int) -> tuple[list[Group], dict]:
        """`count` prompt batches answered and scored; with dynamic sampling, more (one batch at a time, all ranks
        deciding together) until this rank has enough groups with signal or rl.dynamic_sampling_draws is spent."""
        r, rt, per_micro = self.cfg.rl, self.runtime, self.cfg.train.micro_batch_size
        groups, counts = self._answer([next_batch() for _ in range(count)], model, synced, step)
        first_draw = len(groups)
        for _ in range(r.dynamic_sampling_draws):  # DAPO's dynamic sampling
            short = sum(1 for grp in groups if grp.has_signal) < count * per_micro
            if not rt.all_reduce([float(short)], "max")[0]:
                break
            if short:
                more, more_counts = self._answer([next_batch()], model, synced, step)
                groups, counts = groups + more, _add(counts, more_counts)
            elif synced:  # every forward is a collective: this rank generates as often as the others
                for _ in range(per_micro):
                    self._generate(model, [self.pad_id], [0], synced)
        if r.dynamic_sampling_draws:
            counts["resampled_prompts"] = float(len(groups) - first_draw)
        return groups, counts

    @staticmethod
    def _choose(drawn: list[Group], needed: int, counts: dict) -> list[Group]:
        """Dynamic sampling's choice: the first `needed` groups with signal, in draw order; dropped groups in
        their place for any still missing (counted as unresampled_groups)."""
        chosen = [i for i, grp in enumerate(drawn) if grp.has_signal][:needed]
        counts["unresampled_groups"] = float(needed - len(chosen))
        chosen += [i for i, grp in enumerate(drawn) if not grp.has_signal][:needed - len(chosen)]
        return [drawn[i] for i in sorted(chosen)]

    def _advantages(self, groups: list[Group], drawn: list[Group], counts: dict) -> Any:
        """The trained completions' advantages over the whole step (every rank's rewards, in rank order: a group
        never spans two ranks); the step-wide counts (completions at the step's best reward, the longest) added."""
        import torch

        from ftcore.losses.grpo import group_advantages

        rt, r = self.runtime, self.cfg.rl
        totals = [t for grp in groups for t in grp.totals]
        drawn_totals = [t for grp in drawn for t in grp.totals if t is not None]
        longest = max((len(ids) for grp in drawn for ids in grp.completions), default=0)
        everyone = rt.all_gather_object((totals, max(drawn_totals, default=None), longest))
        start = sum(len(part) for part, _, _ in everyone[:rt.rank])
        rewards = torch.tensor([t if t is not None else 0.0 for part, _, _ in everyone for t in part],
                               dtype=torch.float64)
        valid = torch.tensor([t is not None for part, _, _ in everyone for t in part])
        step_max = max((b for _, b, _ in everyone if b is not None), default=None)  # (the step's best reward)
        counts["at_max"] = float(sum(1 for t in drawn_totals if t == step_max))
        # The step's longest completion: counts are summed over ranks, so rank 0 alone carries it.
        counts["completion_tokens_max"] = float(max(n for _, _, n in everyone)) if rt.rank == 0 else 0.0
        return group_advantages(rewards, r.num_generations, r.advantage_scale, valid)[start:start + len(totals)].float()

    def _answer(self, batches: list, model: Any, synced: bool, step: int) -> tuple[list[Group], dict]:
        """Each prompt of `batches` answered rl.num_generations times and scored."""
        from ftcore.sampling import completion_seed

        r = self.cfg.rl
        room = self.cfg.data.max_seq_len - r.max_new_tokens
        groups = []
        for batch in batches:
            for prompt, where, position in zip(batch.extra.prompts, batch.sample_ids, batch.positions):
                seeds = [completion_seed(self.cfg.train.seed, step, where, k) for k in range(r.num_generations)]
                ids = prompt.ids[-room:]
                groups.append(Group(prompt, where, position, ids, self._generate(model, ids, seeds, synced)))
        totals, counts = score_completions(self.pool, self.tokenizer,
                                [(grp.prompt, grp.where, ids) for grp in groups for ids in grp.completions],
                                r.max_new_tokens)
        for k, grp in enumerate(groups):
            grp.totals = totals[k * r.num_generations:(k + 1) * r.num_generations]
        return groups, counts

    def _generate(self, model: Any, prompt_ids: list[int], seeds: list[int], synced: bool) -> list[list[int]]:
        from ftcore.sampling import sample_group

        r = self.cfg.rl
        return sample_group(model, prompt_ids, seeds, r.max_new_tokens, r.temperature, r.top_p, self.pad_id,
                            self.tokenizer.eos_token_id, synced, self.runtime.device)

    def _batch(self, micro: dict, again: bool = False) -> Any:
        """A micro batch of rollout rows (prompt + completion, the completion trained unless masked) from its
        plain form; `again`: a later update on it (no generation time in its counts)."""
        import torch

        from ftcore.data.batch import collate
        from ftcore.data.formats import IGNORE_INDEX, Tokenized

        samples = [Tokenized(prompt + ids, [IGNORE_INDEX] * len(prompt) + (ids if keep else [IGNORE_INDEX] * len(ids)))
                   for prompt, ids, keep in micro["rows"]]
        batch = collate(samples, self.pad_id, list(micro["sample_ids"]))
        batch.positions = list(micro["positions"])
        batch.examples = len(samples)
        counts = {k: torch.tensor(0.0 if again and k == "generation_s" else v, dtype=torch.float64)
                  for k, v in micro["counts"].items()}
        batch.extra = RolloutExtra(micro["advantages"], counts, micro["old_logps"])
        return batch

    # ---- ZeRO-3: how the weights meet generation -----------------------------------------------------
    def _generation_model(self, engine: Any) -> Any:
        """A context giving (the model to generate with, whether its forwards are collectives)."""
        import contextlib

        model = self.unwrap(engine)
        if not self.runtime.synced_forwards:
            return contextlib.nullcontext((model, False))
        if not self._gather_whole_model(model):
            return contextlib.nullcontext((model, True))
        return _whole_model(engine, model)

    def _gather_whole_model(self, model: Any) -> bool:
        """rl.zero3_generation's rule: gather when the whole model plus the KV cache of a group's rows fits in 80%
        of this device's free memory (auto), said in the log when the answer changes."""
        from ftcore.model_geometry import kv_cache_bytes

        mode, rt, r = self.cfg.rl.zero3_generation, self.runtime, self.cfg.rl
        params = list(model.parameters())
        whole = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params)
        held = sum(p.ds_tensor.numel() * p.element_size() if hasattr(p, "ds_tensor") else p.numel() * p.element_size()
                   for p in params)
        cache = kv_cache_bytes(model.config, r.num_generations, self.cfg.data.max_seq_len, params[0].element_size())
        needed, free = whole - held + cache, _free_bytes(rt.device)
        fits = needed <= 0.8 * free
        # Every rank decides the same (a rank that gathers while another fetches layer by layer would hang).
        gathers = mode == "gather" or (mode == "auto" and not rt.all_reduce([float(not fits)], "max")[0])
        if gathers != self.gathers:
            gib = f"{needed / 2**30:.2f} GiB with the KV cache, {free / 2**30:.1f} GiB free"
            rt.log(f"rollout under ZeRO-3: the whole model gathered on every rank for generation ({gib})" if gathers
                   else f"rollout under ZeRO-3: generation fetches every layer from the other ranks for each token "
                        f"(slow: see generation_s; rl.zero3_generation={mode}, {gib})")
            self.gathers = gathers
        return gathers


def _free_bytes(device: Any) -> int:
    """Free memory where the weights would be gathered: the GPU's, or the host's."""
    import psutil
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


class _whole_model:
    """DeepSpeed's unwrap_model_for_generation (the ZeRO-3 parameters gathered once, the fetch hooks off) as a
    context giving (model, not synced)."""

    def __init__(self, engine: Any, model: Any):
        from deepspeed.runtime.zero import unwrap_model_for_generation

        self.context, self.model = unwrap_model_for_generation(engine), model

    def __enter__(self) -> tuple:
        self.context.__enter__()
        return self.model, False

    def __exit__(self, *exc: Any) -> Any:
        return self.context.__exit__(*exc)
