"""Several LoRA adapters merged into one model: their exact deltas (scale x B @ A per module, lora.py) combined by a
recipe, one base tensor at a time, inside the same out-of-core merge plan as a single adapter (merge.py).

With task vectors d_i (adapter i's fp32 delta for this tensor, 0 where it does not adapt it), weights w_i, densities
rho_i and lambda:

- `linear`: sum_i w_i d_i / sum_i w_i, a weighted average of the merged models (mergekit's `linear`,
  normalize on).
- `task_arithmetic`: lambda * sum_i w_i d_i (Ilharco et al. 2023, arXiv 2212.04089; mergekit's, normalize off).
- `ties` (Yadav et al. 2023, arXiv 2306.01708): trim each d_i to its rho_i share of largest magnitudes
  (k = int(rho_i * numel)), elect each element's sign from sum_i w_i t_i (>= 0: +), keep the weighted values that
  agree with it, and divide by the weights that agree (the disjoint mean; 1 where none does); times lambda.
  mergekit's `ties`: magnitude trim, sum consensus, normalize on.
- `dare_linear` (Yu et al. 2024, arXiv 2311.03099): drop each element of d_i with probability 1 - rho_i and rescale
  the rest by 1 / rho_i; lambda * sum_i w_i t_i (normalize off).
- `dare_ties`: DARE's drop and rescale, then TIES's sign election; lambda * the agreeing weighted sum (normalize
  off, as mergekit's `dare_ties`).

DARE's masks are drawn from a generator seeded by (seed, tensor name, adapter index), so the merge does not depend
on the order the base's shards are read in. The base weight is added last: merged = base + combined delta, in fp32.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from ftcore.export.lora import Adapter, AdapterError

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
TIES_SIGNS = ("ties", "dare_ties")
DARE = ("dare_linear", "dare_ties")


@dataclass
class MergeRecipe:
    """How the adapters combine: the method, one weight and one density per adapter, lambda, DARE's seed."""

    method: str
    weights: list[float]
    densities: list[float]
    lambda_: float = 1.0
    seed: int = 0

    def check(self, count: int) -> None:
        """Refuse what the methods cannot take, naming the option."""
        if self.method not in METHODS:
            raise AdapterError(f"--merge {self.method}: expected one of {', '.join(METHODS)}")
        for option, values in (("--weight", self.weights), ("--density", self.densities)):
            if len(values) != count:
                raise AdapterError(f"{option}: {len(values)} values for {count} adapters (give one per --adapter, "
                                   "or one for all)")
        if any(not 0 < d <= 1 for d in self.densities):
            raise AdapterError(f"--density {self.densities}: each must be in (0, 1]")
        if self.method == "linear" and abs(sum(self.weights)) < 1e-8:
            raise AdapterError(f"--weight {self.weights}: a linear merge divides by their sum, which is 0")

    def record(self) -> dict:
        """The recipe as the export's metadata records it."""
        out = asdict(self)
        out["lambda"] = out.pop("lambda_")
        return out


@dataclass
class AdapterMerge:
    """Adapters combined by a recipe, read by the merge plan as one adapter: targets(), pairs (for the counts),
    replacements (none: a whole-tensor replacement has no delta to combine), apply(name, base)."""

    adapters: list[Adapter]
    recipe: MergeRecipe
    names: list[str]  # where each adapter came from (its directory), for messages and the metadata
    pairs: dict = field(init=False)
    replacements: dict = field(init=False)

    def __post_init__(self) -> None:
        self.recipe.check(len(self.adapters))
        first = self.adapters[0]
        for adapter, name in zip(self.adapters[1:], self.names[1:]):
            if set(adapter.pairs) != set(first.pairs):
                extra = sorted(set(adapter.pairs) ^ set(first.pairs))[:3]
                raise AdapterError(f"{name} and {self.names[0]} adapt different modules (e.g. {', '.join(extra)}); "
                                   "adapters merged together must target the same modules")
        for adapter, name in zip(self.adapters, self.names):
            if adapter.replacements:
                raise AdapterError(f"{name} replaces whole tensors ({', '.join(sorted(adapter.replacements)[:3])}, "
                                   "modules_to_save): a multi-adapter merge combines LoRA deltas only")
        self.pairs = dict(first.pairs)
        self.replacements = {}

    def targets(self) -> set[str]:
        """The base tensors every adapter changes."""
        return set(self.pairs)

    def apply(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """base + the combined delta of tensor `name`, in fp32 (other names unchanged)."""
        if name not in self.pairs:
            return base
        deltas = [adapter.pairs[name].delta() for adapter in self.adapters]
        return base.float() + combine(deltas, self.recipe, name)


def combine(deltas: list[torch.Tensor], recipe: MergeRecipe, name: str) -> torch.Tensor:
    """The combined delta of one tensor (module docstring)."""
    method = recipe.method
    weights = torch.tensor(recipe.weights, dtype=torch.float32)
    if method in DARE:
        deltas = [_drop_and_rescale(d, rho, _generator(recipe.seed, name, i))
                  for i, (d, rho) in enumerate(zip(deltas, recipe.densities))]
    elif method == "ties":
        deltas = [_trim(d, rho) for d, rho in zip(deltas, recipe.densities)]
    stacked = torch.stack(deltas)
    w = weights.view(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * w
    if method == "linear":
        return weighted.sum(0) / weights.sum()
    if method in TIES_SIGNS:
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        agrees = (torch.sign(weighted) == elected).to(weighted.dtype)
        mixed = (weighted * agrees).sum(0)
        if method == "ties":  # the disjoint mean: divided by the weights that agree
            divisor = (w * agrees).sum(0)
            mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
        return mixed * recipe.lambda_
    return weighted.sum(0) * recipe.lambda_  # task_arithmetic, dare_linear


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim: the int(density * numel) largest magnitudes kept, the rest 0 (found by selection, not a sort:
    linear time; magnitudes equal to the k-th are all kept)."""
    if density >= 1:
        return delta
    keep = int(density * delta.numel())
    if keep == 0:
        return torch.zeros_like(delta)
    magnitude = delta.abs()
    threshold = torch.kthvalue(magnitude.reshape(-1), delta.numel() - keep + 1).values
    return torch.where(magnitude >= threshold, delta, 0.0)


def _drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each element kept with probability `density` and divided by it."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    return torch.where(keep, delta / density, 0.0)


def _generator(seed: int, name: str, index: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\0{name}\0{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def expand(values: Optional[list[float]], count: int, default: float) -> list[float]:
    """One value per adapter: none given -> the default for each; one -> the same for each; else as given."""
    if not values:
        return [default] * count
    return list(values) * count if len(values) == 1 else list(values)
