"""A cluster's further models and its model aliases, kept in the Redis registry for routers
started on their own (`python -m pdcluster.router --registry`, as the Helm chart runs them):
`pdcluster serve` writes what each model's router needs beyond the first model's settings;
such a router serves the first model from its own flags, the others and the aliases from here."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pdcluster.router.config import ModelAlias, PoolCosts, RouterConfig
from pdcluster.router.registry_values import publish_value, read_value


class ModelEntry(BaseModel):
    """The RouterConfig fields that are each model's own."""

    model_config = ConfigDict(extra="forbid")

    model: str
    engine: dict[str, Any] = Field(default_factory=dict)
    vllm_args: list[str] = Field(default_factory=list)
    cluster_name: str
    cost_per_hour: PoolCosts = Field(default_factory=PoolCosts)


class RegistryModels(BaseModel):
    models: list[ModelEntry] = Field(default_factory=list)  # after the first
    aliases: list[ModelAlias] = Field(default_factory=list)


def _key(cluster_name: str) -> str:
    return f"pdcluster:{cluster_name}:models"


def publish_models(configs: list[RouterConfig]) -> None:
    """Under the first model's cluster name, replacing what was there."""
    first = configs[0]
    entries = [ModelEntry.model_validate(c.model_dump(include=set(ModelEntry.model_fields))) for c in configs[1:]]
    stored = RegistryModels(models=entries, aliases=first.aliases)
    publish_value(first.registry, _key(first.cluster_name), stored.model_dump_json().encode(), "models")


def with_registry_models(config: RouterConfig) -> list[RouterConfig]:
    """`config`'s model, then the registry's further models, each with `config`'s other
    settings; the registry's aliases where `config` gives none."""
    if not config.registry:
        return [config]
    raw = read_value(config.registry, _key(config.cluster_name), "models")
    stored = RegistryModels.model_validate_json(raw) if raw else RegistryModels()
    first = config if config.aliases else config.model_copy(update={"aliases": stored.aliases})
    return [first, *(first.model_copy(update=dict(entry)) for entry in stored.models)]
