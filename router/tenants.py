"""Who sends a request, and what it may do: API keys map to tenants (the spec's `tenants:` and
--tenants-file's); each tenant has limits on requests at once and on tokens per minute, and
the models it may use. Limits hold across the routers that share a registry: what the others'
requests hold comes in `elsewhere` (router/tenant_load_sync.py). These are decisions only: a
refusal says why and when to come back; the engine client and the front doors act on it."""

from __future__ import annotations

import hmac
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

import yaml
from pydantic import TypeAdapter

from pdcluster.router.config import RouterConfig, TenantConfig

DEFAULT_TENANT = TenantConfig(name="default", api_keys=["-"])  # requests without a tenant: no limits
WINDOW_S = 60


@dataclass(frozen=True)
class Refusal:
    status: HTTPStatus
    reason: str  # a metric label: concurrency, tokens, model
    message: str
    retry_after_s: int | None = None


def configured_tenants(config: RouterConfig) -> list[TenantConfig]:
    """The spec's tenants and the file's, checked: names and keys unique."""
    tenants = list(config.tenants)
    if config.tenants_file:
        listed = yaml.safe_load(Path(config.tenants_file).read_text()) or []
        tenants += TypeAdapter(list[TenantConfig]).validate_python(listed)
    names = Counter(t.name for t in tenants)
    keys = Counter(k for t in tenants for k in t.api_keys)
    if twice := [n for n, c in names.items() if c > 1]:
        raise ValueError(f"tenant names must be unique: {', '.join(twice)} given twice")
    if sum(c > 1 for c in keys.values()) or (config.api_key and config.api_key in keys):
        raise ValueError("an API key may identify one tenant only (and not be the router's own --api-key)")
    return tenants


class TokenWindow:
    """Tokens charged over the last WINDOW_S seconds, in buckets of one wall-clock second (the
    routers sharing a registry add up each other's)."""

    def __init__(self) -> None:
        self._buckets: deque[list[int]] = deque()  # [second, tokens], oldest first

    def add(self, tokens: int, now: float) -> None:
        second = int(now)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += tokens
        else:
            self._buckets.append([second, tokens])

    def buckets(self, now: float) -> list[tuple[int, int]]:
        while self._buckets and self._buckets[0][0] <= now - WINDOW_S:
            self._buckets.popleft()
        return [(second, tokens) for second, tokens in self._buckets]


def seconds_until_under(buckets: list[tuple[int, int]], limit: int, now: float) -> int:
    """Whole seconds until enough of the buckets' tokens age out for them to hold fewer than `limit`."""
    used, ages_out = sum(tokens for _, tokens in buckets), 0.0
    for second, tokens in sorted(buckets):
        if used < limit:
            break
        used -= tokens
        ages_out = second + WINDOW_S - now
    return max(1, math.ceil(ages_out))


@dataclass
class Elsewhere:
    """What the other routers' requests of each tenant hold: requests running or queued, and
    tokens per second over the last minute."""

    open: Counter[str] = field(default_factory=Counter)
    tokens: dict[str, list[tuple[int, int]]] = field(default_factory=dict)


class Tenants:
    def __init__(self, tenants: list[TenantConfig], admin_key: str = "") -> None:
        self.configured = tenants
        self._admin_key = admin_key
        self.open: Counter[str] = Counter()  # requests (samples) admitted or queued here, per tenant
        self._tokens = {t.name: TokenWindow() for t in tenants}
        self.elsewhere = Elsewhere()
        # The tenants with limits: what the routers sharing a registry tell each other of.
        self.limited = [t.name for t in tenants if t.max_concurrent or t.tokens_per_minute]
        self.on_change: Callable[[], None] = lambda: None  # a request started or ended (to tell the other routers)
        # Every key the HTTP layer accepts (vLLM's --api-key list): the router's own and the tenants'.
        self.api_keys = [k for k in [admin_key, *(k for t in tenants for k in t.api_keys)] if k]

    def identify(self, authorization: str) -> TenantConfig | None:
        """The tenant an `Authorization` value names: DEFAULT_TENANT for the router's own key (or
        any request when no key is set); None for a key nobody holds."""
        if not self.api_keys:
            return DEFAULT_TENANT
        if self._admin_key and hmac.compare_digest(authorization, f"Bearer {self._admin_key}"):
            return DEFAULT_TENANT
        for tenant in self.configured:
            if any(hmac.compare_digest(authorization, f"Bearer {key}") for key in tenant.api_keys):
                return tenant
        return None

    def admission_refusal(self, tenant: TenantConfig, n: int, now: float) -> Refusal | None:
        """Why `n` more requests of `tenant` may not start at `now` (time.time()), if they may not."""
        held = self.open[tenant.name] + self.elsewhere.open[tenant.name]
        if tenant.max_concurrent and held + n > tenant.max_concurrent:
            return Refusal(
                HTTPStatus.TOO_MANY_REQUESTS,
                "concurrency",
                f"tenant {tenant.name} has {held} requests running or queued, its limit is {tenant.max_concurrent}; retry later",
                1,
            )
        if tenant.tokens_per_minute:
            buckets = self.token_buckets(tenant.name, now)
            buckets += [b for b in self.elsewhere.tokens.get(tenant.name, []) if b[0] > now - WINDOW_S]
            if sum(tokens for _, tokens in buckets) >= tenant.tokens_per_minute:
                return Refusal(
                    HTTPStatus.TOO_MANY_REQUESTS,
                    "tokens",
                    f"tenant {tenant.name} used its {tenant.tokens_per_minute} tokens per minute; retry later",
                    seconds_until_under(buckets, tenant.tokens_per_minute, now),
                )
        return None

    def token_buckets(self, name: str, now: float) -> list[tuple[int, int]]:
        """The tokens this router charged to a tenant over the last minute, per second."""
        window = self._tokens.get(name)
        return window.buckets(now) if window else []

    @staticmethod
    def model_refusal(tenant: TenantConfig, requested: str | None, models: list[list[str]]) -> Refusal | None:
        """Refused unless the tenant may use the model a request names: any of that model's
        served names (`models`: each model's, the first model's first; none named: the first
        model), or the name itself (an adapter, a model alias)."""
        names = next((names for names in models if requested in names), [requested]) if requested else models[0]
        if not tenant.models or set(names) & set(tenant.models):
            return None
        return Refusal(HTTPStatus.FORBIDDEN, "model", f"tenant {tenant.name} may not use the model {names[0]}")

    def opened(self, tenant: TenantConfig, n: int) -> None:
        self.open[tenant.name] += n
        self.on_change()

    def closed(self, tenant: TenantConfig, n: int) -> None:
        self.open[tenant.name] -= n
        self.on_change()

    def charge(self, tenant: TenantConfig, tokens: int) -> None:
        if tokens and tenant.name in self._tokens:
            self._tokens[tenant.name].add(tokens, time.time())
