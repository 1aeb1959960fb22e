"""`ft plan`: per-GPU memory of a config under ZeRO 0-3 with and without CPU offload, before anything is launched.

The model is built on the meta device from its config.json (no weights are read or allocated), with the config's
adapter applied, so every parameter's size, trainability and (for QLoRA) quantization are the ones training
will have. From them, per rank:

  model states (exact where DeepSpeed's layout is deterministic; tested against the real engine on CPU)
    weights      compute-dtype copy of every float parameter; ZeRO-3: this rank's partition (ceil(numel / W)
                 per parameter, DeepSpeed's padding) plus a gathered working set of the two largest layers
                 (current + prefetched; a tied embedding/head counts once)
    4-bit base   QLoRA: packed NF4 weights (1/2 byte per weight) + double-quantized absmax (about 1/64 byte)
    gradients    trainable only. ZeRO-0/1: full, compute dtype; ZeRO-2: this rank's partition; mixed precision
                 adds the fp32 gradient partition the optimizer steps with (ZeRO-3 is counted at fp32 only,
                 DeepSpeed's accounting). With offload they live on the host.
    optimizer    AdamW: fp32 master copy (4 B, ZeRO >= 1 or mixed precision) + two fp32 moments (8 B) per
                 trainable element; ZeRO >= 1 holds its partition: each parameter group flattened and padded to
                 a multiple of 2 x W (ZeRO-1/2) or per parameter (ZeRO-3). With offload they live on the host.
  activations (an estimate; Llama-style decoder, sdpa/flash attention, no score matrix kept)
    per layer and token: 7h + 3kv + 4i elements in the compute dtype (norm inputs/outputs, rotary q/k,
    attention q/k/v/out, MLP gate/up/product), + 6h + i with LoRA dropout. With checkpointing: every layer's
    input plus one layer recomputed. Tokens per GPU: the micro batch's, / distributed.sequence_parallel (Ulysses
    holds each rank's tokens, and in attention the whole sequence for heads / N: the same count). With
    --gpu-mem-gb each layout also gets the longest data.max_seq_len that fits with checkpointing.
  loss          loss.impl full: logits T x vocab x (dtype + 8 B: the logits, their fp32 copy and gradient);
                chunked/fused/auto: one chunk (tokens sized by loss.chunk_mb for the vocabulary) x vocab x
                (dtype + 4 B) (more with base_kl or a soft-capping family), the hidden states' gradient and the
                head's trained weights' fp32 gradient (loss_bytes). Counted in the activations.
  reference     loss.base_kl, or preference.loss dpo/ipo/hinge/kto, with full/freeze: a frozen copy of the model
                in the compute dtype (in "weights"), 1/world of it per GPU under ZeRO-3. format preference: a micro
                batch is micro_batch_size pairs, i.e. 2 x micro_batch_size rows (chosen and rejected in one
                forward); kto: micro_batch_size rows (its mismatched rows run without gradients).
  rollout       task rl: generation comes before the training forward, so a GPU holds the larger of the two
                beside the model states: the KV cache of one group's rl.num_generations sequences of
                data.max_seq_len tokens (2 x layers x kv x dtype per token) and a step's fp32 logits, plus under
                ZeRO-3 the whole model gathered for generation (rl.zero3_generation gather, or auto where that fits
                --gpu-mem-gb; else layer by layer, nothing more). The old policy's log-probs stay on the host.
  overhead      1 GiB per GPU for the CUDA context, NCCL and allocator slack.

Host RAM with offload (per node) is DeepSpeed's: the offloaded states x 1.5 (its additional_buffer_factor).
The figures for full fine-tuning equal DeepSpeed's own estimators (estimate_zero2/3_model_states_mem_needs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

from ftcore.config import Config
from ftcore.tasks import task_for

GIB = 1024 ** 3
CUDA_OVERHEAD_BYTES = 1 * GIB
HOST_BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor for host memory
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed nibbles + 8-bit absmax per 64 + fp32 per 256 blocks
# Cheapest first: no offload before offload (a CPU optimizer step is slow), fewer partitions before more.
LAYOUTS = [(0, "none"), (1, "none"), (2, "none"), (3, "none"), (1, "optimizer"), (2, "optimizer"),
           (3, "optimizer"), (3, "all")]


class PlanError(ValueError):
    """An impossible `ft plan` request, as one line."""
    pass


@dataclass
class ParamInfo:
    """One parameter as the planner counts it."""
    name: str
    numel: int              # logical elements (a 4-bit weight counts its unquantized shape)
    ndim: int
    trainable: bool
    quantized: bool


@dataclass
class ModelFacts:
    """What the planner needs of the model, read from the model built on the meta device."""
    params: list[ParamInfo]
    largest_layer: int      # most parameters owned directly by one module (DeepSpeed's largest_layer_params)
    next_largest_layer: int  # the second most: ZeRO-3 gathers the current layer and prefetches the next
    hidden: int
    layers: int
    intermediate: int
    kv_dim: int
    vocab: int
    max_positions: Optional[int]
    head_trainable: int = 0                       # trainable elements of the output head (with LoRA on it)
    softcap: bool = False                         # the family soft-caps its logits (Gemma-2/3)
    depths: Optional[dict[str, int]] = None       # optimizer.layer_lr_decay splits groups by depth
    num_blocks: int = 0
    layer_lr_decay: Optional[float] = None

    @property
    def total(self) -> int:
        """All parameter elements."""
        return sum(p.numel for p in self.params)

    @property
    def trainable(self) -> int:
        """Elements that train."""
        return sum(p.numel for p in self.params if p.trainable)

    @property
    def quantized(self) -> int:
        """Elements stored in 4 bits."""
        return sum(p.numel for p in self.params if p.quantized)


def build_facts(cfg: Config, model_dir: str) -> ModelFacts:
    """The model as training will build it, on the meta device: no weights read, nothing allocated."""
    import torch
    from transformers import AutoConfig

    from ftcore.dtypes import DTYPES
    from ftcore.gguf_base import gguf_file, hf_config_dict
    from ftcore.model import apply_freeze, apply_lora
    from ftcore.model_geometry import (
        block_depths,
        classification_head_names,
        head_dim,
        meta_skeleton,
        quantized_module_names,
    )

    task = task_for(cfg)
    classification = task.head == "sequence_classification"  # the model's head, as the task builds it
    extra = task.head_settings(cfg.data, None) or {}
    gguf = gguf_file(model_dir)
    if gguf is not None:  # the GGUF's metadata, read without dequantizing a tensor
        config_dict = hf_config_dict(gguf)
        hf_config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict, **extra)
    else:
        hf_config = AutoConfig.from_pretrained(model_dir, **extra)
    model = meta_skeleton(hf_config, task.head, dtype=DTYPES[cfg.model.dtype])
    quantized_modules = quantized_module_names(model) if cfg.adapter.method == "qlora" else set()
    if cfg.adapter.method in ("lora", "qlora"):
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.device("meta"):  # the adapter's new weights too: a plan allocates nothing
            model = apply_lora(model, cfg.adapter, cfg.train.seed, "SEQ_CLS" if classification else "CAUSAL_LM")
    elif cfg.adapter.method == "freeze":
        apply_freeze(model, cfg.adapter, head=classification_head_names(model) if classification else ())
    seen: set[int] = set()
    params: list[ParamInfo] = []
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        module_name = name.rsplit(".", 1)[0].replace("base_model.model.", "").replace(".base_layer", "")
        quantized = module_name in quantized_modules and name.endswith("weight") and not p.requires_grad
        params.append(ParamInfo(name, p.numel(), p.dim(), p.requires_grad, quantized))
    # Each parameter counted once (a tied embedding and head are one layer to gather, not two).
    owned, counted = [], set()
    for m in model.modules():
        own = [p for p in m.parameters(recurse=False) if id(p) not in counted]
        counted.update(id(p) for p in own)
        owned.append(sum(p.numel() for p in own))
    largest, next_largest = (sorted(owned, reverse=True) + [0, 0])[:2]
    h = hf_config.hidden_size
    heads = getattr(hf_config, "num_attention_heads", 1)
    kv = getattr(hf_config, "num_key_value_heads", heads) * head_dim(hf_config)
    depths, num_blocks = block_depths(model) if cfg.optimizer.layer_lr_decay is not None else (None, 0)
    head = None if classification else model.get_output_embeddings()
    head_trainable = sum(p.numel() for p in head.parameters() if p.requires_grad) if head is not None else 0
    return ModelFacts(params=params, largest_layer=largest, next_largest_layer=next_largest, hidden=h,
                      layers=hf_config.num_hidden_layers,
                      head_trainable=head_trainable,
                      softcap=bool(getattr(hf_config, "final_logit_softcapping", None)),
                      intermediate=getattr(hf_config, "intermediate_size", 4 * h), kv_dim=kv,
                      vocab=hf_config.vocab_size, max_positions=getattr(hf_config, "max_position_embeddings", None),
                      depths=depths, num_blocks=num_blocks, layer_lr_decay=cfg.optimizer.layer_lr_decay)


def optimizer_groups(facts: ModelFacts) -> list[list[ParamInfo]]:
    """The recipe's AdamW groups (ftcore.train.optim.optimizer_grouping), as parameter infos."""
    from ftcore.train.optim import optimizer_grouping

    by_name = {p.name: p for p in facts.params}
    described = [(p.name, p.ndim, p.trainable) for p in facts.params]
    return [[by_name[n] for n in names] for _, _, names in
            optimizer_grouping(described, facts.depths, facts.num_blocks, facts.layer_lr_decay)]


