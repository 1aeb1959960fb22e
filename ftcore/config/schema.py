"""The one typed config tree. Every field a user can set is defined here, and only here.

Precedence (highest first): ``--set a.b=c`` on the command line > the YAML file > the defaults below.
Unknown keys and bad values are errors that name the field (and the YAML line when it came from the file).
Relative paths are taken relative to the working directory the command runs in.

Each component receives only its own section: ``build_model(cfg.model, cfg.adapter)``,
``build_ds_config(cfg.train, cfg.optimizer, cfg.distributed, cfg.model.dtype)``, and so on.
"""

from __future__ import annotations

import re
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from ftcore.tasks import load_task, task_for

BUILTIN_PREFIX = "builtin:"


class ConfigError(ValueError):
    """A config problem as one line naming the field (and the YAML line or --set that gave it, when known). The
    command line prints it labelled "config error:" by its type; `field` is the dotted field at fault (the first
    one, when several are), None when the problem is the file or the command itself."""

    label = "config error"  # how the command line labels the line

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated, field docstrings are the docs."""
    # Unknown keys are errors (a typo must never silently become a default); assignments are validated too.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(Section):
    """model: which base model, in which dtype and attention implementation."""
    name_or_path: str = "builtin:tiny-llama"
    """HF model directory, hub id, or `builtin:tiny-llama` (a tiny Llama built from a config shipped in the repo)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the weights are loaded and trained in (mixed precision keeps fp32 master weights in DeepSpeed)."""
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    """auto = the best the model's class supports: flash_attention_2 on CUDA when flash-attn is installed, else sdpa,
    else eager (e.g. Gemma-2); the choice is printed. An explicit choice the model does not support is an error."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant; works with LoRA). Trades ~30% compute for memory."""

    @property
    def mixed_precision(self) -> str:
        """accelerate's name for this dtype's precision mode."""
        return {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[self.dtype]


class AdapterConfig(Section):
    """adapter: what trains (full, LoRA, QLoRA or chosen weights) and the LoRA settings."""
    method: Literal["full", "lora", "qlora", "freeze"] = "lora"
    """full = every weight trains; lora = low-rank adapters (peft); qlora = lora on a 4-bit NF4 base; freeze = only
    the weights chosen by adapter.trainable / adapter.top_layers train, the rest stay frozen."""
    r: int = Field(16, gt=0)
    """LoRA rank."""
    alpha: float = Field(32.0, gt=0)
    """LoRA alpha; the update is scaled by alpha / r."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    """Module names (or suffixes) that get adapters; all-linear = every linear layer except the output head."""
    trainable: list[str] = Field(default_factory=list)
    """freeze: parameter names or regular expressions (re.search) that train, e.g. ['lm_head', 'layers\\.3\\.']."""
    top_layers: Optional[int] = Field(None, gt=0)
    """freeze: train the last N transformer blocks and everything above them (final norm, output head)."""
    moe_experts: bool = False
    """Mixture-of-experts models (mixtral, qwen3_moe, ...): also put LoRA on the experts' fused weights (peft
    target_parameters; needs adapter.dropout=0). Default: attention and dense layers only (ft export merges those
    exactly; expert LoRA is refused by ft export and merges with PEFT)."""
    moe_router: bool = False
    """Mixture-of-experts models: also adapt the router (gate). Default off: the routing stays the base model's."""
    quant_storage: Literal["auto", "uint8", "float32", "bfloat16", "float16"] = "auto"
    """qlora: dtype the packed 4-bit weights are stored in. auto = model.dtype under ZeRO-3 (so ZeRO-3 partitions
    them), else uint8."""


class FieldNames(Section):
    """Where each format finds its fields in a record (defaults: the usual names)."""

    messages: str = "messages"
    """chat: the list of turns."""
    role: str = "role"
    """chat: a turn's role key."""
    content: str = "content"
    """chat: a turn's text key."""
    instruction: str = "instruction"
    """alpaca: the instruction."""
    input: str = "input"
    """alpaca: the optional input appended to the instruction."""
    output: str = "output"
    """alpaca: the answer (trained)."""
    prompt: str = "prompt"
    """prompt_completion, preference, kto: the prompt (not trained)."""
    completion: str = "completion"
    """prompt_completion, kto: the completion (trained)."""
    text: str = "text"
    """text and classification: the raw text."""
    label: str = "label"
    """classification: the class, as a name from data.labels or an id (0-based integer); kto: true when the
    completion is desirable, false when not."""
    chosen: str = "chosen"
    """preference: the preferred response (text, or a list of chat turns)."""
    rejected: str = "rejected"
    """preference: the dispreferred response (text, or a list of chat turns)."""


