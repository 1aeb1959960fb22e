"""What the user's launcher and DeepSpeed JSON chose, reconciled with the ft config. No torch import.

Users start ft their way: `ft launch` (ours), `accelerate launch` with the accelerate config they have (or its
flags), `deepspeed`, `torchrun`, `srun`, and a DeepSpeed JSON of their own (`distributed.deepspeed_config`, or
accelerate's `deepspeed_config_file`). One rule for all of them:

- a setting the ft config does not set explicitly (YAML or --set) is taken from the launcher / JSON, and printed
  ("distributed.zero_stage=3 from the accelerate config (zero_stage)");
- a setting both set to different values is a one-line error naming both places and values.

accelerate passes its choices to the processes it starts as ACCELERATE_* variables; `ft launch` marks its own
processes (FT_LAUNCHER=ft) because it derives every one of them from the ft config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, MutableMapping, Optional

from ftcore.config import Config, ConfigError

DTYPE_OF_PRECISION = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}
# torch.optim.AdamW's defaults: the recipe's optimizer; a JSON that asks for others cannot be honoured.
ADAMW_DEFAULTS = {"betas": [0.9, 0.999], "eps": 1e-8}
# Variables accelerate's DeepSpeed launcher sets that the recipe has absorbed into the ft config; they are removed
# before the Accelerator is built, so accelerate does not apply (or object to) them a second time.
ABSORBED_ACCELERATE_VARS = (
    "ACCELERATE_CONFIG_DS_FIELDS", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_GRADIENT_CLIPPING",
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_NVME_PATH", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_NVME_PATH",
    "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "ACCELERATE_DEEPSPEED_ZERO3_INIT",
)


class LaunchSettingsError(ConfigError):
    """A launcher or DeepSpeed JSON setting that contradicts the ft config, or cannot be honoured; one line (the
    command line labels it "error:", as the launcher's, not the config file's)."""

    label = "error"


@dataclass(frozen=True)
class Choice:
    """One config field a launcher or DeepSpeed JSON decided, and where it came from."""
    field: str   # the ft config field, dotted
    value: Any
    origin: str  # where it came from, for messages: "the accelerate config (zero_stage)", "ds.json: stage"


def started_by_accelerate(env: Mapping[str, str]) -> bool:
    """accelerate launch sets ACCELERATE_MIXED_PRECISION for every process it starts; ft launch's are marked."""
    return "ACCELERATE_MIXED_PRECISION" in env and env.get("FT_LAUNCHER") != "ft"


def one_process_of_more(env: Mapping[str, str]) -> bool:
    """Was this process started alone by accelerate's one-process launcher although more were asked for? It then
    sets MASTER_ADDR (it does for num_processes > 1) but no WORLD_SIZE."""
    return started_by_accelerate(env) and "WORLD_SIZE" not in env and "MASTER_ADDR" in env


def accelerate_asked_world(launch_argv: list[str]) -> tuple[int, int]:
    """(num_processes, num_machines) that `accelerate launch ARGS` asked for, by accelerate's own parser and its
    defaults from the config file (--config_file, or the default one): what its one-process launcher ignores."""
    import logging

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(launch_argv)
    quiet = logging.getLogger("accelerate.commands.launch")
    level, quiet.level = quiet.level, logging.ERROR  # its defaults warning was printed once by accelerate already
    try:
        args = _validate_launch_command(args)[0]
    finally:
        quiet.setLevel(level)
    return int(args.num_processes or 1), int(args.num_machines or 1)


def check_process_count(env: Mapping[str, str]) -> None:
    """accelerate's plain launcher (--cpu, a MULTI_CPU config, --num_processes without DeepSpeed) starts ONE
    process even when more were asked for; it then sets MASTER_ADDR but no WORLD_SIZE. Never train a silent world
    of one."""
    if one_process_of_more(env):
        raise LaunchSettingsError(
            "accelerate launch started a single process although more were asked for (--cpu, a MULTI_CPU config "
            "or --num_processes without DeepSpeed runs accelerate's one-process launcher): run `accelerate launch "
            "--use_deepspeed --num_processes N -m launcher.cli train CONFIG` (use_cpu: true in a DEEPSPEED config "
            "works too) or `ft launch CONFIG --nproc N`")


def _accelerate_offload(env: Mapping[str, str]) -> Optional[str]:
    opt = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE")
    par = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")
    if opt is None and par is None:
        return None
    return _offload_from_devices(opt or "none", par or "none", "the accelerate config (offload_optimizer_device="
                                 f"{opt}, offload_param_device={par})")


def _offload_from_devices(optimizer: str, param: str, where: str) -> str:
    optimizer, param = str(optimizer).lower(), str(param).lower()
    if "nvme" in (optimizer, param):
        raise LaunchSettingsError(f"{where}: NVMe offload is not supported by ft; use cpu (distributed.offload)")
    known = {("none", "none"): "none", ("cpu", "none"): "optimizer", ("cpu", "cpu"): "all"}
    if (optimizer, param) not in known:
        raise LaunchSettingsError(f"{where}: offloading parameters without the optimizer is not supported; offload "
                                  "both (distributed.offload=all) or the optimizer only (optimizer)")
    return known[(optimizer, param)]


