"""Several models behind one endpoint: the spec's models as single-model clusters, the model
aliases' decisions, the prompt length they count, and the registry that hands the models and
aliases to routers started on their own."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pdcluster.cluster.cluster_spec import ClusterSpec
from pdcluster.router.config import AliasRule, ModelAlias, RouterConfig
from pdcluster.router.model_aliases import AliasDecision, AliasFacts, prompt_tokens, resolve_alias
from pdcluster.router.model_registry import publish_models, with_registry_models

AUTO = ModelAlias(
    name="auto",
    rules=[
        AliasRule(name="short", model="small", max_prompt_tokens=100),
        AliasRule(model="big", tenants=["search"], min_prompt_tokens=50),
        AliasRule(name="cheap", model="small", headers={"X-Tier": "cheap"}),
    ],
    default="big",
    overflow="small",
)


def facts(tokens: int = 500, tenant: str = "default", **headers: str) -> AliasFacts:
    return AliasFacts(tokens, tenant, {k.replace("_", "-"): v for k, v in headers.items()})


def test_the_first_rule_that_holds_picks_the_model():
    assert resolve_alias(AUTO, facts(tokens=100), set()) == AliasDecision("small", "short")
    assert resolve_alias(AUTO, facts(tokens=101), set()) == AliasDecision("big", "default")
    assert resolve_alias(AUTO, facts(tenant="search"), set()) == AliasDecision("big", "rules[1]")  # unnamed: its place
    assert resolve_alias(AUTO, facts(tokens=40, tenant="search"), set()) == AliasDecision("small", "short")
    assert resolve_alias(AUTO, facts(x_tier="cheap"), set()) == AliasDecision("small", "cheap")  # header names in any case
    assert resolve_alias(AUTO, facts(x_tier="gold"), set()) == AliasDecision("big", "default")


def test_a_saturated_pick_overflows_unless_the_fallback_is_saturated_too():
    assert resolve_alias(AUTO, facts(), {"big"}) == AliasDecision("small", "overflow")
    assert resolve_alias(AUTO, facts(), {"big", "small"}) == AliasDecision("big", "default")
    assert resolve_alias(AUTO, facts(tokens=10), {"small"}) == AliasDecision("small", "short")  # the fallback's own pick stays
    no_overflow = AUTO.model_copy(update={"overflow": ""})
    assert resolve_alias(no_overflow, facts(), {"big"}) == AliasDecision("big", "default")


def test_prompt_length_counts_completion_and_chat_prompts(tokenizer):
    text = "The river ran past the mill"
    n = len(tokenizer.encode(text, add_special_tokens=False))
    assert prompt_tokens({"prompt": text}, tokenizer) == n
    assert prompt_tokens({"prompt": [text, text]}, tokenizer) == 2 * n
    assert prompt_tokens({"prompt": [1, 2, 3]}, tokenizer) == 3
    assert prompt_tokens({"prompt": [[1, 2], [3]]}, tokenizer) == 3
    chat = {"messages": [{"role": "user", "content": text}, {"role": "user", "content": [{"type": "text", "text": text}]}]}
    assert prompt_tokens(chat, tokenizer) == 2 * n
    assert prompt_tokens({"input": text}, tokenizer) == n  # the Responses API


def test_the_specs_models_are_single_model_clusters_on_one_ray():
    spec = ClusterSpec.model_validate(
        {
            "name": "pd",
            "engine": {"model": "/m/big"},
            "prefill": {"replicas": 2, "cost_per_hour": 3.0},
            "router": {"vllm_args": ["--served-model-name", "big"]},
            "models": [
                {"name": "small", "engine": {"model": "/m/small"}, "prefill": {"replicas": 0}, "decode": {"cost_per_hour": 1.0}},
                {"name": "chat", "engine": {"model": "/m/chat"}, "vllm_args": ["--served-model-name", "chatty", "--chat-template", "t"]},
            ],
        }
    )
    big, small, chat = spec.model_clusters()
    assert (big.name, small.name, chat.name) == ("pd", "pd-small", "pd-chat")
    assert big.models == [] and big.router_config().vllm_args == ["--served-model-name", "big"]
    assert small.prefill.replicas == small.prefill.min_replicas == 0  # co-located: no prefill pool
    config = small.router_config()
    assert (config.model, config.cluster_name, config.vllm_args) == ("/m/small", "pd-small", ["--served-model-name", "small"])
    assert (config.cost_per_hour.prefill, config.cost_per_hour.decode) == (0.0, 1.0)
    assert chat.router_config().vllm_args == ["--served-model-name", "chatty", "--chat-template", "t"]  # its own name kept
    with pytest.raises(ValidationError, match="each name once"):
        ClusterSpec.model_validate({"models": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ValidationError):
        ClusterSpec.model_validate({"models": [{"name": "Not A Name"}]})


def test_routers_on_their_own_read_the_models_and_aliases_from_the_registry(redis_url):
    spec = ClusterSpec.model_validate(
        {
            "name": "reg-models",
            "registry": redis_url,
            "engine": {"model": "/m/big"},
            "router": {"aliases": [AUTO.model_dump()]},
            "models": [{"name": "small", "engine": {"model": "/m/small", "dtype": "float32"}, "decode": {"cost_per_hour": 1.5}}],
        }
    )
    publish_models([m.router_config() for m in spec.model_clusters()])
    own = RouterConfig(registry=redis_url, cluster_name="reg-models", port=0, model="/m/big")
    first, second = with_registry_models(own)
    assert first.aliases == [AUTO] and first.model == "/m/big"
    assert (second.model, second.cluster_name, second.engine) == ("/m/small", "reg-models-small", {"dtype": "float32"})
    assert second.vllm_args == ["--served-model-name", "small"] and second.cost_per_hour.decode == 1.5
    assert second.port == 0 and second.aliases == [AUTO]  # the endpoint's settings are the router's own
    assert with_registry_models(own.model_copy(update={"cluster_name": "none-here"})) == [
        own.model_copy(update={"cluster_name": "none-here"})
    ]