class DataSource(Section):
    """One data source: where it is, its record format and fields, and its sampling weight."""
    path: str
    """JSONL (.jsonl/.json, or .jsonl.gz), Parquet (.parquet), plain text (.txt/.md, optionally .gz), a directory
    of those, a glob (`corpus/*.jsonl.gz`), or a directory written by HF datasets' save_to_disk."""
    format: Literal["chat", "alpaca", "text", "prompt_completion", "classification", "preference", "kto"] = "chat"
    """chat: {"messages": [{"role", "content"}...]}; alpaca: instruction/input/output; text: {"text": ...};
    prompt_completion: {"prompt", "completion"} concatenated as raw text; classification: {"text", "label"} (for
    task classification); preference: {"prompt", "chosen", "rejected"}, each plain text or chat turns (for task
    preference); kto: {"prompt", "completion", "label": true|false}, prompt and completion plain text or chat turns
    (for task preference with preference.loss=kto). Plain text files are format text."""
    weight: float = Field(1.0, gt=0)
    """Share of this source in the training mix (weights are normalised over data.train); a source is repeated or
    subsampled, each in its own seeded order, to meet its share."""
    fields: FieldNames = Field(default_factory=FieldNames)
    """Field names in this source's records, e.g. {messages: conversations, role: from, content: value}."""
    roles: dict[str, str] = Field(default_factory=dict)
    """Rename roles to system/user/assistant/tool, e.g. {human: user, gpt: assistant}."""
    text_unit: Literal["document", "paragraph", "line"] = "document"
    """Plain text files: one sample per file, per blank-line-separated paragraph, or per non-empty line."""
    split: str = "train"
    """For a save_to_disk DatasetDict: which split to read."""


class DataConfig(Section):
    """data: sources, sequence length, loss masks, packing, shuffling, malformed-record handling."""
    train: list[DataSource] = Field(default_factory=lambda: [DataSource(path="builtin:chat-demo")])
    """Training sources. `builtin:chat-demo` is the small chat set shipped in the repo."""
    eval: Optional[list[DataSource]] = None
    """Optional evaluation sources (loss and perplexity every evaluation.every steps)."""
    max_seq_len: int = Field(512, gt=8)
    """Longest sample (and packed row) in tokens; longer samples are handled by data.overflow."""
    train_on: Optional[Literal["assistant", "last_assistant", "completion", "all"]] = None
    """Which tokens carry loss. Default by format: chat -> assistant, alpaca/prompt_completion -> completion,
    text -> all."""
    overflow: Literal["truncate", "drop", "split"] = "truncate"
    """Samples longer than max_seq_len: cut at max_seq_len, skip them, or (format text only) split into chunks."""
    packing: bool = False
    """Pack several samples into each row of max_seq_len; samples never attend to each other."""
    packing_buffer: int = Field(512, ge=1)
    """Samples held to choose a best fit from when packing (bounded memory)."""
    shuffle: bool = True
    """Shuffle the sample order each epoch (deterministically from train.seed)."""
    on_error: Literal["raise", "skip"] = "raise"
    """A malformed record: stop with file:line and the reason, or skip it (counted and reported)."""
    labels: Optional[list[str]] = None
    """task classification: the class names, in id order (an integer label i means labels[i]). Default: every label
    found in data.train and data.eval, sorted (integer labels: 0..max). Recorded in the model config (id2label)."""
    audit: bool = False
    """Write output_dir/audit/rank{R}.jsonl: the ids (file:line or file:row) of the samples each rank trained on
    at each step, with the loss."""

    @model_validator(mode="after")
    def _check_overflow(self) -> "DataConfig":
        if self.overflow == "split":
            bad = [s.path for s in self.train if s.format != "text"]
            if bad:
                raise _field_error("data.overflow", f"'split' applies to format text only; {bad[0]} is not text "
                                   "(use truncate or drop)")
        return self


