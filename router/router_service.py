"""The router's parts wired together, and what both front doors (HTTP, gRPC) share:
model checks, tokenization and turning a validated request into a GenerationRequest."""

from __future__ import annotations

import json
import os
import uuid

from pdcluster.common.cluster_token import local_cluster_token
from pdcluster.common.tiny_model.generate import ensure_tiny_model
from pdcluster.common.worker_auth import token_metadata
from pdcluster.router.config import RouterConfig
from pdcluster.router.errors import InvalidRequest, ModelNotFound
from pdcluster.router.membership import MembershipFollower, follow_registry
from pdcluster.router.metrics import RouterMetrics
from pdcluster.router.prompt_builder import PromptBuilder, fit_max_tokens
from pdcluster.router.request_flow import GenerationRequest, RequestFlow
from pdcluster.router.request_schemas import SamplingFields
from pdcluster.router.worker_pool import WorkerPool


class Router:
    def __init__(self, config: RouterConfig, membership=None) -> None:
        """`membership`: an async callable returning worker addresses (the cluster
        controller's view); without it, the Redis registry or the fixed `config.workers`."""
        self.config = config
        self.model_dir = config.model or str(ensure_tiny_model())
        self.model_name = config.served_model_name or os.path.basename(os.path.normpath(self.model_dir))
        self.prompts = PromptBuilder(self.model_dir)
        self.pool = WorkerPool(
            config.workers,
            config.health_interval_s,
            config.tls,
            on_departed=self._forget,
            health_timeout_s=config.health_timeout_s,
            unhealthy_after=config.unhealthy_after,
        )
        # Without a token or a registry to read it from: the one workers started by hand on this machine share.
        token = config.worker_token or ("" if config.registry else local_cluster_token(config.cluster_name))
        self.pool.metadata = token_metadata(token)
        self.metrics = RouterMetrics(self.pool)
        self.flow = RequestFlow(self.pool, config, self.metrics, self.prompts.tokenizer)
        self._model_max_len = _model_max_len(self.model_dir)
        self._membership = membership
        self._follower: MembershipFollower | None = None
        self._registry = None

    def _forget(self, worker) -> None:
        """A worker left the membership: its cached prefixes left with it."""
        self.flow.prefix_index.forget(worker.worker_id)

    async def start(self) -> None:
        cfg = self.config
        if cfg.registry:
            self._follower, self._registry = follow_registry(
                self.pool,
                self.flow.prefix_index,
                cfg.registry,
                cfg.cluster_name,
                cfg.health_interval_s,
                follow_token=not cfg.worker_token,
            )
        elif self._membership is not None:
            self._follower = MembershipFollower(self.pool, self._membership, cfg.health_interval_s)
        if self._follower is not None:
            await self._follower.start()
        await self.pool.start()

    async def close(self) -> None:
        if self._follower is not None:
            await self._follower.close()
        if self._registry is not None:
            await self._registry.close()
        await self.pool.close()

    @property
    def max_model_len(self) -> int:
        """The smallest context any worker serves (they may be configured apart)."""
        lens = [w.stats.max_model_len for w in self.pool.workers() if w.stats and w.stats.max_model_len]
        return min(lens) if lens else self._model_max_len

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise ModelNotFound(
                f"The model `{model}` does not exist; this server serves `{self.model_name}`", code="model_not_found", param="model"
            )

    def check_n(self, n: int) -> None:
        if n > self.config.max_n:
            raise InvalidRequest(f"n must be at most {self.config.max_n}", param="n")

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return self.prompts.from_text(prompt) if isinstance(prompt, str) else self.prompts.from_token_ids(prompt)

    def new_request(self, prompt_ids: list[int], fields: SamplingFields, max_tokens: int | None, request_id: str = "") -> GenerationRequest:
        budget = fit_max_tokens(len(prompt_ids), max_tokens, self.max_model_len)
        return GenerationRequest(
            request_id=request_id or uuid.uuid4().hex,
            prompt_token_ids=prompt_ids,
            sampling=fields.sampling_options(budget),
        )

    def describe_model(self) -> dict:
        return {
            "id": self.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "pdcluster",
            "root": self.model_dir,
            "max_model_len": self.max_model_len,
        }


def _model_max_len(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        return int(json.load(f).get("max_position_embeddings", 4096))
