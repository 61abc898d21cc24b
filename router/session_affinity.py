"""Which decode worker each conversation (vLLM's session id) ran on last, so that its next turn
goes back there while that worker has room: its KV, and its host tier's copy, are there."""

from __future__ import annotations

from collections import OrderedDict


class SessionAffinity:
    def __init__(self, capacity: int = 100_000) -> None:
        self._capacity = capacity
        self._workers: OrderedDict[str, str] = OrderedDict()  # session -> decode worker id, oldest first

    def worker_of(self, session_id: str | None) -> str:
        """The decode worker the session's last turn ran on ("" for none, or no session)."""
        return self._workers.get(session_id, "") if session_id else ""

    def ran_on(self, session_id: str | None, worker_id: str) -> None:
        if not session_id:
            return
        self._workers[session_id] = worker_id
        self._workers.move_to_end(session_id)
        while len(self._workers) > self._capacity:
            self._workers.popitem(last=False)
