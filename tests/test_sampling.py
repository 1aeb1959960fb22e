"""Seeded rollout sampling: each completion's tokens come from its own generator, so a completion does not depend
on which other completions share its batch, and the sampler draws from the temperature / top-p distribution it
says it does."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftcore.sampling import SeededSampler, completion_seed, sample_group


@pytest.fixture(scope="module")
def model_and_tokenizer(builtin_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(builtin_model_dir)


def completions(model, tok, prompt: str, generations: list[int], seed: int = 5, temperature: float = 1.0,
                top_p: float = 1.0, step: int = 3) -> list[list[int]]:
    ids = tok(prompt).input_ids
    seeds = [completion_seed(seed, step, "data/rl.jsonl:7", g) for g in generations]
    return sample_group(model, ids, seeds, max_new_tokens=12, temperature=temperature, top_p=top_p,
                        pad_id=tok.pad_token_id or 0, eos_id=tok.eos_token_id, synced=False, device="cpu")


def test_a_completion_is_the_same_in_any_batch(model_and_tokenizer):
    """Generations 0..3 of a prompt in one batch of 4, in two batches of 2, and one by one: the same tokens (as
    on one rank, on two, or resumed); another step or seed samples differently."""
    model, tok = model_and_tokenizer
    whole = completions(model, tok, "Repeat: red cat", [0, 1, 2, 3])
    assert completions(model, tok, "Repeat: red cat", [0, 1]) + completions(model, tok, "Repeat: red cat",
                                                                              [2, 3]) == whole
    assert [completions(model, tok, "Repeat: red cat", [g])[0] for g in (3, 0)] == [whole[3], whole[0]]
    assert len({tuple(c) for c in whole}) > 1  # a random tiny model at temperature 1: the rows differ
    assert completions(model, tok, "Repeat: red cat", [0, 1, 2, 3], step=4) != whole
    assert completions(model, tok, "Repeat: red cat", [0, 1, 2, 3], seed=6) != whole


def test_a_tiny_nucleus_is_greedy(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = tok("Say: stone river").input_ids
    greedy = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                            pad_token_id=tok.pad_token_id or 0, eos_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    got = completions(model, tok, "Say: stone river", [0, 1], top_p=1e-6)
    for row in got:
        assert row == greedy[:len(row)] and (len(row) == len(greedy) or row[-1] == tok.eos_token_id)


def test_draws_follow_the_temperature_and_nucleus_distribution():
    """Over 4000 rows of one distribution: never a token outside the nucleus, frequencies within 4 sigma."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    sampler = SeededSampler([completion_seed(1, 0, "p", g) for g in range(4000)], temperature=0.7, top_p=0.9)
    want = torch.softmax(logits / 0.7, dim=-1)[0]
    nucleus = 3 if want[:2].sum() < 0.9 else 2  # the fewest most-likely tokens reaching 0.9
    want = torch.cat([want[:nucleus] / want[:nucleus].sum(), torch.zeros(5 - nucleus)])
    drawn = sampler(None, logits.expand(4000, 5)).argmax(dim=-1)
    freq = torch.bincount(drawn, minlength=5).double() / 4000
    assert (freq[nucleus:] == 0).all()
    sigma = (want * (1 - want) / 4000).sqrt()
    assert ((freq - want).abs() <= 4 * sigma + 1e-12).all(), (freq, want)
    with pytest.raises(ValueError, match="temperature > 0"):
        SeededSampler([1], temperature=0)
