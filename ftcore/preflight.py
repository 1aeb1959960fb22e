"""Checks that need no torch and no model weights, run by `ft launch` before any process starts and again by
the recipe: a bad path fails in a second with the field named, not after a minute of process start-up."""

from __future__ import annotations

from pathlib import Path

from ftcore.builtin import is_builtin, resolve_data_path
from ftcore.config import Config, ConfigError
from ftcore.data.sources import expand


def is_hub_id(name: str) -> bool:
    """`org/name` that is not a local path: left to transformers (hub or HF cache)."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def check_model_path(name: str) -> None:
    if is_builtin(name) or is_hub_id(name):
        return
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ConfigError(f"config error: model.name_or_path: {name} does not exist or is not a directory")
    if not (path / "config.json").is_file():
        raise ConfigError(f"config error: model.name_or_path: {name} has no config.json "
                          "(not a Hugging Face model directory)")


def check_data_paths(cfg: Config) -> None:
    for section, sources in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval or [])):
        for i, source in enumerate(sources):
            try:
                expand(resolve_data_path(source.path))
            except ValueError as e:  # unknown builtin, missing file, glob matching nothing, empty directory
                raise ConfigError(f"config error: {section}.{i}.path: {e}") from None


def check_inputs(cfg: Config) -> None:
    check_model_path(cfg.model.name_or_path)
    check_data_paths(cfg)