def accelerate_choices(env: Mapping[str, str]) -> list[Choice]:
    """What an `accelerate launch` (config file or flags) chose, as ft fields."""
    if not started_by_accelerate(env):
        return []
    fields_from_config = set(filter(None, env.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",")))

    def origin(key: str, var: str) -> str:
        where = "the accelerate config" if key in fields_from_config else "accelerate launch"
        return f"{where} ({key}={env[var]})"

    choices = []
    precision = env["ACCELERATE_MIXED_PRECISION"].lower()
    if precision not in DTYPE_OF_PRECISION:
        raise LaunchSettingsError(f"accelerate launch: mixed_precision={precision} is not supported by ft; use no, "
                                  "bf16 or fp16")
    # "no" is also accelerate's default when nothing was chosen: it only counts when the accelerate config says so.
    if precision != "no" or "mixed_precision" in fields_from_config:
        choices.append(Choice("model.dtype", DTYPE_OF_PRECISION[precision],
                              origin("mixed_precision", "ACCELERATE_MIXED_PRECISION")))
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return choices
    if "ACCELERATE_DEEPSPEED_ZERO_STAGE" in env:
        choices.append(Choice("distributed.zero_stage", int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"]),
                              origin("zero_stage", "ACCELERATE_DEEPSPEED_ZERO_STAGE")))
    gas = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto")
    if gas.isdigit():
        choices.append(Choice("train.grad_accum_steps", int(gas),
                              origin("gradient_accumulation_steps", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS")))
    clipping = env.get("ACCELERATE_GRADIENT_CLIPPING", "auto").lower()
    if clipping not in ("auto", "none", ""):
        choices.append(Choice("optimizer.max_grad_norm", float(clipping),
                              origin("gradient_clipping", "ACCELERATE_GRADIENT_CLIPPING")))
    offload = _accelerate_offload(env)
    if offload is not None:
        choices.append(Choice("distributed.offload", offload, "the accelerate config (offload_optimizer_device/"
                              "offload_param_device)"))
    if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none") not in ("none", ""):
        choices.append(Choice("distributed.deepspeed_config", env["ACCELERATE_DEEPSPEED_CONFIG_FILE"],
                              origin("deepspeed_config_file", "ACCELERATE_DEEPSPEED_CONFIG_FILE")))
    return choices


def read_deepspeed_json(path: str) -> dict:
    """A user's DeepSpeed JSON; errors name distributed.deepspeed_config and the file."""
    try:
        config = json.loads(Path(path).read_text())
    except OSError as e:
        raise LaunchSettingsError(f"distributed.deepspeed_config: cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise LaunchSettingsError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(config, dict) or not isinstance(config.get("zero_optimization", {}), dict):
        raise LaunchSettingsError(f"{path}: a DeepSpeed config is a JSON object with a zero_optimization object")
    return config


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# DeepSpeed JSON key -> the ft field that expresses the same setting.
JSON_FIELDS = {
    "zero_optimization.stage": "distributed.zero_stage",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "optimizer.max_grad_norm",
    "zero_optimization.stage3_param_persistence_threshold": "distributed.zero3_param_persistence_threshold",
    "optimizer.params.lr": "optimizer.lr",
    "optimizer.params.weight_decay": "optimizer.weight_decay",
    "scheduler.params.warmup_max_lr": "optimizer.lr",
    "scheduler.params.warmup_num_steps": "optimizer.warmup_steps",
    "scheduler.params.total_num_steps": "train.max_steps",
}
OPTIMIZER_TYPES = ("adam", "adamw")
SCHEDULER_TYPES = ("warmuplr", "warmupdecaylr", "warmupcosinelr")


def deepspeed_json_choices(config: dict, path: str) -> list[Choice]:
    """What a user's DeepSpeed JSON sets, as ft fields ("auto" values set nothing: ft fills them)."""
    choices = []
    for key, field in JSON_FIELDS.items():
        value = _get(config, key)
        if value is not None and value != "auto":
            if field in ("optimizer.lr", "optimizer.weight_decay", "optimizer.max_grad_norm"):
                value = float(value)
            elif field != "optimizer.lr":
                value = int(value)
            choices.append(Choice(field, value, f"{path}: {key}={_get(config, key)!r}"))
    bf16, fp16 = _get(config, "bf16.enabled"), _get(config, "fp16.enabled")
    if bf16 is True or fp16 is True:
        if bf16 is True and fp16 is True:
            raise LaunchSettingsError(f"{path}: bf16.enabled and fp16.enabled are both true; enable one")
        key = "bf16.enabled" if bf16 is True else "fp16.enabled"
        choices.append(Choice("model.dtype", "bfloat16" if bf16 is True else "float16", f"{path}: {key}=true"))
    elif bf16 is False or fp16 is False:
        if "auto" not in (bf16, fp16):
            choices.append(Choice("model.dtype", "float32", f"{path}: bf16/fp16 disabled"))
    zero = config.get("zero_optimization", {})
    devices = [_get(zero, "offload_optimizer.device"), _get(zero, "offload_param.device")]
    if any(d is not None for d in devices):
        where = f"{path}: zero_optimization.offload_optimizer/offload_param"
        choices.append(Choice("distributed.offload", _offload_from_devices(devices[0] or "none",
                                                                           devices[1] or "none", where), where))
    optimizer = config.get("optimizer")
    if optimizer is not None:
        kind = str(optimizer.get("type", "")).lower()
        if kind not in OPTIMIZER_TYPES:
            raise LaunchSettingsError(f"{path}: optimizer.type={optimizer.get('type')!r}: ft trains with AdamW "
                                      "(the ft config's optimizer.lr, optimizer.weight_decay); use type AdamW or "
                                      "remove the optimizer section")
        for key, default in ADAMW_DEFAULTS.items():
            value = _get(optimizer, f"params.{key}")
            if value not in (None, "auto") and value != default:
                raise LaunchSettingsError(f"{path}: optimizer.params.{key}={value!r}: ft's AdamW uses {key} {default}"
                                          f" (there is no ft field for it); set it to \"auto\"")
    scheduler = config.get("scheduler")
    if scheduler is not None:
        kind = str(scheduler.get("type", "")).lower()
        if kind not in SCHEDULER_TYPES:
            raise LaunchSettingsError(f"{path}: scheduler.type={scheduler.get('type')!r} is not one ft can stand in "
                                      f"for; remove the scheduler section (ft: linear warmup, then cosine decay)")
        for key in ("warmup_min_lr", "cos_min_ratio"):
            value = _get(scheduler, f"params.{key}")
            if value not in (None, "auto", 0, 0.0):
                raise LaunchSettingsError(f"{path}: scheduler.params.{key}={value!r}: ft's schedule starts and ends "
                                          "at 0; set it to \"auto\" or 0")
    gather = _get(zero, "stage3_gather_16bit_weights_on_model_save")
    if gather is False:
        raise LaunchSettingsError(f"{path}: zero_optimization.stage3_gather_16bit_weights_on_model_save=false: "
                                  "ft writes final/ from the gathered 16-bit weights; set it to true")
    return choices


def _current(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def reconcile(cfg: Config, choices: list[Choice]) -> tuple[dict[str, tuple[Any, str]], list[str]]:
    """(fields to take from the launcher: field -> (value, origin), lines to print). Raises LaunchSettingsError on
    a contradiction: the ft config set the field to another value, or two launcher sources disagree."""
    explicit = cfg.explicit_fields()
    taken: dict[str, tuple[Any, str]] = {}
    for choice in choices:
        if choice.field in taken and taken[choice.field][0] != choice.value:
            value, origin = taken[choice.field]
            raise LaunchSettingsError(f"{choice.field}: {origin} says {value!r} but {choice.origin} says "
                                      f"{choice.value!r}; make them agree")
        current = _current(cfg, choice.field)
        if choice.field in explicit:
            if current != choice.value:
                raise LaunchSettingsError(f"{choice.field}: {explicit[choice.field]} says {current!r} but "
                                          f"{choice.origin} says {choice.value!r}; make them agree (or drop one)")
            continue
        taken[choice.field] = (choice.value, choice.origin)
    lines = [f"{field}={value!r} from {origin}" for field, (value, origin) in taken.items()
             if _current(cfg, field) != value]
    return taken, lines


def launcher_settings(cfg: Config, env: Mapping[str, str]) -> tuple[dict[str, tuple[Any, str]], list[str]]:
    """Everything the launcher (accelerate's variables) and the DeepSpeed JSON choose, reconciled with cfg."""
    check_process_count(env)
    choices = accelerate_choices(env)
    json_path = cfg.distributed.deepspeed_config
    from_accelerate = next((c for c in choices if c.field == "distributed.deepspeed_config"), None)
    if from_accelerate is not None and json_path is None:
        json_path = from_accelerate.value
    if json_path is not None:
        choices += deepspeed_json_choices(read_deepspeed_json(json_path), json_path)
    return reconcile(cfg, choices)


def prepare_accelerate_env(env: MutableMapping[str, str], mixed_precision: str, cuda: bool) -> None:
    """Before the Accelerator is built: the recipe runs on DeepSpeed whatever accelerate launcher started it, with
    the DeepSpeed config ft derived (the absorbed ACCELERATE_* settings are removed so accelerate neither applies
    them again nor refuses them next to a config of ours)."""
    if env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1", "yes"):
        if cuda:
            raise LaunchSettingsError("accelerate launch --cpu (use_cpu) on a machine with CUDA GPUs: ft trains "
                                      "with DeepSpeed on the GPUs; drop --cpu, or hide the GPUs "
                                      "(CUDA_VISIBLE_DEVICES=) to train on the CPU")
        env["ACCELERATE_USE_CPU"] = "false"  # DeepSpeed runs on its CPU accelerator by itself
    for name in ABSORBED_ACCELERATE_VARS:
        env.pop(name, None)
    env["ACCELERATE_MIXED_PRECISION"] = mixed_precision
    env["ACCELERATE_USE_DEEPSPEED"] = "true"


def process_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process's global rank (0 without a launcher)."""
    return int(env.get("RANK", "0"))
