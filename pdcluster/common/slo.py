"""The latency targets a deployment serves to: the router places each prompt to keep them,
and the benchmarks count the requests within them (DistServe's goodput)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SLO(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttft_ms: float = Field(1000.0, gt=0, description="time to first token, per request (ms)")
    itl_ms: float = Field(20.0, gt=0, description="time per output token after the first (TPOT), per request (ms)")

    @property
    def ttft_s(self) -> float:
        return self.ttft_ms / 1000

    @property
    def itl_s(self) -> float:
        return self.itl_ms / 1000
