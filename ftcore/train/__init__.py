"""The fine-tuning recipe: full, freeze or LoRA/QLoRA fine-tuning of a causal LM (or a classifier) on accelerate +
DeepSpeed ZeRO 0-3.

Features
    - Full fine-tuning or LoRA (peft) on every linear layer or chosen modules.
    - DeepSpeed ZeRO 0/1/2/3 with optional CPU offload; the DeepSpeed config is derived from this run's typed
      config (ftcore/ds_config.py), never written by hand.
    - Non-reentrant gradient checkpointing (works with LoRA: input grads are enabled).
    - Cosine schedule with linear warmup, AdamW, gradient clipping, gradient accumulation.
    - Loss normalised by the number of trained tokens in the whole optimizer step (all micro batches, all ranks),
      so accumulation and data parallelism give the same gradient as one big batch.
    - Eval loss and perplexity every evaluation.every steps and at the end.
    - Checkpoints every checkpoint.every_steps and at the end; automatic resume from output_dir.

Effective batch (samples per optimizer step)
    train.micro_batch_size * train.grad_accum_steps * world_size

Resume
    A run restarted with the same output_dir resumes from the newest complete checkpoint (`--resume PATH` picks
    one, `--resume none` starts fresh). Engine state (weights, optimizer, scheduler), step, every rank's data
    position and RNG are restored, so at the same world size the resumed losses equal the uninterrupted ones.
    A checkpoint written under a different config or world size is refused with the differences listed
    (ftcore/resume.py).

Commands
    workstation, 2 processes:   ft launch examples/demo.yaml --nproc 2
    already-started processes:  ft train examples/demo.yaml          (plain python, torchrun, accelerate launch)
    override any field:         ft launch cfg.yaml --nproc 8 --set optimizer.lr=1e-4 --set distributed.zero_stage=3

Files: recipe.py (the recipe, top to bottom), runtime.py, evaluation.py, reporting.py, audit.py, outputs.py,
state.py, optim.py, sequence_parallel.py. What is trained is the run's task (ftcore/tasks/), whose objective
comes from ftcore/losses/; TrainError is ftcore/errors.py.
"""

from __future__ import annotations

from ftcore.config import Config
from ftcore.errors import TrainError
from ftcore.train.recipe import Recipe
from ftcore.train.runtime import leave_world

__all__ = ["Recipe", "TrainError", "run"]


def run(cfg: Config, resume: str = "auto") -> None:
    """Train `cfg` in this process (one rank of the world its launcher set up); the process group is torn down
    at the end, also on an error."""
    recipe = Recipe(cfg, resume=resume)
    error: BaseException | None = None
    try:
        recipe.setup()
        recipe.train()
    except BaseException as e:
        error = e
        raise
    finally:
        recipe.close(error)
        leave_world()
