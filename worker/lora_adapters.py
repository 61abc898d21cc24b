"""The LoRA adapters a worker's engine serves.

A request names its adapter (name and path, as the router's vLLM layer resolved it); the
worker hands vLLM a LoRARequest under an id of its own for that name and path, since routers
each number adapters their own way and the engine keys adapters by id. The engine loads an
adapter on the first request for it, or at once on LoadLoRA. Which adapters it holds loaded
is refreshed from the engine in the background, for Stats (routers prefer those workers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pdcluster.protos import worker_pb2

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest


class LoRAAdapters:
    def __init__(self) -> None:
        self._ids: dict[tuple[str, str], int] = {}
        self.loaded: list[str] = []

    def request_for(self, adapter: worker_pb2.LoRAAdapter) -> LoRARequest | None:
        """vLLM's LoRARequest for `adapter`; None for the base model (no name)."""
        from vllm.lora.request import LoRARequest

        if not adapter.name:
            return None
        lora_id = self._ids.setdefault((adapter.name, adapter.path), len(self._ids) + 1)
        return LoRARequest(lora_name=adapter.name, lora_int_id=lora_id, lora_path=adapter.path)

    async def refresh(self, engine) -> None:
        names = {lora_id: name for (name, _), lora_id in self._ids.items()}
        self.loaded = sorted({names[i] for i in await engine.list_loras() if i in names})
