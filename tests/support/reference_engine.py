"""A plain single vLLM engine (no connector, no disaggregation): the reference that
disaggregated outputs must equal token for token. Runs as its own process:

    python -m tests.support.reference_engine REQUESTS_JSON OUT_JSON COMPILED(True|False)

REQUESTS_JSON: a list of {"prompt": [token ids], "max_tokens": N, "ignore_eos": bool}, so one
engine start answers requests of several lengths.
"""

import json
import sys

from pdcluster.worker.config import EngineConfig
from pdcluster.worker.engine_args import engine_kwargs, prepare_environment


def main(requests_path: str, out_path: str, compiled: bool) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    engine = EngineConfig() if compiled else EngineConfig(enforce_eager=True)
    prepare_environment(engine)
    llm = LLM(**engine_kwargs(engine))
    with open(requests_path) as f:
        requests = json.load(f)
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=r["prompt"]) for r in requests],
        [SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=r["ignore_eos"]) for r in requests],
    )
    with open(out_path, "w") as f:
        json.dump([list(o.outputs[0].token_ids) for o in outputs], f)


if __name__ == "__main__":  # vLLM's CPU backend spawns processes
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "True")
