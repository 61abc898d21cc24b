"""vLLM's arguments as pdcluster carries them, never re-declared here: engine arguments as a
dict keyed by vLLM's own AsyncEngineArgs field names, and `vllm serve`'s flags, both read by
vLLM's own parsers and checked by vLLM."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
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


def vllm_serve_args(model_dir: str, flags: list[str], api_key: str = "") -> argparse.Namespace:
    """`vllm serve MODEL FLAGS`, parsed and checked by vLLM: the model (tokenizer, context
    length, generation defaults) and the serving options (served model names, chat template,
    tool and reasoning parsers, ...), written as a vLLM user writes them."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser(prog="pdcluster")).parse_args(["--model", model_dir, *flags])
    validate_parsed_serve_args(args)
    if api_key:
        args.api_key = [api_key]
    return args
