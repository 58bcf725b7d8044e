"""Settings: dataclasses filled from one YAML file plus CLI overrides.

A YAML key that the dataclass does not have is an error naming the key and
the closest valid one; a value of the wrong type is an error naming the key
and the type it should have. Problems are collected and reported together.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .io import TossError

T = TypeVar("T")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise TossError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise TossError(f"{where}: malformed YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TossError(f"{path}: expected a mapping of settings at the top level")
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check (and lightly coerce, e.g. int -> float) `value` against annotation `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            sub: list[str] = []
            out = _coerce(value, arg, key, sub)
            if not sub:
                return out
        problems.append(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
        return value
    if origin is typing.Literal:
        if value not in args:
            problems.append(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {value!r}")
            return value
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return value
        return _build(tp, value, f"{key}.", problems)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(value, tp):
        return value
    problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type[T], data: dict[str, Any], prefix: str, problems: list[str]) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = len(problems)
    kwargs = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{prefix}{key}: unknown setting{hint}")
            continue
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{key}", problems)
    if len(problems) > known:  # a wrong type: its checks in __post_init__ would only add noise
        return None  # type: ignore[return-value]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        problems.append(f"{prefix.rstrip('.') or cls.__name__}: {e}" if prefix else str(e))
        return None  # type: ignore[return-value]


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ["a.b=1", "c=x"] into a nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise TossError(f"--set {pair!r}: expected key=value")
        key, raw = pair.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `over` onto `base` (over wins)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def problems_of(error: TossError, source: str) -> list[str]:
    """The problems a build_config error lists, without its "SOURCE: invalid setting(s)" lead."""
    lines = str(error).splitlines()
    if len(lines) > 1:
        return [line.strip() for line in lines[1:]]
    return [lines[0].removeprefix(f"{source}: invalid setting ")]


def build_config(cls: type[T], *layers: dict[str, Any], source: str = "config") -> T:
    """Build `cls` from dict layers (later ones win: YAML, then CLI flags). Raises TossError."""
    data: dict[str, Any] = {}
    for layer in layers:
        data = merge(data, {k: v for k, v in layer.items() if v is not None})
    problems: list[str] = []
    cfg = _build(cls, data, "", problems)
    if len(problems) == 1:  # the usual case: one line
        raise TossError(f"{source}: invalid setting {problems[0]}")
    if problems:
        raise TossError(f"{source}: invalid settings:\n  " + "\n  ".join(problems))
    return cfg


def layered_settings(cls: type[T], config: str | Path | None, overrides: dict[str, Any] | None,
                     flags: dict[str, Any], required: tuple[str, ...] = (),
                     source: str = "settings") -> T:
    """`cls` from a YAML file, then `--set key=value` overrides, then flags (None: not given).

    The dataclass holds the defaults; the CLI restates none of them. A `required` field
    left empty by every layer is an error naming its flag.
    """
    layers = [read_yaml(config)] if config else []
    settings = build_config(cls, *layers, overrides or {}, flags, source=str(config or source))
    missing = [name for name in required if not getattr(settings, name)]
    if missing:
        raise TossError(" and ".join(f"--{m.replace('_', '-')}" for m in missing)
                        + " required (a flag or a key of --config)")
    return settings


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
