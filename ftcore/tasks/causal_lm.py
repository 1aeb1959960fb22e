"""Task causal_lm: next-token training of a causal LM on chat, alpaca, text or prompt/completion records; the loss
per trained token (optionally + loss.base_kl's KL to the base model), eval loss and perplexity, and answers
generated from the eval prompts (evaluation.generate).

Imports without torch (ftcore/tasks/__init__.py says why): the engines are imported where a method runs."""

from __future__ import annotations

from typing import Any

from ftcore.config import Config, FieldError
from ftcore.tasks import BUILTIN, load_task
from ftcore.tasks.base import ObjectiveSetup, Task, data_sources


class CausalLM(Task):
    """Next-token cross-entropy per trained token over the whole effective batch."""

    formats = ("chat", "alpaca", "text", "prompt_completion")
    selected_by = "task: causal_lm"
    generates = True

    def check_config(self, cfg: Config) -> None:
        """Its formats (another task's format names the task that reads it); data.labels is classification's."""
        super().check_config(cfg)
        for where, source in data_sources(cfg):
            if source.format not in self.formats:
                owner = next((load_task(name) for name in BUILTIN if source.format in load_task(name).formats), None)
                needs = owner.selected_by if owner is not None else "another task"
                raise FieldError(f"{where}.format", f"format {source.format} needs {needs}")
        if cfg.data.labels is not None:
            raise FieldError("data.labels", "applies to task classification only")

    def build_objective(self, setup: ObjectiveSetup) -> tuple[Any, str]:
        """loss.impl as choose_loss_impl settles it (auto/chunked/fused checked on a probe first), with the
        base-KL term when loss.base_kl is set."""
        from ftcore.losses.head import choose_loss_impl
        from ftcore.losses.objective import causal_lm_objective

        loss = setup.cfg.loss
        impl, transform, words = choose_loss_impl(loss.impl, setup.chunk_tokens, loss.base_kl, setup.engine,
                                                  setup.unwrap(setup.engine), setup.cuda,
                                                  probe_rows=setup.probe_rows)
        return causal_lm_objective(loss, setup.unwrap, setup.reference, impl, transform, setup.chunk_tokens), words

    def eval_line(self, metrics: dict, run_dir: Any) -> str:
        """Loss per trained token and perplexity."""
        return f"eval loss {metrics['eval_loss']:.4f} ppl {metrics['eval_ppl']:.2f}"
