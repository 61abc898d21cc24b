"""Command-line flags derived from the pydantic config models, so a setting is declared once.

Each field of a model becomes `--field-name` (its description is the help). A field may
name its flag (`json_schema_extra={"flag": "--worker"}`), an environment variable that stands
in when neither a file nor a flag sets it (`"env"`), or, for a nested model, a prefix for its fields' flags (`"flag_prefix"`;
"" flattens it). Flags left off the command line are left out of the parsed values, so the
model's defaults (or a file's values underneath) stand.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo


def _extra(info: FieldInfo) -> dict:
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}


def _nested_model(annotation) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def add_model_flags(
    parser: argparse.ArgumentParser, model: type[BaseModel], *, exclude: tuple[str, ...] = (), _prefix: str = "", _dest: str = ""
) -> None:
    """Add a flag for every field of `model` (recursively) except those in `exclude`."""
    for name, info in model.model_fields.items():
        if name in exclude:
            continue
        extra = _extra(info)
        nested = _nested_model(info.annotation)
        if nested is not None:
            prefix = extra.get("flag_prefix", f"{name.replace('_', '-')}-")
            add_model_flags(parser, nested, _prefix=_prefix + prefix, _dest=f"{_dest}{name}.")
            continue
        flag = extra.get("flag") or f"--{_prefix}{name.replace('_', '-')}"
        kwargs: dict[str, Any] = dict(dest=_dest + name, help=info.description, default=argparse.SUPPRESS)
        if extra.get("env"):
            kwargs["help"] = f"{info.description or ''} (default: env {extra['env']})".strip()
        kwargs.update(_argument_kind(info.annotation))
        parser.add_argument(flag, **kwargs)


def _argument_kind(annotation) -> dict[str, Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):  # `X | None`: the flag gives an X
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        origin = typing.get_origin(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is list:
        return {"action": "append", "type": typing.get_args(annotation)[0]}
    if origin is Literal:
        return {"choices": list(typing.get_args(annotation))}
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return {"choices": [m.value for m in annotation]}
    if annotation in (int, float, str):
        return {"type": annotation}
    raise TypeError(f"no command-line form for {annotation!r}")


def env_values(model: type[BaseModel]) -> dict[str, Any]:
    """Fields whose environment variable is set, as nested dicts: the lowest layer, under a
    config file or JSON and the flags."""
    values: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        nested = _nested_model(info.annotation)
        if nested is not None:
            if inner := env_values(nested):
                values[name] = inner
        elif (var := _extra(info).get("env")) and os.environ.get(var):
            values[name] = os.environ[var]
    return values


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as nested dicts keyed like the model (`tls.cert` -> {"tls": {"cert"}})."""
    values: dict[str, Any] = {}
    for dest, value in vars(args).items():
        node = values
        *parents, leaf = dest.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return values


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` on top, nested dicts merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