def partition_numel(facts: ModelFacts, stage: int, world: int) -> int:
    """Trainable elements this rank's optimizer holds (every rank holds the same count)."""
    groups = optimizer_groups(facts)
    if stage == 0:
        return sum(p.numel for g in groups for p in g)
    if stage in (1, 2):  # each group flattened, padded to a multiple of 2 x W, split evenly
        align = 2 * world
        return sum(math.ceil(sum(p.numel for p in g) / align) * align // world for g in groups)
    return sum(math.ceil(p.numel / world) for g in groups for p in g)  # ZeRO-3: per parameter


def quant_storage_bytes(cfg: Config, stage: int) -> int:
    """Bytes per element of the tensor the packed 4-bit weights are stored in."""
    from ftcore.model import quant_storage_dtype

    return quant_storage_dtype(cfg.adapter, cfg.model.dtype, stage).itemsize


def engine_state_bytes(cfg: Config, facts: ModelFacts, stage: int, world: int) -> dict[str, int]:
    """What DeepSpeed's engine itself holds per rank: parameter storage (ZeRO-3: the partition) and optimizer
    states (fp32 master + moments). Checked for equality against the real engine on CPU."""
    b = DTYPE_BYTES[cfg.model.dtype]
    mixed = cfg.model.dtype != "float32"
    storage = quant_storage_bytes(cfg, stage) if cfg.adapter.method == "qlora" else 1
    param_bytes = 0
    for p in facts.params:
        if p.quantized:  # packed nibbles in a tensor of the storage dtype
            numel, size = math.ceil(p.numel / 2 / storage), storage
        else:
            numel, size = p.numel, b
        param_bytes += (math.ceil(numel / world) if stage == 3 else numel) * size
    master = 4 if (stage >= 1 or mixed) else 0
    return {"param_bytes": param_bytes, "optimizer_bytes": (master + 8) * partition_numel(facts, stage, world)}


@dataclass
class Row:
    """Bytes per GPU of one ZeRO stage and offload mode, by kind."""
    stage: int
    offload: str
    supported: bool
    weights: float = 0.0
    quantized_base: float = 0.0
    trainable_weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations_checkpointed: float = 0.0
    activations_full: float = 0.0
    longest_seq_len: Optional[int] = None  # with --gpu-mem-gb: the longest data.max_seq_len that fits (checkpointed)
    longest_is_model_limit: bool = False  # ... and it is the model's max_position_embeddings, not the memory
    host_ram_per_node: float = 0.0
    note: str = ""
    rollout: float = 0.0  # task rl: generation's peak beside the model states (rollout_bytes)
    rollout_gathers: bool = False  # ... with the whole ZeRO-3 model gathered for it

    @property
    def model_states(self) -> float:
        """Weights, gradients and optimizer states per GPU."""
        return self.weights + self.quantized_base + self.trainable_weights + self.gradients + self.optimizer

    def total(self, checkpointing: bool) -> float:
        """Everything per GPU, with activations as checkpointing leaves them (or task rl's rollout, which comes
        before the training forward, when it needs more)."""
        activations = self.activations_checkpointed if checkpointing else self.activations_full
        return self.model_states + max(activations, self.rollout) + CUDA_OVERHEAD_BYTES


@dataclass
class Plan:
    """`ft plan`'s answer: every layout's bytes per GPU and the recommended one."""
    world: int
    nodes: int
    gpus_per_node: int
    gpu_mem_bytes: Optional[float]
    total_params: int
    trainable_params: int
    quantized_params: int
    rows: list[Row] = field(default_factory=list)
    recommendation: Optional[dict] = None
    loss: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The plan as `ft plan --json` prints it."""
        data = asdict(self)
        for row, obj in zip(data["rows"], self.rows):
            row["model_states"] = obj.model_states
            row["total_checkpointed"] = obj.total(True)
            row["total_full"] = obj.total(False)
        return data


def micro_batch_tokens(cfg: Config) -> int:
    """Token slots of one micro batch on one GPU: micro_batch_size rows of max_seq_len (two rows per pair for
    preference), split over distributed.sequence_parallel ranks."""
    rows = cfg.train.micro_batch_size * task_for(cfg).rows_per_step_example(cfg)
    return rows * -(-cfg.data.max_seq_len // cfg.distributed.sequence_parallel)


def needs_reference_copy(cfg: Config) -> bool:
    """A frozen copy of the model sits beside it: the task reads a reference (base_kl, a reference-based
    preference loss) and the weights themselves train (full/freeze)."""
    return task_for(cfg).needs_reference(cfg) and cfg.adapter.method in ("full", "freeze")


def loss_bytes(cfg: Config, facts: ModelFacts) -> dict:
    """The loss's memory per GPU for one micro batch: {"impl": what loss.impl runs, "bytes": its peak,
    "full_bytes": what the model's own loss (full) would hold}. full: the [tokens x vocab] logits in the compute
    dtype, their fp32 upcast and fp32 gradient (dtype + 8 B per logit). chunked (fused: counted the same):
    one chunk's logits (dtype + 4 B; with loss.base_kl + the base's logits and probabilities, dtype + 8 B more;
    a soft-capping family + 4 B), the hidden states' gradient, and the fp32 gradient of the head's trained
    weights, held from the forward pass to backward."""
    b = DTYPE_BYTES[cfg.model.dtype]
    tokens = micro_batch_tokens(cfg)
    full = tokens * facts.vocab * (b + 8)
    impl = cfg.loss.impl
    if task_for(cfg).head == "sequence_classification":
        return {"impl": "full", "bytes": 0.0, "full_bytes": 0.0}  # one row of class logits per sample
    if impl == "full":
        return {"impl": "full", "bytes": float(full), "full_bytes": float(full)}
    per_logit = b + 4 + (b + 8 if cfg.loss.base_kl else 0) + (4 if facts.softcap else 0)
    chunk = min(cfg.loss.tokens_per_chunk(facts.vocab), tokens) * facts.vocab * per_logit
    held = tokens * facts.hidden * b + facts.head_trainable * 4
    name = {"auto": "auto (fused on CUDA with liger-kernel, else chunked)"}.get(impl, impl)
    return {"impl": name, "bytes": float(chunk + held), "full_bytes": float(full)}


def activation_bytes(cfg: Config, facts: ModelFacts) -> tuple[float, float]:
    """(with checkpointing, without) per GPU for one micro batch, the loss's memory (loss_bytes) included."""
    b = DTYPE_BYTES[cfg.model.dtype]
    tokens = micro_batch_tokens(cfg)
    h, kv, i = facts.hidden, facts.kv_dim, facts.intermediate
    per_layer_token = 7 * h + 3 * kv + 4 * i
    if cfg.adapter.method in ("lora", "qlora") and cfg.adapter.dropout > 0:
        per_layer_token += 6 * h + i  # dropout copies of the adapters' inputs
    layer = tokens * per_layer_token * b
    loss = loss_bytes(cfg, facts)["bytes"]
    full = facts.layers * layer + loss
    checkpointed = facts.layers * tokens * h * b + layer + loss
    return checkpointed, full


