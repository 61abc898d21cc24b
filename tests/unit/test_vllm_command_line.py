"""Every form `vllm serve` takes works unchanged after `pdcluster serve`: the model positional or
as `--model`, flags in any order, `--flag value` and `--flag=value`, a vLLM `--config` YAML.
Each form is read by vLLM's own `vllm serve` parser too, and both must give the same engine
arguments and the same serving options."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from pdcluster.cli import build_parser
from pdcluster.cluster.cluster_spec import load_cluster_spec
from pdcluster.common.vllm_args import vllm_serve_args

MODEL = "/models/x"
# Serving options (not engine arguments) the router's vLLM layer must see as vLLM does.
SERVING = (
    "served_model_name",
    "enable_auto_tool_choice",
    "tool_call_parser",
    "enable_prompt_tokens_details",
    "chat_template",
    "lora_modules",
)


def vllm_reads(argv: list[str]):
    """`vllm serve ARGV` as vLLM's own command line reads it: (engine arguments, namespace)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(["serve", *argv])
    if args.model_tag is not None:  # as ServeSubcommand.cmd does
        args.model = args.model_tag
    return dataclasses.asdict(AsyncEngineArgs.from_cli_args(args)), args


def pdcluster_reads(argv: list[str]):
    """`pdcluster serve ARGV`: (engine arguments, the router's vLLM namespace, the spec)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    args, rest = build_parser().parse_known_args(["serve", *argv])
    spec = load_cluster_spec(args, rest)
    engine = vars(vllm_serve_args(spec.engine.model, spec.router.vllm_args))
    ours = {**dataclasses.asdict(AsyncEngineArgs(model=spec.engine.model)), **spec.engine.vllm_args}
    return ours, engine, spec


def assert_same(argv: list[str], pdcluster_argv: list[str] | None = None) -> None:
    theirs, their_args = vllm_reads(argv)
    ours, our_args, spec = pdcluster_reads(pdcluster_argv or argv)
    assert spec.engine.model == theirs["model"]
    defaults = vllm_reads([theirs["model"]])[0]
    given = {k for k, v in theirs.items() if v != defaults[k]}  # what the command line set
    assert given - {"model"}  # each form sets some engine argument
    for name in given - {"model"}:
        assert ours.get(name) == theirs[name], name
    for name in SERVING:
        assert our_args[name] == getattr(their_args, name), name


FORMS = {
    "model positional first": [MODEL, "--max-model-len", "2048", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
    "--model, then a flag's value as its own word": [
        "--model",
        MODEL,
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
        "--max-num-seqs",
        "8",
    ],
    "flags first, model last": ["--num-gpu-blocks-override", "40", "--enable-prompt-tokens-details", MODEL],
    "--flag=value throughout": [f"--model={MODEL}", "--max-model-len=1024", "--tool-call-parser=pythonic", "--enable-auto-tool-choice"],
    "underscores, list values": [MODEL, "--max_model_len", "512", "--served-model-name", "a", "b", "--dtype", "float32"],
    "LoRA adapters": [
        MODEL,
        "--enable-lora",
        "--lora-modules",
        "a=/adapters/a",
        "b=/adapters/b",
        "--max-lora-rank",
        "16",
        "--max-loras",
        "2",
    ],
}


@pytest.mark.parametrize("form", FORMS.values(), ids=FORMS.keys())
def test_every_vllm_form_gives_the_engine_arguments_vllm_gives(form):
    assert_same(form)


def test_pdcluster_flags_mix_with_vllms_in_any_order():
    vllm_form = [MODEL, "--max-model-len", "512", "--tool-call-parser", "hermes", "--enable-auto-tool-choice"]
    mixed = ["--prefill", "2", "--max-model-len", "512", "--port", "0", MODEL, "--tool-call-parser", "hermes"]
    mixed += ["--decode-args", "--max-num-seqs 8", "--enable-auto-tool-choice", "--decode", "3"]
    assert_same(vllm_form, mixed)
    spec = pdcluster_reads(mixed)[2]
    assert (spec.prefill.replicas, spec.decode.replicas, spec.router.port) == (2, 3, 0)
    assert spec.decode.engine == {"max_num_seqs": 8} and not spec.prefill.engine


def test_a_vllm_config_file_works_alongside_the_cluster_spec_and_the_command_line_wins(tmp_path):
    vllm_config = tmp_path / "vllm.yaml"
    vllm_config.write_text(
        yaml.safe_dump({"model": MODEL, "max-model-len": 1024, "enable-auto-tool-choice": True, "tool-call-parser": "hermes"})
    )
    cluster_spec = tmp_path / "cluster.yaml"
    cluster_spec.write_text(yaml.safe_dump({"name": "c", "engine": {"max_model_len": 333, "max_num_seqs": 7}, "decode": {"replicas": 2}}))
    # vLLM's own reading: the config's flags, the command line over them.
    assert_same(
        ["--config", str(vllm_config), "--max-model-len", "2048"],
        ["--config", str(cluster_spec), "--config", str(vllm_config), "--max-model-len", "2048"],
    )
    spec = pdcluster_reads(["--config", str(cluster_spec), "--config", str(vllm_config), "--max-model-len", "2048"])[2]
    # The vLLM config beats the cluster spec where both set something; the spec keeps the rest.
    assert spec.engine.max_model_len == 2048 and spec.engine.vllm_args["max_num_seqs"] == 7
    assert spec.name == "c" and spec.decode.replicas == 2
    spec = pdcluster_reads(["--config", str(cluster_spec), "--config", str(vllm_config)])[2]
    assert spec.engine.max_model_len == 1024


def test_two_different_models_are_refused():
    with pytest.raises(ValueError, match="two models"):
        pdcluster_reads([MODEL, "--model", "/models/y"])
