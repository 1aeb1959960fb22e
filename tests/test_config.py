"""Typed config: precedence, and one-line errors that name the field (and YAML line)."""

import re
from pathlib import Path

import pytest

from ftcore.config import Config, ConfigError, dump_config, load_config
from ftcore.resume import config_fingerprint, fingerprint_diff
from tests.conftest import ft_in_process, run_ft


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_yaml_and_set_precedence(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.001\n  max_steps: 7\nadapter:\n  r: 4\n")
    cfg = load_config(path, ["optimizer.lr=5e-4", "adapter.target_modules=[q_proj, v_proj]"])
    assert cfg.optimizer.lr == 5e-4  # --set beats YAML
    assert cfg.train.max_steps == 7  # YAML beats default
    assert cfg.adapter.r == 4
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.micro_batch_size == Config().train.micro_batch_size  # default kept
    assert load_config(None, ["data.train.0.format=alpaca"]).data.train[0].format == "alpaca"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["distributed.zero_stage=3", "model.dtype=bfloat16"])
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize("yaml_text, overrides, expected", [
    ("train:\n  lr: 1e-4\n  mx_steps: 3\n", [], "cfg.yaml:3: train.mx_steps: unknown key; valid keys here:"),
    ("model:\n  dtype: fp8\n", [], "cfg.yaml:2: model.dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    ("train:\n  micro_batch_size: many\n", [], "cfg.yaml:2: train.micro_batch_size: Input should be a valid integer"),
    ("", ["distributed.zero_stage=5"], "--set: distributed.zero_stage: Input should be 0, 1, 2 or 3"),
    ("", ["distributed.offload=all"], "distributed.offload: 'all' (parameter offload) needs distributed.zero_stage=3"),
    ("", ["optimizer.warmup_steps=500", "train.max_steps=10"],
     "optimizer.warmup_steps: 500 exceeds train.max_steps=10"),
    ("", ["bogus.key=1"],
     "bogus: unknown key; valid keys here: adapter, checkpoint, data, distributed, evaluation, logging, loss, model"),
    ("model: [1, 2\n", [], "cfg.yaml:2: invalid YAML"),
])
def test_errors_are_one_line_and_name_the_field(tmp_path, yaml_text, overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, yaml_text), overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_cli_config_errors(tmp_path):
    bad = write(tmp_path, "model:\n  dtype: fp8\n")
    proc = run_ft("config", str(bad), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "model.dtype" in proc.stderr and "fp8" in proc.stderr

    proc = ft_in_process("launch", "--set", "model.name_or_path=/no/such/model", "--nproc", "2", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("config error: model.name_or_path: /no/such/model does not exist or is not a "
                                   "directory")

    empty = tmp_path / "empty_model"
    empty.mkdir()
    proc = ft_in_process("train", "--set", f"model.name_or_path={empty}", check=False)
    assert proc.returncode == 2 and "has no config.json" in proc.stderr

    proc = ft_in_process("launch", "--set", "data.train.0.path=/no/data.jsonl", "--dry-run", check=False)
    assert proc.returncode == 2 and "data.train.0.path: /no/data.jsonl: does not exist" in proc.stderr


def test_cli_prints_resolved_config():
    proc = ft_in_process("config", "examples/chat-demo.yaml", "--set", "optimizer.lr=0.5")
    cfg = load_config("examples/chat-demo.yaml", ["optimizer.lr=0.5"])
    assert proc.stdout == dump_config(cfg)


@pytest.mark.parametrize("overrides,message", [
    (["adapter.method=freeze"], "adapter.method: 'freeze' needs adapter.trainable (names or regexes) or "
                                "adapter.top_layers"),
    (["adapter.trainable=[lm_head]"], "adapter.trainable: applies to adapter.method=freeze only (this run is lora)"),
    (["adapter.method=freeze", "adapter.trainable=['layers\\.[']"], "adapter.trainable: 'layers\\\\.[' is not a "
                                                                    "regular expression"),
    (["optimizer.layer_lr_decay=1.5"], "optimizer.layer_lr_decay"),
])
def test_freeze_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_checkpoint_from_before_a_new_field_resumes_unless_the_field_changes():
    from ftcore.resume import config_fingerprint, fingerprint_diff

    current = config_fingerprint(load_config(None, []))
    older = {k: v for k, v in current.items() if k not in ("loss.base_kl", "optimizer.layer_lr_decay")}
    assert fingerprint_diff(older, current) == []
    changed = config_fingerprint(load_config(None, ["loss.base_kl=0.5"]))
    assert fingerprint_diff(older, changed) == ["loss.base_kl: checkpoint 0.0, this run 0.5"]


@pytest.mark.parametrize("sets, field", [(["optimizer.lr=-1"], "optimizer.lr"),
                                         (["distributed.offload=all"], "distributed.offload"),
                                         (["task=preference"], "data.train.0.format"),
                                         (["data.train=[{path: x.jsonl, format: kto}]"], "data.train.0.format")])
def test_a_config_error_is_typed_and_names_its_field(sets, field):
    """The field at fault travels with the error (not in a message prefix), and the command line labels the line
    by the error's type."""
    from launcher.app import error_line

    with pytest.raises(ConfigError) as error:
        load_config(None, sets)
    assert error.value.field == field and f": {field}: " in str(error.value)
    assert error_line(error.value) == f"config error: {error.value}"
    assert error_line(ValueError("disk full")) == "error: disk full"


def test_a_field_that_moved_out_of_train_still_loads_under_its_old_name_for_one_release(tmp_path):
    """train's optimizer, loss, evaluation and logging fields moved to their own sections; the old names are read
    (YAML and --set), the command line names each with the line that gave it, and both names at once is an error."""
    from ftcore.config import MOVED_FIELDS

    path = write(tmp_path, "train:\n  lr: 0.001\n  log_every: 5\n  report_to: none\n  max_steps: 7\n")
    cfg = load_config(path, ["train.base_kl=0.25"])
    assert (cfg.optimizer.lr, cfg.logging.every, cfg.logging.report_to, cfg.loss.base_kl) == (0.001, 5, [], 0.25)
    assert cfg.renamed_fields() == [("train.lr", "optimizer.lr", f"{path}:2"),
                                    ("train.log_every", "logging.every", f"{path}:3"),
                                    ("train.report_to", "logging.report_to", f"{path}:4"),
                                    ("train.base_kl", "loss.base_kl", "--set")]
    assert cfg == load_config(None, ["optimizer.lr=0.001", "logging.every=5", "logging.report_to=none",
                                     "train.max_steps=7", "loss.base_kl=0.25"])
    proc = ft_in_process("config", str(path))
    assert f"note: {path}:2: train.lr is now optimizer.lr (the old name is read until the next release)" in proc.stderr
    with pytest.raises(ConfigError, match=r"cfg.yaml:2: optimizer.lr: Input should be greater than 0"):
        load_config(write(tmp_path, "train:\n  lr: -1\n"))
    with pytest.raises(ConfigError, match=r"train.lr and optimizer.lr are both set; .* keep optimizer.lr"):
        load_config(write(tmp_path, "train:\n  lr: 0.1\noptimizer:\n  lr: 0.2\n"))
    assert all(load_config(None, [f"{old}={value}"]) for old, value in
               [(o, "1") for o in MOVED_FIELDS
                if not o.endswith(("generate", "report_to", "loss_impl", "eval_every", "warmup_steps"))])


def test_a_checkpoint_written_before_the_fields_moved_resumes():
    """A checkpoint's fingerprint from before the split names train.lr; the same value under optimizer.lr matches."""
    older = {**{k: v for k, v in config_fingerprint(Config()).items()
                if k not in ("optimizer.lr", "loss.base_kl")}, "train.lr": 0.001, "train.base_kl": 0.5}
    same, other = (config_fingerprint(load_config(None, [f"optimizer.lr={lr}", "loss.base_kl=0.5"]))
                   for lr in (0.001, 0.002))
    assert fingerprint_diff(older, same) == []
    assert fingerprint_diff(older, other) == ["optimizer.lr: checkpoint 0.001, this run 0.002"]


EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES_DIR.glob("*.yaml")))
def test_every_example_config_is_valid(example):
    """Each shipped example passes config validation as it is (its task's own checks included)."""
    cfg = load_config(str(EXAMPLES_DIR / example), [])
    assert cfg.output_dir
