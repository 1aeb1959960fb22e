"""Seeded sampling for rollouts (task rl): every completion draws its tokens from a generator of its own, seeded
by (seed, step, prompt id, generation index), so a completion is the same whichever batch, rank or world size
generates it, and again after a resume (the step and the prompt's id are in the checkpoint; nothing depends on
the global RNG).

SeededSampler is a transformers LogitsProcessor: at every position it draws each row's token from softmax(logits
/ temperature) cut to the top_p nucleus (the fewest most-likely tokens whose probabilities reach top_p), by
inverse transform of one uniform from the row's generator, and returns scores where only that token is finite:
generate's greedy pick then takes it. generate keeps its KV cache, its stopping at EOS and ZeRO-3's synced_gpus."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def completion_seed(seed: int, step: int, prompt_id: str, generation: int) -> int:
    """The seed of one completion's generator: a hash of what identifies it (63 bits)."""
    digest = hashlib.blake2b(f"{seed}\x1f{step}\x1f{prompt_id}\x1f{generation}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class SeededSampler:
    """Temperature and top-p sampling of each row by its own generator (one seed per row, completion_seed)."""

    def __init__(self, seeds: list[int], temperature: float = 1.0, top_p: float = 1.0):
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """The distribution a row samples from: softmax(scores / temperature), zero outside the top_p nucleus,
        renormalised (float32, rows as scores)."""
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            ordered, order = probs.sort(dim=-1, descending=True)
            before = ordered.cumsum(dim=-1) - ordered  # mass of the more likely tokens
            ordered = torch.where(before < self.top_p, ordered, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, ordered)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Scores with only each row's drawn token finite."""
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{scores.shape[0]} rows to sample for {len(self.generators)} seeds")
        probs = self.probabilities(scores)
        chosen = []
        for row, generator in enumerate(self.generators):
            u = torch.rand((), generator=generator, dtype=torch.float64)
            cdf = probs[row].double().cumsum(dim=0)
            index = int(torch.searchsorted(cdf, u * cdf[-1], right=True).clamp(max=probs.shape[-1] - 1))
            while probs[row, index] == 0:  # u fell on the end of the support: the last possible token
                index -= 1
            chosen.append(index)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(chosen)), torch.tensor(chosen, device=scores.device)] = 0.0
        return out


@torch.no_grad()
def sample_group(model: Any, prompt_ids: list[int], seeds: list[int], max_new_tokens: int, temperature: float,
                 top_p: float, pad_id: int, eos_id: Any, synced: bool, device: Any) -> list[list[int]]:
    """len(seeds) completions of one prompt (one row each, no padding: the rows' numbers do not depend on other
    prompts), as token ids up to and including EOS."""
    from transformers import LogitsProcessorList

    input_ids = torch.tensor([prompt_ids] * len(seeds), device=device)
    sampler = SeededSampler(seeds, temperature, top_p)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         logits_processor=LogitsProcessorList([sampler]), pad_token_id=pad_id, eos_token_id=eos_id,
                         synced_gpus=synced, use_cache=True)
    completions = []
    eos = set(eos_id if isinstance(eos_id, (list, tuple)) else [eos_id])
    for row in out[:, len(prompt_ids):].tolist():
        ids = []
        for token in row:
            ids.append(token)
            if token in eos:
                break
        completions.append(ids)
    return completions