class TrainConfig(Section):
    """train: the run's length, batch and seed (the optimizer, loss, evaluation and logging have their sections)."""
    micro_batch_size: int = Field(1, gt=0)
    """Samples per forward pass per process."""
    grad_accum_steps: int = Field(1, gt=0)
    """Micro batches per optimizer step. Effective batch = micro_batch_size * grad_accum_steps * world size."""
    max_steps: int = Field(100, gt=0)
    """Optimizer steps in the run; the learning-rate schedule spans exactly this many."""
    seed: int = 42
    """Seeds model init of new modules, dropout and the data order."""
    effective_batch_size: Optional[int] = Field(None, gt=0)
    """Optional check: the samples per optimizer step this run must have (micro_batch_size * grad_accum_steps *
    processes); a launch with another process count fails with the grad_accum_steps that would keep it."""
    stop_at_step: Optional[int] = Field(None, gt=0)
    """Stop after this step with a checkpoint, keeping the max_steps schedule (for time-sliced jobs)."""


class OptimizerConfig(Section):
    """optimizer: AdamW, its learning-rate schedule and gradient clipping."""
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps, then cosine decay to 0 at max_steps."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Gradient clipping by global norm (0 = off)."""
    layer_lr_decay: Optional[float] = Field(None, gt=0, le=1)
    """Layer-wise learning-rate decay: block i of L trains at lr * decay^(L-1-i) (the top block at lr); weights
    below the blocks (embeddings) at lr * decay^L, weights above them (final norm, head) at lr."""


class LossConfig(Section):
    """loss: how the causal-LM loss is computed (loss.impl and its chunks), and the base-KL term."""
    impl: Literal["auto", "chunked", "fused", "full"] = "auto"
    """How the causal-LM loss is computed. chunked = the output projection, the family's logit transform,
    log-softmax and loss (and loss.base_kl's KL) over loss.chunk_tokens tokens at a time, so the
    [tokens x vocab] logits never exist at once: the same loss and gradients to fp32 rounding, on ZeRO 0-3 with
    LoRA (on the head too), QLoRA, full, freeze. fused = liger-kernel's fused linear cross-entropy (CUDA, the
    `fused` extra; not with base_kl or LoRA on the head). full = by the model, from its whole logits. auto = fused
    where it can run, else chunked (full for classification, or a head chunked cannot reproduce, said in the log)."""
    chunk_tokens: Optional[int] = Field(None, gt=0)
    """Tokens per chunk of loss.impl=chunked: peak loss memory is about this x vocab x 8 bytes (x 16 with
    loss.base_kl). Default: sized by bytes for the model's vocabulary, see loss.chunk_mb."""
    chunk_mb: float = Field(256, gt=0)
    """When loss.chunk_tokens is not set, each chunk holds as many tokens as fit this many MiB of fp32
    logits: 2048 tokens for a 32,768-row vocabulary (2097 for Llama-2's 32,000), 256 for Gemma-3's 262,144 (a
    fixed 2048 would be 8x the bytes there)."""
    base_kl: float = Field(0.0, ge=0)
    """Keep the base model's abilities: adds base_kl * KL(base || fine-tuned) per trained token to the loss. LoRA/QLoRA
    take the base logits from the same model with the adapter disabled; full/freeze keep a frozen reference copy
    (one more model per GPU; under ZeRO-3 partitioned like the model, 1/world of it per GPU)."""

    def tokens_per_chunk(self, vocab: int) -> int:
        """Tokens per chunk of the chunked loss for a vocabulary of `vocab` rows."""
        if self.chunk_tokens is not None:
            return self.chunk_tokens
        return max(1, int(self.chunk_mb * (1 << 20)) // (vocab * 4))


class RewardConfig(Section):
    """One reward rule of task rl (ftcore/rewards/)."""
    function: str
    """A built-in (exact_answer, numeric_answer, regex, char_share, length, overlong: ftcore/rewards/builtin.py) or
    your own function as package.module:function, called with the batch by keyword (prompts, completions,
    references, records, completion_tokens) and its args, returning one number per completion (None: no
    reward)."""
    weight: float = 1.0
    """Its weight in a completion's total reward (the sum over the rules)."""
    args: dict = Field(default_factory=dict)
    """Keyword arguments it is called with (regex: pattern; numeric_answer: extract, tolerance; ...)."""
    name: Optional[str] = None
    """What the metrics call it (default: the function's name)."""


class EvaluationConfig(Section):
    """evaluation: when the run evaluates on data.eval, and whether it also scores generated answers."""
    every: int = Field(0, ge=0)
    """Evaluate every N steps (0 = only at the end). Needs data.eval."""
    generate: list[Literal["exact_match", "accuracy", "contains", "rouge_l"]] = Field(default_factory=list)
    """At each eval, also answer data.eval's prompts by greedy generation and score the answers with these metrics
    (ftcore/evaluation/scoring.py; logged as eval_gen_<metric>, every answer in
    output_dir/eval/generate-stepN.jsonl), as `ft eval` does. Chat/alpaca/prompt_completion eval data; task
    causal_lm."""
    rewards: list[RewardConfig] = Field(default_factory=list)
    """Also score the generated answers with these reward rules (as task rl's rewards; logged as eval_gen_reward
    and eval_gen_reward_<rule>, the mean over the answers that got one); answers are generated when this or
    evaluation.generate is set."""
    max_new_tokens: int = Field(64, gt=0)
    """Longest answer evaluation.generate generates, in tokens."""

    @property
    def generates(self) -> bool:
        """Does an eval answer data.eval's prompts by generation (evaluation.generate or evaluation.rewards)?"""
        return bool(self.generate or self.rewards)

    @field_validator("generate", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


class LoggingConfig(Section):
    """logging: the log line, where metrics go besides metrics.jsonl, and the peak FLOP/s MFU is measured against."""
    every: int = Field(1, gt=0)
    """Print a log line every N steps (rank 0)."""
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "none"]] = Field(default_factory=lambda: ["tensorboard"])
    """Where step metrics go besides metrics.jsonl, one name or a list: tensorboard (event files in output_dir/tb/),
    mlflow, wandb (the tracking section), or none. One tracker run per training run, continued by every resume."""
    peak_tflops: Optional[float] = Field(None, gt=0)
    """Peak dense TFLOP/s of one device for MFU; default: looked up from the GPU's name (none on CPU)."""

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _none_alone(cls, value: list[str]) -> list[str]:
        if "none" in value and len(value) > 1:
            raise ValueError(f"none cannot be combined with other trackers (got {value})")
        return [] if value == ["none"] else list(dict.fromkeys(value))


