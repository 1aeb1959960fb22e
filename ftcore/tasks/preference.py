"""Task preference: chosen vs rejected responses to one prompt (format preference, {prompt, chosen, rejected});
the objective is preference.loss (DPO, IPO, hinge, SimPO, ORPO; ftcore/losses/preference.py) on sequence log-probs
from the chunked head, the step loss the mean over the step's pairs. A pair is two rows of one forward, the chosen
block then the rejected block. Eval: the pairs' mean loss, reward accuracy and margin, rewards and log-probs.

Imports without torch (ftcore/tasks/__init__.py says why): the engines are imported where a method runs."""

from __future__ import annotations

from typing import Any, Optional

from ftcore.config import Config, FieldError
from ftcore.tasks.base import EvalRun, ObjectiveSetup, Task, data_sources, summed_eval_terms, token_row


class Preference(Task):
    """Pairs: two rows per example, the loss a mean over pairs."""

    formats = ("preference",)
    selected_by = "task: preference"
    record_shape = "{prompt, chosen, rejected}"
    rows_per_example = 2
    truncates_itself = True  # the prompt loses tokens first, both responses follow the same prompt tokens

    def check_config(self, cfg: Config) -> None:
        """Its format for preference.loss, and what this release does not cover, refused by name."""
        data, loss_cfg, loss = cfg.data, cfg.loss, cfg.preference.loss
        wanted = self.formats[0]
        for where, source in data_sources(cfg):
            if source.format != wanted:
                raise FieldError(f"{where}.format", f"preference.loss={loss} reads format {wanted} "
                                 f"({self.record_shape} records); {source.path} is {source.format}")
        refused = [("data.packing", data.packing, "pairs are right-padded, chosen and rejected in one batch"),
                   ("data.train_on", data.train_on is not None, "the responses train, the prompt never"),
                   ("loss.base_kl", loss_cfg.base_kl > 0, "the preference loss has its own reference term"),
                   ("loss.impl", loss_cfg.impl in ("full", "fused"), "every preference log-prob goes through "
                    "the chunked loss (no [tokens x vocab] logits); use auto or chunked")]
        for name, bad, why in refused:
            if bad:
                raise FieldError(name, f"does not apply to task preference: {why}")
        super().check_config(cfg)

    def needs_reference(self, cfg: Config) -> bool:
        """dpo, ipo, hinge and kto compare with a reference; simpo and orpo have none."""
        from ftcore.losses.preference import NEEDS_REFERENCE

        return cfg.preference.loss in NEEDS_REFERENCE

    def tokenize(self, record: Any, spec: Any, tokenizer: Any, max_seq_len: int) -> Any:
        """A Pair (ftcore/data/preference.py), truncated by its own rule."""
        from ftcore.data.preference import tokenize_pair

        return tokenize_pair(record, spec, tokenizer, max_seq_len)

    def collate(self, samples: list, sample_ids: list[str], collation: Any,
                next_samples: Optional[list] = None) -> Any:
        """Rows [chosen_1..chosen_B, rejected_1..rejected_B]: one forward for both responses."""
        from ftcore.data.preference import collate_pairs

        return collate_pairs(samples, collation.pad_id, sample_ids)

    def filler_batch(self, pad_id: int) -> Any:
        """A pair of padding rows, neither with a response token (no pair to the loss)."""
        from ftcore.data.batch import collate, filler_sample

        batch = collate([filler_sample(pad_id)] * 2, pad_id, [])
        batch.examples, batch.blocks = 1, 2
        return batch

    def describe(self, batch: Any, data_cfg: Any) -> list[tuple[str, list[int], list[int], int]]:
        """The pair's chosen row, then its rejected row."""
        return [(f" ({name})", *token_row(batch, row)) for row, name in enumerate(("chosen", "rejected"))]

    def normaliser(self, cfg: Config, examples: float, trained_tokens: float) -> int:
        """The step's pairs (KTO: samples) over every rank: the loss is their mean."""
        return max(int(examples), 1)

    def build_objective(self, setup: ObjectiveSetup) -> tuple[Any, str]:
        """preference.loss (_loss) on log-probs from the chunked head, whose logit transform choose_loss_impl
        settles on a probe first (every rank runs it)."""
        from ftcore.losses.head import choose_loss_impl

        _, transform, words = choose_loss_impl("chunked", setup.chunk_tokens, 0.0, setup.engine,
                                               setup.unwrap(setup.engine), setup.cuda, probe_rows=setup.probe_rows)
        p = setup.cfg.preference
        return self._loss(setup, transform), f"{p.loss} (beta {p.beta:g}), log-probs {words}"

    def _loss(self, setup: ObjectiveSetup, transform: Any) -> Any:
        """The objective on the pairs' sequence log-probs."""
        from ftcore.losses.preference import PreferenceLoss

        return PreferenceLoss(setup.cfg.preference, setup.unwrap, setup.chunk_tokens, transform, setup.reference,
                              setup.sequence)

    def evaluate(self, run: EvalRun) -> dict:
        """Means over the eval pairs: eval_loss, eval_reward_accuracy, eval_reward_margin, eval_rewards_chosen /
        _rejected, eval_logps_chosen / _rejected, and eval_pairs."""
        return summed_eval_terms(run)

    def eval_line(self, metrics: dict, run_dir: Any) -> str:
        """Loss, reward accuracy and margin, over the pairs."""
        return f"{self._reward_line(metrics)}({metrics['eval_pairs']} pairs)"

    @staticmethod
    def _reward_line(metrics: dict) -> str:
        margin = metrics.get("eval_reward_margin")  # (KTO: a margin needs both kinds of samples)
        return (f"eval loss {metrics['eval_loss']:.4f} reward accuracy {metrics['eval_reward_accuracy']:.4f} "
                + (f"margin {margin:.4f} " if margin is not None else ""))
