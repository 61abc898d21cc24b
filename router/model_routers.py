"""The models one endpoint serves: a Router per model (its own workers, flow and metrics),
all sharing the Endpoint (tenants, usage, response cache), and the model aliases over them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pdcluster.router.config import RouterConfig
from pdcluster.router.endpoint import Endpoint
from pdcluster.router.model_aliases import AliasFacts, alias_models, needs_prompt_tokens, prompt_tokens, resolve_alias
from pdcluster.router.router_service import Router


class ModelRouters:
    def __init__(self, configs: Sequence[RouterConfig], memberships: Sequence | None = None) -> None:
        """`configs`: one per model, the first one's endpoint settings (port, keys, tenants,
        cache) serving all; `memberships`: each model's (see Router), or None."""
        if not configs:
            raise ValueError("a router serves at least one model")
        self.routers: list[Router] = []
        self.endpoint = Endpoint(configs[0], lambda: sum(r.cost_per_hour() for r in self.routers))
        for index, config in enumerate(configs):
            self.routers.append(Router(config, self.endpoint, memberships[index] if memberships else None))
        names = [name for router in self.routers for name in router.served_model_names]
        if len(set(names)) != len(names):
            raise ValueError(f"two models are served under one name: {names}")
        for alias in self.endpoint.aliases.values():
            if alias.name in names:
                raise ValueError(f"alias {alias.name}: a served model's name")
            if unknown := alias_models(alias) - set(names):
                raise ValueError(f"alias {alias.name}: picks {sorted(unknown)}, which no model here is served as (served: {names})")

    @property
    def first(self) -> Router:
        return self.routers[0]

    @property
    def served_model_names(self) -> list[str]:
        return [name for router in self.routers for name in router.served_model_names]

    @property
    def model_names(self) -> list[list[str]]:
        """Each model's served names, the first model's first (what a tenant's `models` lists)."""
        return [router.served_model_names for router in self.routers]

    def router_of(self, name: str) -> Router:
        return next(r for r in self.routers if name in r.served_model_names)

    def resolve_alias(self, body: dict, tenant: str, headers: Mapping[str, str]) -> str | None:
        """The served model the alias `body` names picks for it (the decision counted); None
        when its model is not an alias."""
        name = body.get("model")
        alias = self.endpoint.aliases.get(name) if isinstance(name, str) else None
        if alias is None:
            return None
        tokens = prompt_tokens(body, self.router_of(alias.default).flow.tokenizer) if needs_prompt_tokens(alias) else 0
        saturated = {m for m in alias_models(alias) if self.router_of(m).saturated(alias.overflow_at_inflight)}
        decision = resolve_alias(alias, AliasFacts(tokens, tenant, headers), saturated)
        self.endpoint.alias_decisions.labels(alias.name, decision.model, decision.rule).inc()
        return decision.model

    async def start(self) -> None:
        self.endpoint.start()
        for router in self.routers:
            await router.start()

    async def close(self) -> None:
        for router in self.routers:
            await router.close()
        await self.endpoint.close()