def plan_row(cfg: Config, facts: ModelFacts, stage: int, offload: str, world: int, gpus_per_node: int) -> Row:
    """Bytes per GPU of `cfg` under one ZeRO stage and offload mode on `world` GPUs."""
    row = Row(stage=stage, offload=offload, supported=True)
    if cfg.adapter.method == "qlora" and offload == "all":
        row.supported, row.note = False, "qlora + parameter offload is not supported"
        return row
    b = DTYPE_BYTES[cfg.model.dtype]
    mixed = cfg.model.dtype != "float32"
    states = engine_state_bytes(cfg, facts, stage, world)
    trainable = facts.trainable
    quantized_weight_bytes = sum(math.ceil(p.numel / 2) for p in facts.params if p.quantized)
    quant_overhead = facts.quantized * NF4_BYTES_PER_WEIGHT - quantized_weight_bytes  # absmax + constants
    float_frozen = sum(p.numel for p in facts.params if not p.trainable and not p.quantized) * b
    float_trainable = trainable * b
    if stage == 3:
        share = states["param_bytes"] / max(1, float_frozen + float_trainable + quantized_weight_bytes)
        # The layers being gathered: the current one and the prefetched next, at most the two largest (with a
        # tied 262k-row embedding, e.g. Gemma-3, the largest is most of the model and the next one is small).
        gathered = (facts.largest_layer + facts.next_largest_layer) * b
        row.weights = float_frozen * share + gathered
        row.quantized_base = quantized_weight_bytes * share + quant_overhead
        row.trainable_weights = float_trainable * share
    else:
        row.weights = float_frozen
        row.quantized_base = quantized_weight_bytes + quant_overhead
        row.trainable_weights = float_trainable
    if needs_reference_copy(cfg):
        # The frozen reference copy the KL term / preference loss reads; under ZeRO-3 partitioned like the model
        # (its layers are gathered while it runs, not at the same time as the model's).
        row.weights += facts.total * b / (world if stage == 3 else 1)
    partition = partition_numel(facts, stage, world)
    if stage in (0, 1):
        grads_16 = trainable * b
    elif stage == 2:
        grads_16 = partition * b
    else:
        grads_16 = 0  # ZeRO-3: reduced straight into the fp32 partition below (DeepSpeed's accounting)
    grads_32 = 4 * partition if (mixed or stage == 3) else 0
    optimizer = states["optimizer_bytes"]
    if offload == "none":
        row.gradients, row.optimizer = grads_16 + grads_32, optimizer
    else:
        row.gradients, row.optimizer = 0.0, 0.0
        host_per_rank = optimizer + 4 * partition
        if offload == "all":  # parameter partitions on the host too; the GPU keeps the gathered layers
            host_per_rank += states["param_bytes"]
            row.weights, row.trainable_weights = (facts.largest_layer + facts.next_largest_layer) * b, 0.0
        row.host_ram_per_node = host_per_rank * gpus_per_node * HOST_BUFFER_FACTOR
    row.activations_checkpointed, row.activations_full = activation_bytes(cfg, facts)
    shape = task_for(cfg).rollout_shape(cfg)
    if shape is not None:
        whole = float_frozen + float_trainable + quantized_weight_bytes
        held = row.weights + row.quantized_base + row.trainable_weights
        row.rollout_gathers = stage == 3 and shape.zero3_generation != "layered"
        row.rollout = rollout_bytes(cfg, facts, max(0.0, whole - held) if row.rollout_gathers else 0.0)
    return row


