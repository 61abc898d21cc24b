"""vLLM's arguments as pdcluster carries them, never re-declared here: engine arguments as a
dict keyed by vLLM's own AsyncEngineArgs field names, and `vllm serve`'s flags, both read by
vLLM's own parsers and checked by vLLM."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from collections.abc import Sequence
from typing import Any

# Where pdcluster's default differs from vLLM's, and why: a CPU machine's context and batch
# sizes, and repeatable sampling for requests without a seed.
PDCLUSTER_DEFAULTS: dict[str, Any] = {"max_model_len": 4096, "max_num_seqs": 64, "seed": 0}


@functools.cache
def engine_arg_names() -> frozenset[str]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


def check_engine_args(values: dict[str, Any]) -> None:
    """Refuse, by name, a key that is not a vLLM engine argument, and a value vLLM's own parser
    refuses for its flag (ValueError)."""
    if not values:
        return  # nothing to check, and no need to import vLLM for it
    unknown = sorted(set(values) - engine_arg_names())
    if unknown:
        raise ValueError(f"not vLLM engine arguments: {', '.join(unknown)} (the names of `vllm serve --help`, with _ for -)")
    engine_args_from_flags(engine_flags(values))


def engine_flags(values: dict[str, Any]) -> list[str]:
    """Engine arguments as the `vllm serve` flags that set them."""
    flags: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag.removeprefix("--"))
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def engine_args_from_flags(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """vLLM engine flags (`--max-model-len 2048 --dtype float32`, as `vllm serve` takes them)
    as {field: value}, by vLLM's own parser (a value it refuses raises ValueError); returns also
    the flags it does not know."""
    parser, defaults = _engine_parser()
    given, rest = parser.parse_known_args(argv)
    names = engine_arg_names()
    return {k: v for k, v in vars(given).items() if k in names and v != defaults.get(k)}, rest


@functools.cache
def _engine_parser():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(FlexibleArgumentParser):
        def error(self, message):
            raise ValueError(f"vLLM engine arguments: {message}")

    parser = AsyncEngineArgs.add_cli_args(Parser(allow_abbrev=False))
    return parser, vars(parser.parse_args([]))


def vllm_serve_args(model_dir: str, flags: list[str], api_keys: list[str] | None = None) -> argparse.Namespace:
    """`vllm serve MODEL FLAGS`, parsed and checked by vLLM: the model (tokenizer, context
    length, generation defaults) and the serving options (served model names, chat template,
    tool and reasoning parsers, ...), written as a vLLM user writes them."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    args = _serve_parser().parse_args(["--model", model_dir, *flags])
    validate_parsed_serve_args(args)
    if api_keys:
        args.api_key = api_keys
    return args


def split_serve_command_line(argv: Sequence[str]) -> tuple[str, list[str]]:
    """What follows `vllm serve` (less pdcluster's own flags), in any form vLLM takes: the model
    positional or as `--model`, flags in any order, `--flag value` or `--flag=value`. Returns
    (the model, "" if not given; the other flags). A flag's arity comes from vLLM's own serve
    parser, so a flag's value is never taken for the model."""
    actions = _serve_parser()._option_string_actions
    model, flags, tokens = "", [], list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("-") or token == "-":
            if model:
                raise ValueError(f"two models given: {model} and {token}")
            model = token
            continue
        name, has_value, value = token.partition("=")
        if name not in actions and name.replace("_", "-") in actions:  # vLLM takes --max_model_len too
            name = name.replace("_", "-")
            token = name + (f"={value}" if has_value else "")
        action = actions.get(name)
        taken: list[str] = []
        if not has_value and action is not None:
            taken = _values_of(action.nargs, tokens[i:])
            i += len(taken)
        if action is not None and action.dest == "model":  # `--model X`, as vLLM still takes it
            given = value if has_value else (taken[0] if taken else "")
            if model and given != model:
                raise ValueError(f"two models given: {model} and {given}")
            model = given
            continue
        flags += [token, *taken]
    return model, flags


def vllm_config_flags(path: str) -> list[str]:
    """A `vllm serve --config FILE` YAML as the flags it stands for, by vLLM's own reader."""
    return _serve_parser().load_config_file(path)


def _values_of(nargs, rest: list[str]) -> list[str]:
    """The values a flag of this arity takes from the tokens after it."""
    if nargs == 0:
        return []
    if nargs is None or nargs == 1:
        return rest[:1]
    if isinstance(nargs, int):
        return rest[:nargs]
    values = []
    for token in rest:  # "?", "*", "+": up to the next flag
        if token.startswith("-") and token != "-":
            break
        values.append(token)
        if nargs == "?":
            break
    return values


@functools.cache
def _serve_parser():
    """vLLM's own `vllm serve` argument parser."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="pdcluster"))
