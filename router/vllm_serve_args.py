"""The router's vLLM arguments: `vllm serve`'s own parser and checks."""

from __future__ import annotations

import argparse


def vllm_serve_args(model_dir: str, vllm_args: list[str], api_key: str) -> argparse.Namespace:
    """vLLM's own `vllm serve` arguments, parsed and checked by vLLM: the model (tokenizer,
    context length, generation defaults) and the serving options (served model names, chat
    template, tool and reasoning parsers, ...), written as a vLLM user writes them."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser(prog="pdcluster")).parse_args(["--model", model_dir, *vllm_args])
    validate_parsed_serve_args(args)
    if api_key:
        args.api_key = [api_key]
    return args