def rollout_bytes(cfg: Config, facts: ModelFacts, gathered: float) -> float:
    """A generating task's rollout per GPU (Task.rollout_shape; task rl: a group's rl.num_generations sequences of
    data.max_seq_len tokens): their KV cache (keys and values, every layer, the compute dtype; an upper bound for
    sliding-window layers), one step's fp32 logits per sequence, and `gathered`: what gathering the whole ZeRO-3
    model adds (rl.zero3_generation gather, or auto where it fits). The old policy's log-probs (rl.num_iterations >
    1) are kept on the host. 0 for a task that does not generate."""
    shape, b = task_for(cfg).rollout_shape(cfg), DTYPE_BYTES[cfg.model.dtype]
    if shape is None:
        return 0.0
    cache = 2 * facts.layers * facts.kv_dim * shape.rows * shape.tokens * b
    return cache + shape.rows * facts.vocab * 4 + gathered


def longest_seq_len(cfg: Config, facts: ModelFacts, row: Row, gpu_mem_bytes: float) -> Optional[int]:
    """The longest data.max_seq_len (a multiple of 64 x distributed.sequence_parallel) whose total with gradient
    checkpointing fits `gpu_mem_bytes` in this layout, up to the model's max_position_embeddings; None if not
    even the shortest fits. Activations grow with the tokens per GPU, so sequence parallelism of N gives about
    N times the length."""
    if not row.supported:
        return None
    step = 64 * cfg.distributed.sequence_parallel
    limit = facts.max_positions or 1 << 24

    def fits(length: int) -> bool:
        sized = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_seq_len": length})})
        rollout = rollout_bytes(sized, facts, row.rollout - rollout_bytes(cfg, facts, 0.0)) if row.rollout else 0.0
        return row.model_states + max(activation_bytes(sized, facts)[0], rollout) + CUDA_OVERHEAD_BYTES <= gpu_mem_bytes

    low, high = 0, max(1, limit // step)  # in steps: fits(low * step) holds (or low == 0)
    if not fits(step):
        return None
    low = 1
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle * step):
            low = middle
        else:
            high = middle - 1
    return low * step


