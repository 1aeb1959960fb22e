"""Is a model directory whole and self-consistent? Checked before anything loads it (ft train, ft generate,
ft export), so a broken base is one line naming the file and the tensor, never a loader's traceback.

Reads only config.json and the safetensors headers; the shapes config.json implies come from the model built on
the meta device (no memory). Names that transformers renames on load (e.g. mixtral's per-expert tensors on disk,
fused in memory) are not compared; every name both sides have must agree in shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


class BaseModelError(ValueError):
    """A model directory that cannot be what its config.json says; one line."""


def safetensors_shapes(directory: Path) -> Optional[dict[str, tuple[tuple[int, ...], str]]]:
    """name -> (shape, file) over the directory's safetensors weights; None when it has none (e.g. .bin only).
    A shard listed in model.safetensors.index.json that is missing is an error."""
    from ftcore.export.st_io import SafetensorsError, read_model_headers

    try:
        infos, _ = read_model_headers(directory)
    except SafetensorsError as e:
        raise BaseModelError(str(e)) from None
    return {k: (tuple(info.shape), info.path.name) for k, info in infos.items()} or None


def config_shapes(directory: Path) -> Optional[dict[str, tuple[int, ...]]]:
    """Parameter and buffer shapes the model class builds from config.json (on the meta device); None for a
    config transformers has no causal-LM class for."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ftcore.model_geometry import meta_skeleton  # (this module is imported by the torch-free preflight)

    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BaseModelError(f"{directory}/config.json: {first}") from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        return None
    model = meta_skeleton(config)  # (also in a ZeRO-3 training rank, which checks its model dir first)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def check_model_dir(directory: str | Path) -> None:
    """Raise BaseModelError when the directory has no usable config.json, misses a shard, or holds weights of
    other shapes than its config.json describes."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise BaseModelError(f"{directory}: no config.json (not a Hugging Face model directory)")
    on_disk = safetensors_shapes(directory)
    if on_disk is None:
        if not any(directory.glob("*.bin")) and not any(directory.glob("*.pt")):
            raise BaseModelError(f"{directory}: no weights (no .safetensors or .bin files)")
        return
    expected = config_shapes(directory)
    if expected is None:
        return
    for name, (shape, file) in on_disk.items():
        want = expected.get(name)
        if want is not None and want != shape:
            raise BaseModelError(f"{directory}: config.json and the weights disagree: {name} is {list(shape)} in "
                                 f"{file}, config.json makes it {list(want)} (is config.json from another model?)")