# Fields that moved out of the train section (old dotted name -> new). A config that uses an old name still loads
# for one release (ftcore/config/loading.py rewrites it and the command line says so).
MOVED_FIELDS = {
    "train.loss_chunk_tokens": "loss.chunk_tokens",
    "train.loss_chunk_mb": "loss.chunk_mb",
    "train.eval_max_new_tokens": "evaluation.max_new_tokens",
    "train.lr": "optimizer.lr",
    "train.weight_decay": "optimizer.weight_decay",
    "train.warmup_steps": "optimizer.warmup_steps",
    "train.max_grad_norm": "optimizer.max_grad_norm",
    "train.layer_lr_decay": "optimizer.layer_lr_decay",
    "train.loss_impl": "loss.impl",
    "train.base_kl": "loss.base_kl",
    "train.eval_every": "evaluation.every",
    "train.eval_generate": "evaluation.generate",
    "train.log_every": "logging.every",
    "train.report_to": "logging.report_to",
    "train.peak_tflops": "logging.peak_tflops",
}


class PreferenceConfig(Section):
    """preference: the objective of task preference (chosen vs rejected responses to one prompt)."""
    loss: Literal["dpo", "ipo", "hinge", "simpo", "orpo", "kto"] = "dpo"
    """dpo = -log sigmoid(beta * margin) (arXiv 2305.18290), margin = (log pi - log ref)(chosen) - (same)(rejected);
    ipo = (margin - 1 / (2 beta))^2 (2310.12036); hinge = max(0, 1 - beta * margin) (SLiC); simpo = -log sigmoid(
    beta * (mean log pi(chosen) - mean log pi(rejected)) - simpo_gamma), no reference (2405.14734); orpo = the
    chosen response's NLL per token - orpo_lambda * log sigmoid(log odds ratio of the mean log-probs), no reference
    (2403.07691); kto = on format kto data (one completion, desirable or not), desirable: kto_desirable_weight *
    (1 - sigmoid(beta * (log pi - log ref - z))), undesirable: kto_undesirable_weight * (1 - sigmoid(beta * (z -
    log pi + log ref))), z = max(0, mean log pi - log ref of mismatched prompt/completion rows over the step), the
    mean over the step's samples (2402.01306). The reference (dpo/ipo/hinge/kto) is the same model with the adapter
    disabled (LoRA/QLoRA) or a frozen copy (full/freeze; under ZeRO-3 partitioned like the model)."""
    beta: float = Field(0.1, gt=0)
    """The inverse temperature of the reward: dpo/ipo/hinge 0.1 is usual; simpo's paper uses 2.0-2.5."""
    simpo_gamma: float = Field(1.0, ge=0)
    """SimPO's target reward margin gamma (the paper's gamma / beta of about 0.5 at beta 2)."""
    orpo_lambda: float = Field(0.1, ge=0)
    """ORPO's weight lambda of the odds-ratio term beside the chosen response's NLL."""
    kto_desirable_weight: float = Field(1.0, gt=0)
    """KTO's lambda_D, the weight of a desirable sample's loss; with unbalanced data the paper keeps
    desirable_weight x desirable samples / (undesirable_weight x undesirable samples) within 1 to 4/3."""
    kto_undesirable_weight: float = Field(1.0, gt=0)
    """KTO's lambda_U, the weight of an undesirable sample's loss."""