def make_plan(cfg: Config, facts: ModelFacts, gpus_per_node: int, nodes: int,
              gpu_mem_gb: Optional[float]) -> Plan:
    """Every layout for `cfg` on nodes x gpus_per_node GPUs, and the cheapest that fits gpu_mem_gb."""
    if gpus_per_node < 1 or nodes < 1:
        raise PlanError(f"--gpus-per-node and --nodes must be >= 1 (got {gpus_per_node}, {nodes})")
    world = gpus_per_node * nodes
    sp = cfg.distributed.sequence_parallel
    if world % sp:
        raise PlanError(f"distributed.sequence_parallel={sp} does not divide {world} GPUs")
    plan = Plan(world=world, nodes=nodes, gpus_per_node=gpus_per_node,
                gpu_mem_bytes=gpu_mem_gb * GIB if gpu_mem_gb else None, total_params=facts.total,
                trainable_params=facts.trainable, quantized_params=facts.quantized, loss=loss_bytes(cfg, facts))
    plan.rows = [plan_row(cfg, facts, stage, offload, world, gpus_per_node) for stage, offload in LAYOUTS]
    shape = task_for(cfg).rollout_shape(cfg)
    if plan.gpu_mem_bytes and shape is not None and shape.zero3_generation == "auto":
        for row in plan.rows:  # rl.zero3_generation auto: layer by layer where the gathered model does not fit
            if row.rollout_gathers and row.total(True) > plan.gpu_mem_bytes:
                row.rollout_gathers, row.rollout = False, rollout_bytes(cfg, facts, 0.0)
    if plan.gpu_mem_bytes:
        plan.recommendation = recommend(plan)
        for row in plan.rows:
            row.longest_seq_len = longest_seq_len(cfg, facts, row, plan.gpu_mem_bytes)
            step = 64 * cfg.distributed.sequence_parallel
            row.longest_is_model_limit = bool(row.longest_seq_len and facts.max_positions
                                              and row.longest_seq_len + step > facts.max_positions)
    return plan


def recommend(plan: Plan) -> Optional[dict]:
    """Cheapest layout that fits: no offload before offload, no checkpointing before checkpointing."""
    order = [(r, False) for r in plan.rows if r.offload == "none"] + \
            [(r, True) for r in plan.rows if r.offload == "none"] + \
            [(r, False) for r in plan.rows if r.offload != "none"] + \
            [(r, True) for r in plan.rows if r.offload != "none"]
    for row, checkpointing in order:
        if row.supported and row.total(checkpointing) <= plan.gpu_mem_bytes:
            return {"zero_stage": row.stage, "offload": row.offload, "gradient_checkpointing": checkpointing,
                    "per_gpu_bytes": row.total(checkpointing), "host_ram_per_node_bytes": row.host_ram_per_node,
                    "overrides": [f"distributed.zero_stage={row.stage}", f"distributed.offload={row.offload}",
                                  f"model.gradient_checkpointing={str(checkpointing).lower()}"]}
    return None
