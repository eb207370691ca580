"""Checks of configuration values, shared by every section's dataclass: one error type and the messages.

The bottom layer: it imports nothing from patchflow, so models, flows, codecs, text encoders and data can check
their own sections without knowing the run config.
"""
from __future__ import annotations

import dataclasses
import math
import typing


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what is allowed."""


def choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} = {show(value)} is not allowed; choose one of: {', '.join(map(repr, allowed))}")


def positive(key: str, value) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def show(value) -> str:
    """repr for messages: short, and safe for ints too long for repr (over 4300 digits)."""
    try:
        text = repr(value)
    except ValueError:
        text = "<int too large to print>" if isinstance(value, int) else f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def key_name(name: str) -> str:
    """A key or section name for a one-line message: bare when TOML allows it bare, else quoted."""
    bare = name and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)
    return name if bare else show(name)


def check_type(key: str, value, annotation):
    """Return value coerced to the annotated type (int -> float allowed), or raise ConfigError.

    Numbers must be what TOML can hold: integers in 64 bits, floats finite (NaN passes range checks).
    """
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {show(value)}")
        return [check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation in (int, float) and isinstance(value, int) and not isinstance(value, bool) \
            and not -2**63 <= value < 2**63:
        raise ConfigError(f"{key} must be an integer in [-2**63, 2**63), got {show(value)}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, float) and value.is_integer():
        value = int(value)
        if not -2**63 <= value < 2**63:
            raise ConfigError(f"{key} must be an integer in [-2**63, 2**63), got {show(float(value))}")
        return value
    if not isinstance(value, annotation) or (annotation is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key} must be of type {annotation.__name__}, got {show(value)} ({type(value).__name__})")
    if annotation is float and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    return value


def build_section(name: str, cls, values: dict):
    """A section's dataclass from a TOML table: unknown keys and wrong types are ConfigErrors naming name.key."""
    if not isinstance(values, dict):
        raise ConfigError(f"[{name}] must be a table of keys, got {show(values)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown key {name}.{key_name(unknown[0])}; [{name}] accepts: {', '.join(sorted(fields))}")
    return cls(**{k: check_type(f"{name}.{k}", v, hints[k]) for k, v in values.items()})