class RLConfig(Section):
    """rl: task rl, online RL from rule-based rewards (the GRPO family, ftcore/losses/grpo.py): each step's prompts
    (train.micro_batch_size per micro batch) are answered num_generations times by the policy as it is at that
    step, the answers scored by the rewards, and the policy moved toward the better ones of each group."""
    rewards: list[RewardConfig] = Field(default_factory=list)
    """The reward rules (at least one): a completion's reward is their weighted sum."""
    num_generations: int = Field(4, ge=2)
    """Completions per prompt (the group whose rewards are compared)."""
    max_new_tokens: int = Field(64, gt=0)
    """Longest completion; one that reaches it without EOS is truncated."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; the log-probs of the loss divide the logits by it too."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: the fewest most-likely tokens whose probabilities reach top_p."""
    epsilon: float = Field(0.2, gt=0)
    """The clip range below 1 of the importance ratio (1 - epsilon)."""
    epsilon_high: Optional[float] = Field(None, gt=0)
    """The clip range above 1 (1 + epsilon_high); default epsilon. DAPO's clip-higher: 0.28 with epsilon 0.2."""
    beta: float = Field(0.0, ge=0)
    """The weight of the k3 KL to the reference (the adapter disabled, or a frozen copy); 0 = no reference."""
    advantage_scale: Literal["group", "batch", "none"] = "group"
    """Rewards minus their group's mean, divided by the group's std (GRPO), the step's std, or nothing (Dr.
    GRPO)."""
    loss_normalisation: Literal["grpo", "dr_grpo", "dapo"] = "dapo"
    """grpo = mean over each completion's tokens, then over completions; dr_grpo = summed tokens / (completions x
    max_new_tokens); dapo = summed tokens / the step's completion tokens."""
    importance: Literal["token", "sequence"] = "token"
    """The importance ratio per token (GRPO) or per sequence (GSPO, with epsilons about 3e-4 / 4e-4)."""
    mask_truncated: bool = False
    """Truncated completions (no EOS within max_new_tokens) train nothing (DAPO's overlong filtering)."""
    num_iterations: int = Field(1, ge=1)
    """Optimizer steps per rollout batch: the step that generates it and num_iterations - 1 more on the same
    completions, the importance ratio taken to the policy that sampled them (its log-probs kept with the batch
    and in checkpoints)."""
    dynamic_sampling_draws: int = Field(0, ge=0)
    """DAPO's dynamic sampling: groups whose rewards are all equal (nothing to learn) are replaced by the groups of
    up to this many more micro batches of prompts per rollout and rank; a rollout still short trains dropped groups
    (advantage 0) in their place. 0 = off."""
    zero3_generation: Literal["auto", "gather", "layered"] = "auto"
    """Under ZeRO-3, how the policy's weights meet generation: gather the whole model on every rank for the
    rollout (fast; needs its full size in free memory), or fetch each layer for every token (slow, no extra
    memory). auto = gather when it fits with room for the KV cache, said in the log either way."""
    reward_workers: int = Field(2, gt=0)
    """Processes that run the reward functions (per rank)."""
    reward_timeout_s: float = Field(10.0, gt=0)
    """A reward call that takes longer is killed; its samples get no reward (masked, counted as timeouts)."""


