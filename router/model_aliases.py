"""Model aliases: a name (e.g. `auto`) that resolves, per request, to a served model by the
alias's rules (prompt length, tenant, headers), with overflow to a fallback model when the
pick is saturated. `resolve_alias` decides from the request's facts alone; the model dispatch
gathers the facts, acts on the decision and counts it."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from pdcluster.router.config import AliasRule, ModelAlias


@dataclass(frozen=True)
class AliasFacts:
    prompt_tokens: int
    tenant: str
    headers: Mapping[str, str]  # names in lower case


@dataclass(frozen=True)
class AliasDecision:
    model: str
    rule: str  # the rule's name, `default`, or `overflow`


def resolve_alias(alias: ModelAlias, facts: AliasFacts, saturated: Collection[str]) -> AliasDecision:
    """The model `alias` picks for a request with `facts`, given the models saturated now."""
    decision = AliasDecision(alias.default, "default")
    for index, rule in enumerate(alias.rules):
        if _holds(rule, facts):
            decision = AliasDecision(rule.model, rule.name or f"rules[{index}]")
            break
    if alias.overflow and decision.model in saturated and alias.overflow not in saturated:
        return AliasDecision(alias.overflow, "overflow")
    return decision


def _holds(rule: AliasRule, facts: AliasFacts) -> bool:
    if facts.prompt_tokens < rule.min_prompt_tokens:
        return False
    if rule.max_prompt_tokens is not None and facts.prompt_tokens > rule.max_prompt_tokens:
        return False
    if rule.tenants and facts.tenant not in rule.tenants:
        return False
    return all(facts.headers.get(name.lower()) == value for name, value in rule.headers.items())


def alias_models(alias: ModelAlias) -> set[str]:
    """Every model the alias may pick."""
    return {alias.default, *(rule.model for rule in alias.rules), *([alias.overflow] if alias.overflow else [])}


def needs_prompt_tokens(alias: ModelAlias) -> bool:
    return any(rule.min_prompt_tokens or rule.max_prompt_tokens is not None for rule in alias.rules)


def prompt_tokens(body: dict, tokenizer) -> int:
    """An OpenAI request's prompt length in tokens, as the rules count it: a completion's prompt
    (text or token ids, one or several); a chat's or a response's text, without the template."""
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, str):
        return len(tokenizer.encode(prompt, add_special_tokens=False))
    if isinstance(prompt, list):
        if all(isinstance(t, int) for t in prompt):
            return len(prompt)
        return sum(prompt_tokens({"prompt": p}, tokenizer) for p in prompt if isinstance(p, (str, list)))
    texts = [m.get("content") for m in body.get("messages") or () if isinstance(m, dict)]
    parts = [p.get("text") for t in texts if isinstance(t, list) for p in t if isinstance(p, dict)]
    return sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in [*texts, *parts] if isinstance(t, str))
