"""When each step of a replica's start happened, and the phases between them: from the
decision to start it to the first token it served (the cold start an autoscaler pays).

The marks are wall-clock times (`time.time()`), taken where each step happens: the
controller (the decision), the Ray actor (placement), the worker (process, main, engine),
the router (membership, first route, first token); so they compare across processes on one
host and, with synced clocks, across hosts."""

from __future__ import annotations

from pydantic import BaseModel


class StartMarks(BaseModel):
    """A worker's own marks (0: not taken), with its engine's compile seconds."""

    placed: float = 0.0  # its Ray actor runs on the node it was placed on (0 outside Ray)
    process: float = 0.0  # the worker process began
    main: float = 0.0  # its imports are done; it starts its engine
    engine: float = 0.0  # its engine serves: model loaded, compiled, KV cache allocated
    # torch.compile's part of the engine start, as vLLM counts it: in its VLLM_COMPILE mode only
    # (GPUs). 0 with --enforce-eager, and on a CPU, where the compile stays in the engine load.
    compile_s: float = 0.0


PHASES = ("placement", "process start", "engine load", "compile", "registration", "first route", "first token")


def start_phases(decided: float, marks: StartMarks, joined: float, routed: float, first_token: float) -> dict[str, float]:
    """Seconds per phase, and `total` from the decision to the first token: placement (the
    actor placed and running), process start (spawn and imports), engine load (model and KV
    cache), compile, registration (its Worker service up, the controller and then the router
    taking it as a member), first route (until the router sends it a request) and first token
    (until that request's first token)."""
    placed = marks.placed or marks.process
    engine_s = marks.engine - marks.main
    seconds = {
        "placement": placed - decided,
        "process start": marks.main - placed,
        "engine load": engine_s - marks.compile_s,
        "compile": marks.compile_s,
        "registration": joined - marks.engine,
        "first route": routed - joined,
        "first token": first_token - routed,
    }
    seconds["total"] = first_token - decided
    return {phase: round(s, 2) for phase, s in seconds.items()}