class DistributedConfig(Section):
    """distributed: ZeRO stage, offload, backend and the hung-peer timeout."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage: 0 = data parallel, 1 = shard optimizer, 2 = + gradients, 3 = + parameters."""
    offload: Literal["none", "optimizer", "all"] = "none"
    """CPU offload: optimizer states (stage >= 1), or optimizer and parameters (stage 3)."""
    zero3_param_persistence_threshold: int = Field(100_000, ge=0)
    """ZeRO-3 keeps parameters smaller than this many elements whole on every rank."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend; auto = nccl on CUDA, gloo on CPU."""
    deepspeed_config: Optional[str] = None
    """A DeepSpeed JSON of your own (e.g. the HF-Trainer-style zero2/zero3 JSONs) used as the base of the run's
    DeepSpeed config instead of ds_configs/: its "auto" values are filled from this config, a setting it fixes is
    taken for the matching ft field when that field is not set here, and a contradiction is an error naming both.
    Its optimizer/scheduler sections must describe AdamW / a warmup schedule: ft's own (train.*) run them."""
    timeout_s: int = Field(1800, gt=0)
    """Watchdog for hung peers: a collective that waits longer than this fails the run with the reason, and the
    launcher stops every rank (about timeout_s + stop_grace_s after a peer hangs). Must exceed the longest checkpoint
    save."""
    stop_grace_s: int = Field(30, ge=1)
    """When a rank has failed (it recorded why), how long each node's `ft launch` lets its other ranks end before
    it kills them: a hung rank may not answer SIGTERM at all (torch elastic's own grace is a fixed 30 s), so this
    bounds how long a failed run takes to end. (A stop signal to `ft launch` is not this: the ranks checkpoint
    first, however long that takes.)"""
    sequence_parallel: int = Field(1, ge=1)
    """Ulysses sequence parallelism (DeepSpeed's UlyssesSPAttentionHF, arXiv 2506.13996): each sample's tokens are
    split over this many consecutive ranks, whose attention exchanges heads for sequence (all-to-all), so a rank
    holds 1/N of every activation; data parallelism runs over world / N groups and ZeRO shards over the whole
    world. 1 = off. N must divide the world size, the attention heads (KV heads: N divides them or they divide
    N) and data.max_seq_len; tasks causal_lm and preference, sdpa or flash_attention_2, the chunked or fused
    loss."""


class MlflowSettings(Section):
    """tracking.mlflow: where logging.report_to=mlflow logs."""
    tracking_uri: Optional[str] = None
    """Tracking server or store URI; default $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db."""
    experiment: Optional[str] = None
    """Experiment name (created when missing); default $MLFLOW_EXPERIMENT_NAME, else ft."""


class WandbSettings(Section):
    """tracking.wandb: where logging.report_to=wandb logs."""
    project: Optional[str] = None
    """W&B project; default $WANDB_PROJECT, else ft."""
    entity: Optional[str] = None
    """W&B entity (user or team); default $WANDB_ENTITY, else your default entity."""
    mode: Optional[Literal["online", "offline"]] = None
    """online, or offline (written under <dir>/wandb/, uploaded later with `wandb sync`); default $WANDB_MODE,
    else online."""
    dir: Optional[str] = None
    """Where W&B writes its run files; default $WANDB_DIR, else output_dir."""


class TrackingConfig(Section):
    """tracking: the experiment trackers of logging.report_to (MLflow, Weights & Biases)."""
    run_name: Optional[str] = None
    """The tracker run's display name; default output_dir's last part."""
    open_timeout_s: float = Field(60.0, ge=0)
    """Before the first step, how long rank 0 waits for each tracker to open its run, so that the run's id is in
    output_dir/trackers.json before anything can be lost (a kill -9 at any step then continues that run). A tracker
    that answers with an error does not hold training; one not open by then keeps being tried in the background.
    At most half of distributed.timeout_s (the other ranks wait for rank 0 meanwhile)."""
    finish_timeout_s: float = Field(120.0, ge=0)
    """At the end of an attempt, how long rank 0 waits for a tracker to take the last rows and artifacts; what it
    has not taken by then stays in metrics.jsonl and is sent by the next attempt."""
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    wandb: WandbSettings = Field(default_factory=WandbSettings)


