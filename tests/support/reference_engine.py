"""A plain single vLLM engine (no connector, no disaggregation): the reference that
disaggregated outputs must equal token for token. Runs as its own process:

    python -m tests.support.reference_engine PROMPTS_JSON OUT_JSON MAX_TOKENS COMPILED(True|False) [IGNORE_EOS(True|False)]
"""

import json
import sys

from pdcluster.worker.config import EngineConfig
from pdcluster.worker.engine_args import engine_kwargs, prepare_environment


def main(prompts_path: str, out_path: str, max_tokens: int, compiled: bool, ignore_eos: bool) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    engine = EngineConfig() if compiled else EngineConfig(enforce_eager=True)
    prepare_environment(engine)
    llm = LLM(**engine_kwargs(engine))
    with open(prompts_path) as f:
        prompts = json.load(f)
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts],
        SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos),
    )
    with open(out_path, "w") as f:
        json.dump([list(o.outputs[0].token_ids) for o in outputs], f)


if __name__ == "__main__":  # vLLM's CPU backend spawns processes
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "True", sys.argv[5:] == ["True"])
