"""vLLM's own OpenAI server on the tiny model (float32, eager, greedy): the reference that
pdcluster's answers must equal, started once per test session and shared by every module
that compares tokens or responses with it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import httpx

from pdcluster.common.vllm_server import start_vllm_server
from pdcluster.worker.config import EngineConfig
from pdcluster.worker.engine_args import engine_environment

from tests.support.processes import EAGER, SMALL_KV, SMALL_KV_BYTES
from tests.support.tiny_lora import ensure_tiny_lora

# Tests that compare tokens run float32 on both sides: vLLM's `auto` would make it 16-bit.
ENGINE_FLAGS = ["--dtype", "float32"]
# LoRA on, for the adapters below (the base model's outputs are bit for bit those without it).
LORA_FLAGS = ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "2"]
# vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, here and in the router under test.
RUNTIME_LORA_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
# vLLM serving flags, given to this server and, where a test compares with it, to the router.
SERVE_FLAGS = ["--enable-auto-tool-choice", "--tool-call-parser", "pythonic", "--enable-prompt-tokens-details"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class VLLMReference:
    def __init__(self, url: str, model: str, serve_flags: list[str], adapters: dict[str, str]) -> None:
        self.url, self.model, self.serve_flags = url, model, serve_flags
        self.adapters = adapters  # the LoRA adapters it serves (--lora-modules): name -> path

    def greedy(self, prompts: list[list[int]], max_tokens: int, ignore_eos: bool = False) -> list[list[int]]:
        """Each prompt's greedy output token ids."""
        outputs = []
        with httpx.Client(base_url=self.url, timeout=300) as http:
            for prompt in prompts:
                body = {
                    "model": self.model,
                    "prompt": prompt,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": ignore_eos,
                    "return_token_ids": True,
                }
                response = http.post("/v1/completions", json=body)
                response.raise_for_status()
                outputs.append(response.json()["choices"][0]["token_ids"])
        return outputs


@contextlib.contextmanager
def running_vllm_reference(model: str, directory: Path):
    template = directory / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    adapters = {name: str(ensure_tiny_lora(model, seed)) for name, seed in (("tiny-lora-a", 1), ("tiny-lora-b", 2))}
    serve_flags = [*SERVE_FLAGS, "--chat-template", str(template), "--lora-modules", *(f"{n}={p}" for n, p in adapters.items())]
    env = {**os.environ, **engine_environment(EngineConfig(kv_cache_memory_bytes=SMALL_KV_BYTES)), **RUNTIME_LORA_ENV}
    server, url = start_vllm_server(
        ["--model", model, "--seed", "0", *ENGINE_FLAGS, *LORA_FLAGS, *EAGER, *SMALL_KV, *serve_flags], env, str(directory / "vllm.log")
    )
    try:
        yield VLLMReference(url, model, serve_flags, adapters)
    finally:
        server.stop()