class CheckpointConfig(Section):
    """checkpoint: how often to save and how many to keep."""
    every_steps: int = Field(0, ge=0)
    """Save a checkpoint every N steps (0 = only at the end). A final checkpoint is always written."""
    keep_last: int = Field(2, gt=0)
    """Keep this many most recent checkpoints; older ones are deleted after a newer one is complete."""


class Config(Section):
    """A whole run's configuration: the one typed tree every part reads its section of."""
    task: str = "causal_lm"
    """What is trained (ftcore/tasks/, one module per task): causal_lm = next-token training of a causal LM;
    classification = a sequence-classification head on it (AutoModelForSequenceClassification), cross-entropy on
    data.labels, eval accuracy / macro-F1 / confusion matrix; preference = preference training of a causal LM,
    chosen vs rejected (format preference) or desirable vs undesirable completions (format kto,
    preference.loss=kto); the preference section; rl = online RL of a causal LM from rule-based rewards (GRPO,
    Dr. GRPO, DAPO, GSPO) on prompts of chat / alpaca / prompt_completion records, whose answer is the reference
    the rewards compare with; the rl section. A task defined outside ft is named by its import path,
    `package.module:Class` (a subclass of ftcore.tasks.base.Task)."""
    output_dir: str = "outputs/run"
    """Run directory: checkpoints/, final/, logs. A rerun with the same output_dir resumes."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    _explicit: dict = PrivateAttr(default_factory=dict)
    _renamed: list = PrivateAttr(default_factory=list)

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        load_task(value)  # built in, or importable as package.module:Class (UnknownTask says which and why)
        return value

    def renamed_fields(self) -> list[tuple[str, str, str]]:
        """(old name, new name, where) for each field the YAML file or --set gave by a name that moved
        (MOVED_FIELDS): read this release, to be renamed by the user."""
        return self._renamed

    def explicit_fields(self) -> dict[str, str]:
        """Dotted fields the YAML file or --set gave -> where ("cfg.yaml:12", "--set"); defaults and
        launcher-derived values are not in it."""
        return self._explicit

    def __eq__(self, other: object) -> bool:
        # Two configs are equal when their values are: where a value was written (_explicit) is not part of it.
        if not isinstance(other, Config):
            return NotImplemented
        return self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]

    @model_validator(mode="after")
    def _check_combinations(self) -> "Config":
        d, t = self.distributed, self.train
        if d.offload == "all" and d.zero_stage != 3:
            raise _field_error("distributed.offload", "'all' (parameter offload) needs distributed.zero_stage=3")
        if d.offload == "optimizer" and d.zero_stage == 0:
            raise _field_error("distributed.offload", "'optimizer' needs distributed.zero_stage >= 1")
        if self.optimizer.warmup_steps > t.max_steps:
            raise _field_error("optimizer.warmup_steps", f"{self.optimizer.warmup_steps} exceeds "
                               f"train.max_steps={t.max_steps}")
        if t.stop_at_step is not None and t.stop_at_step > t.max_steps:
            raise _field_error("train.stop_at_step", f"{t.stop_at_step} exceeds train.max_steps={t.max_steps}")
        if self.evaluation.every and not self.data.eval:
            raise _field_error("evaluation.every", "is set but data.eval has no sources")
        task_for(self).check_config(self)  # the task's own fields and data formats (ftcore/tasks/)
        self._check_eval_generate()
        self._check_adapter()
        self._check_sequence_parallel()
        return self

    def _check_adapter(self) -> None:
        a, d, m = self.adapter, self.distributed, self.model
        if a.method == "freeze" and not a.trainable and a.top_layers is None:
            raise _field_error("adapter.method", "'freeze' needs adapter.trainable (names or regexes) or "
                               "adapter.top_layers (train the last N blocks)")
        if a.method != "freeze" and (a.trainable or a.top_layers is not None):
            raise _field_error("adapter.trainable" if a.trainable else "adapter.top_layers",
                               f"applies to adapter.method=freeze only (this run is {a.method})")
        for pattern in a.trainable:
            try:
                re.compile(pattern)
            except re.error as e:
                raise _field_error("adapter.trainable", f"{pattern!r} is not a regular expression: {e}") from None
        if a.method != "qlora" and a.quant_storage != "auto":
            raise _field_error("adapter.quant_storage", f"applies to adapter.method=qlora only (this run is "
                               f"{a.method}); remove it")
        if a.method == "qlora" and d.zero_stage == 3 and a.quant_storage not in ("auto", m.dtype):
            raise _field_error("adapter.quant_storage", f"{a.quant_storage} under ZeRO-3 leaves the packed 4-bit "
                               "weights whole on every rank (ZeRO-3 partitions only weights of the compute dtype, "
                               f"model.dtype={m.dtype}): set adapter.quant_storage=auto (or {m.dtype})")
        if a.method == "qlora" and d.offload == "all":
            raise _field_error("distributed.offload", "'all' (ZeRO-3 parameter offload) with adapter.method=qlora "
                               "is not supported: the 4-bit base is already small; use distributed.offload="
                               "optimizer or none")
        if self.loss.impl in ("chunked", "fused"):
            self._check_chunked_loss()

    def _check_sequence_parallel(self) -> None:
        """distributed.sequence_parallel > 1: what Ulysses cannot do here, refused by name. (The world size and the
        model's heads are checked before launch, ftcore/preflight.py.)"""
        n, m = self.distributed.sequence_parallel, self.model
        if n == 1:
            return
        why = f"does not apply with distributed.sequence_parallel={n}"
        if self.data.max_seq_len % n:
            raise _field_error("data.max_seq_len", f"{self.data.max_seq_len} is not a multiple of "
                               f"distributed.sequence_parallel={n} (each rank holds max_seq_len / {n} tokens)")
        if m.attn_implementation == "eager":
            raise _field_error("model.attn_implementation", f"eager {why}: Ulysses needs sdpa or flash_attention_2 "
                               "(eager builds a [tokens x tokens] mask); use auto")
        if self.loss.impl == "full":
            raise _field_error("loss.impl", f"full {why}: the loss of a split sequence is computed per rank "
                               "on its tokens' labels; use auto or chunked")
        if self.data.packing and m.attn_implementation != "flash_attention_2":
            raise _field_error("data.packing", f"{why} unless model.attn_implementation=flash_attention_2: under "
                               "Ulysses only flash-attention keeps packed samples apart (from their position ids); "
                               "sdpa would let them attend to each other")

    def _check_chunked_loss(self) -> None:
        """What an explicit loss.impl=chunked/fused does not cover, refused by name (auto picks around it)."""
        impl = self.loss.impl
        if impl == "fused" and self.loss.base_kl:
            raise _field_error("loss.impl", "fused does not compute loss.base_kl's KL term; use chunked "
                               "(or auto)")
        if impl == "fused" and "lm_head" in self.adapter.target_modules:
            raise _field_error("loss.impl", "fused does not cover LoRA on lm_head; use chunked (or auto)")

    def _check_eval_generate(self) -> None:
        if not self.evaluation.generates:
            return
        if not self.data.eval:
            raise _field_error("evaluation.generate", "needs data.eval (the prompts and their reference answers)")
        for i, source in enumerate(self.data.eval):
            if source.format not in ("chat", "alpaca", "prompt_completion"):
                raise _field_error(f"data.eval.{i}.format", f"{source.format} has no reference answer for "
                                   "evaluation.generate (chat, alpaca or prompt_completion)")
        if self.distributed.sequence_parallel > 1:
            raise _field_error("evaluation.generate", "does not run under distributed.sequence_parallel (each "
                               "generated token would need the whole sequence group); use ft eval after training")

    def effective_batch_size(self, world_size: int) -> int:
        """Samples per optimizer step: micro batch x accumulation x data-parallel groups (world size / sequence
        parallel degree)."""
        groups = world_size // self.distributed.sequence_parallel
        return self.train.micro_batch_size * self.train.grad_accum_steps * groups


class FieldError(ValueError):
    """A cross-field check's finding: the dotted field it names and why (printed as "field: message", with the
    YAML line or --set that gave the field)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _field_error(field: str, message: str) -> FieldError:
    return FieldError(field, message)


# ----------------------------------------------------------------------------------------------------------
# Loading: YAML + --set overrides, with errors that point at the field and the YAML line.
