"""Reading a config: YAML file + `--set` overrides (+ what a launcher derived) -> a validated Config, and every
error as one line naming the field with the YAML line or the --set that gave it. Also the YAML dump and the field
reference the README's table is made from."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from ftcore.config.schema import MOVED_FIELDS, Config, ConfigError, FieldError
from ftcore.run_dir import RunDir


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], value). The value is read as YAML, so `true`, `3`, `[q_proj, v_proj]` work."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optimizer.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply_override(tree: dict, path: list[str], value: Any, text: str) -> None:
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_list_index(part, node, path[: i + 1], text)]
            continue
        if part not in node or node[part] is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {text}: {'.'.join(path[: i + 1])} is a value, not a section")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(last, node, path, text)] = value
    else:
        node[last] = value


def _list_index(part: str, node: list, path: list[str], text: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {text}: {'.'.join(path)}: index must be 0..{len(node) - 1}")
    return int(part)


def _yaml_line(root: Optional[yaml.Node], path: tuple) -> Optional[int]:
    """1-based line of the deepest YAML node on `path` (so an error can say 'config.yaml:12')."""
    node, line = root, None
    for part in path:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(part)]
            if not match:
                break
            key, node = match[0]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _describe(err: dict) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "is required"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    return f"{msg} (got {err.get('input')!r})"


def _section_keys(loc: tuple) -> list[str]:
    """Valid keys at the place an unknown key was found, for the error message."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            for a in args:  # Optional[list[DataSource]]
                inner = getattr(a, "__args__", ())
                model = next((i for i in inner if isinstance(i, type) and issubclass(i, BaseModel)), model)
        if model is None:
            return []
    return sorted(model.model_fields)


def _finding(err: dict) -> tuple[str, tuple, str]:
    """(dotted field, its path, what is wrong) of one pydantic error; a cross-field check names its own field."""
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, FieldError):
        return ctx_error.field, tuple(int(p) if p.isdigit() else p for p in ctx_error.field.split(".")), \
            ctx_error.message
    loc = tuple(err["loc"])
    text = _describe(err)
    if err["type"] == "extra_forbidden":
        keys = _section_keys(loc)
        text += f"; valid keys here: {', '.join(keys)}" if keys else ""
    return ".".join(str(p) for p in loc) or "<top level>", loc, text


def format_validation_error(exc: ValidationError, source: str, yaml_root: Optional[yaml.Node],
                            overridden: dict[tuple, str]) -> str:
    """A pydantic validation error as one line, a part per field, each naming the YAML line or --set that gave
    it."""
    parts = []
    for field, loc, text in map(_finding, exc.errors()):
        where = source
        origin = next((label for o, label in overridden.items() if loc[: len(o)] == o), None)
        if origin is not None:
            where = origin
        else:
            line = _yaml_line(yaml_root, loc)
            if line is not None:
                where = f"{source}:{line}"
        parts.append(f"{where}: {field}: {text}")
    return "; ".join(parts)


def first_field(exc: ValidationError) -> Optional[str]:
    """The dotted field of a validation error's first finding that names one."""
    return next((field for field, loc, _ in map(_finding, exc.errors()) if loc), None)


def _leaf_paths(tree: Any, prefix: str = "") -> set[str]:
    if not isinstance(tree, dict):
        return {prefix.rstrip(".")}
    out = {prefix.rstrip(".")} if prefix else set()
    for key, value in tree.items():
        out |= _leaf_paths(value, f"{prefix}{key}.")
    return out


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None,
                derived: Optional[dict[str, tuple[Any, str]]] = None) -> Config:
    """Read YAML (optional), apply `--set` overrides, validate. Raises ConfigError with a one-line message.
    derived: fields a launcher or DeepSpeed JSON chose (dotted -> (value, where it came from)), applied under the
    YAML and --set (ftcore/launch_settings.py has already checked that they do not contradict them)."""
    tree: dict = {}
    yaml_root = None
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
        try:
            yaml_root = yaml.compose(text)
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    explicit = {dotted: f"{source}:{_yaml_line(yaml_root, tuple(dotted.split('.')))}" for dotted in _leaf_paths(tree)}
    renamed: list[tuple[str, str, str]] = []  # (old name, new name, where) of fields given by a moved name
    for old, new in MOVED_FIELDS.items():
        if old in explicit:
            renamed.append((old, new, explicit[old]))
            if new in explicit:
                raise ConfigError(f"{explicit[old]}: {old} and {new} are both set; {old} is the old name of {new}: "
                                  f"keep {new}", new)
            _move(tree, old, new)
            explicit[new] = explicit.pop(old)
    tree = _merge(Config().model_dump(mode="json"), tree)  # so --set can reach into default lists too
    # A field given by its old name is reported at the line that gave it.
    overridden: dict[tuple, str] = {tuple(new.split(".")): where for _, new, where in renamed}
    for dotted, (value, origin) in (derived or {}).items():
        _apply_override(tree, dotted.split("."), value, dotted)
        overridden[tuple(dotted.split("."))] = origin
    for text in overrides or []:
        keys, value = parse_override(text)
        if ".".join(keys) in MOVED_FIELDS:
            old = ".".join(keys)
            keys = MOVED_FIELDS[old].split(".")
            renamed.append((old, MOVED_FIELDS[old], "--set"))
        _apply_override(tree, keys, value, text)
        overridden[tuple(int(k) if k.isdigit() else k for k in keys)] = "--set"
        explicit[".".join(keys)] = "--set"
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, yaml_root, overridden), first_field(e)) from None
    cfg._explicit = explicit
    cfg._renamed = renamed
    return cfg


def _move(tree: dict, old: str, new: str) -> None:
    """Move the value at dotted `old` of a YAML tree to dotted `new` (an old field name, MOVED_FIELDS)."""
    *parents, leaf = old.split(".")
    node = tree
    for part in parents:
        node = node[part]
    value = node.pop(leaf)
    *parents, leaf = new.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def _merge(base: Any, over: Any) -> Any:
    """`over` on top of `base`: mappings merge key by key, anything else (lists too) replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in over.items()}}
    return over


def run_config_beside(directory: Path) -> Optional[Config]:
    """The ft config saved beside an adapter, export or checkpoint (ft_config.yaml, or the run's config.yaml two
    levels above a step dir), as the typed Config; None where ft wrote none. ConfigError when it does not load."""
    for candidate in (directory / "ft_config.yaml", RunDir(directory.parent.parent).config):
        if candidate.is_file():
            return load_config(candidate)
    return None


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (what config.yaml, ft_config.yaml and `ft config` hold)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def field_docs(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, doc) for every field: the reference table in the README is made from this."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += field_docs(ann, f"{prefix}{name}.")
            continue
        if field.is_required():
            default = "(required)"
        else:
            value = field.get_default(call_default_factory=True)
            if isinstance(value, list):
                value = [v.model_dump(exclude_defaults=True) if isinstance(v, BaseModel) else v for v in value]
            default = repr(value)
        rows.append((prefix + name, default, field.description or ""))
        item = get_args(ann)[0] if get_origin(ann) is list and get_args(ann) else None
        if isinstance(item, type) and issubclass(item, BaseModel):  # list items: document their fields once
            rows += field_docs(item, f"{prefix}{name}[].")
    return rows
