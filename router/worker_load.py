"""What a router has sent one worker and not yet seen finish: its load between two polls.

The router's request flow and the planner's simulator both count through `WorkerLoad`, so
the simulated routing sees exactly the counts the real router sees. Every count is taken
by a reservation and given back by its `release()`, which undoes exactly what it took, once,
however the request ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class DecodeStream:
    """A request streaming from a decode worker through this router: how far it has come."""

    max_tokens: int
    tokens: int = 0
    first_token_at: float | None = None  # monotonic


@dataclass(eq=False)
class WorkerLoad:
    inflight: int = 0  # requests this router has running on the worker
    pending_prefill_tokens: int = 0  # prompt tokens sent to it and not yet computed
    last_picked: float = 0.0  # when this router last routed a request to it (workers equal on the rest take turns)
    streams: set[DecodeStream] = field(default_factory=set)  # requests it decodes for this router

    def picked(self, now: float) -> None:
        self.last_picked = now

    def reserve_prefill(self, prompt_tokens: int) -> PrefillReservation:
        """A prompt sent to the worker to compute and pass on."""
        return PrefillReservation(self, prompt_tokens)

    def reserve_decode(self, max_tokens: int, local_prompt_tokens: int) -> DecodeReservation:
        """A request the worker decodes; `local_prompt_tokens` of its prompt it computes
        itself (0 when a prefill worker does), counted until its first token."""
        return DecodeReservation(self, max_tokens, local_prompt_tokens)

    @property
    def at_rest(self) -> bool:
        return not (self.inflight or self.pending_prefill_tokens or self.streams)


class PrefillReservation:
    def __init__(self, load: WorkerLoad, prompt_tokens: int) -> None:
        self._load, self._tokens = load, prompt_tokens
        load.inflight += 1
        load.pending_prefill_tokens += prompt_tokens
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._load.inflight -= 1
            self._load.pending_prefill_tokens -= self._tokens


class DecodeReservation:
    def __init__(self, load: WorkerLoad, max_tokens: int, local_prompt_tokens: int) -> None:
        self._load = load
        self.stream = DecodeStream(max_tokens)
        self._local_prompt = local_prompt_tokens
        load.inflight += 1
        load.streams.add(self.stream)
        load.pending_prefill_tokens += local_prompt_tokens
        self._held = True

    def tokens(self, count: int, now: float) -> bool:
        """`count` tokens arrived at `now`; True for the request's first token (its prompt is
        computed then, so no longer counted as queued)."""
        first = self.stream.first_token_at is None and count > 0
        if first:
            self.stream.first_token_at = now
            self._load.pending_prefill_tokens -= self._local_prompt
            self._local_prompt = 0
        self.stream.tokens += count
        return first

    def release(self) -> None:
        if self._held:
            self._held = False
            self._load.inflight -= 1
            self._load.streams.discard(self.stream)
            self._load.pending_prefill_tokens -= self._local_prompt
            self._local_prompt = 0
