"""`pdcluster simulate`: a discrete-event simulation of a pdcluster cluster (or, with no
prefill replicas, of co-located engines) serving a list of requests.

The router's part runs the router's own code: `pick_decode_worker` and `place_prefill`
(bypass, prefix-aware prefill choice, backlog placement) over `WorkerView`s whose stats are
refreshed every `health_interval_s`, with the router's own between-poll counts (its
`WorkerLoad` reservations, taken and released at the same steps), as the real router sees
its workers. Each replica is a `SimEngine` (vLLM-style continuous
batching); a prompt prefilled remotely reserves blocks on its decode replica, moves its KV
at the profile's transfer rate (overlapping the last prompt step, as per-layer streaming
does), and its first token comes from the decode replica's next step. The decode profile's
measured serving path (`ServingPath`) adds its fixed costs to each request's tokens. With a
host KV tier under every replica (`tier_gib`, as `--kv-offloading-size`), prompts reuse what
their replica's cache has evicted. With `kv-events` routing the router's prefix index learns
what each replica's cache and tier hold, as KV events tell it.
"""

from __future__ import annotations

import collections
import functools
import heapq
import itertools
from dataclasses import dataclass, field

from pdcluster.common.engine_profile import EngineProfile
from pdcluster.common.percentiles import percentiles_ms
from pdcluster.common.worker_record import Role
from pdcluster.planner.sim_engine import SimEngine, SimSequence
from pdcluster.planner.workloads import RequestShape
from pdcluster.protos import worker_pb2
from pdcluster.router.config import RouterConfig
from pdcluster.router.placement_prediction import PlacementPredictor
from pdcluster.router.routing_policy import PrefixIndex, pick_decode_worker, place_prefill
from pdcluster.router.worker_pool import WorkerView


@dataclass
class ClusterShape:
    prefill: EngineProfile | None  # None with prefill_replicas 0: co-located
    decode: EngineProfile
    prefill_replicas: int
    decode_replicas: int
    router: RouterConfig = field(default_factory=RouterConfig)
    # Every replica on the same cores (one machine's local cluster, as `pdcluster serve` starts
    # it there): the engines computing at once share them.
    shared_cores: bool = False
    tier_gib: float = 0.0  # a host KV tier under every replica (vLLM's --kv-offloading-size), GiB; 0: none

    def __post_init__(self) -> None:
        for profile in (self.prefill, self.decode):
            if self.tier_gib and profile is not None and not profile.tier_gbps:
                raise ValueError(f"profile {profile.name} has no host KV tier rate (tier_gbps): measure it again with `pdcluster profile`")

    @property
    def cost_per_hour(self) -> float:
        prefill = self.prefill.cost_per_hour * self.prefill_replicas if self.prefill else 0.0
        return prefill + self.decode.cost_per_hour * self.decode_replicas

    @property
    def gpus(self) -> int:
        prefill = self.prefill.gpus_per_replica * self.prefill_replicas if self.prefill else 0
        return prefill + self.decode.gpus_per_replica * self.decode_replicas


@dataclass
class RequestOutcome:
    request: RequestShape
    arrival: float
    first_token: float = -1.0
    last_token: float = -1.0
    gaps: list[float] = field(default_factory=list)
    placement: str = ""  # remote | short_prompt | no_prefill_worker | prefill_backlog | rejected

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float:
        n = self.request.output_tokens
        return (self.last_token - self.first_token) / (n - 1) if n > 1 else 0.0


class _Replica:
    def __init__(self, role: Role, index: int, profile: EngineProfile, tier_gib: float, prefix_index: PrefixIndex | None) -> None:
        self.engine = SimEngine(f"{role}-{index}", profile, profile.tier_blocks(tier_gib), prefix_index)
        self.view = WorkerView(address=self.engine.worker_id, reachable=True)
        self.role = role
        self.refresh()

    def refresh(self) -> None:
        e = self.engine
        self.view.stats = worker_pb2.WorkerStats(
            role=self.role,
            worker_id=e.worker_id,
            running=len(e.running),
            queued=len(e.waiting) + len(e.awaiting_kv),
            free_kv_blocks=max(0, e.free_blocks),
            total_kv_blocks=e.total_blocks,
            queued_prefill_tokens=e.queued_prefill_tokens if self.role == Role.PREFILL else 0,
            block_size=e.profile.block_size,
            max_model_len=e.profile.max_model_len,
        )


class ClusterSimulation:
    def __init__(self, shape: ClusterShape) -> None:
        self.shape = shape
        self.index = PrefixIndex(shape.router.prefix_index_blocks)
        # Every worker's KV events reach the router with kv-events routing.
        events = self.index if shape.router.prefill_routing == "kv-events" else None
        self.prefills = [_Replica(Role.PREFILL, i, shape.prefill, shape.tier_gib, events) for i in range(shape.prefill_replicas)]
        self.decodes = [_Replica(Role.DECODE, i, shape.decode, shape.tier_gib, events) for i in range(shape.decode_replicas)]
        # With a profile named, the router predicts placements; here from the engines' own profile.
        self.predictor = None
        if shape.router.profile:
            prefill = shape.prefill or shape.decode
            self.predictor = PlacementPredictor(prefill, shape.decode, shape.router.slo, clock=lambda: self.now)
        self._events: list = []
        self._order = itertools.count()
        self.now = 0.0
        self.outcomes: list[RequestOutcome] = []
        self._unfinished = 0
        self._in_system = 0  # arrived, not yet answered
        self._polling = False

    # -- events -------------------------------------------------------------------------

    def _at(self, when: float, action, *args) -> None:
        heapq.heappush(self._events, (when, next(self._order), action, args))

    def run(self, requests: list[RequestShape]) -> list[RequestOutcome]:
        for r in requests:
            self._at(r.arrival_s, self._arrive, r)
        self._unfinished = len(requests)
        while self._events and self._unfinished:
            self.now, _, action, args = heapq.heappop(self._events)
            action(*args)
        return self.outcomes

    def _poll(self) -> None:
        for replica in (*self.prefills, *self.decodes):
            replica.refresh()
        # An idle cluster's stats stay what this poll read; the next arrival resumes polling.
        self._polling = self._in_system > 0
        if self._polling:
            self._at(self.now + self.shape.router.health_interval_s, self._poll)

    def _kick(self, replica: _Replica) -> None:
        engine = replica.engine
        if engine.busy:
            return
        work = engine.next_step()
        if work is None:
            return
        seconds, prompt_seconds = engine.step_seconds(work)
        if self.shape.shared_cores:  # as long as the engines computing now would take, each alone
            sharing = 1 + sum(r.engine.busy for r in (*self.prefills, *self.decodes))
            seconds, prompt_seconds = seconds * sharing, prompt_seconds * sharing
        engine.busy = True
        self._at(self.now + seconds, self._step_done, replica, work, seconds, prompt_seconds)

    def _step_done(self, replica: _Replica, work, seconds: float, prompt_seconds: float) -> None:
        replica.engine.busy = False
        replica.engine.finish_step(work, seconds, prompt_seconds, self.now)
        self._kick(replica)

    # -- one request, as the router routes it ----------------------------------------------

    def _arrive(self, request: RequestShape) -> None:
        outcome = RequestOutcome(request, self.now)
        self.outcomes.append(outcome)
        if not all(p.holds(request.input_tokens, request.output_tokens) for p in (self.shape.prefill, self.shape.decode) if p):
            outcome.placement = "rejected"  # the router's 400: it counts against SLO attainment
            self._unfinished -= 1
            return
        self._in_system += 1
        if not self._polling:
            self._poll()
        hashes_for = functools.cache(request.block_hashes)
        decode = self._by_view(
            self.decodes, pick_decode_worker([d.view for d in self.decodes], request.input_tokens + request.output_tokens)
        )
        placement = place_prefill(
            [p.view for p in self.prefills], decode.view, request.input_tokens, self.index, hashes_for, self.shape.router, self.predictor
        )
        decode.view.load.picked(self.now)
        local_prompt = 0 if placement.worker else request.input_tokens  # queued on the decode worker, as the router counts it
        reservation = decode.view.load.reserve_decode(request.output_tokens, local_prompt)

        # The serving path delays the first token, and each later one a little more.
        path = self.shape.decode.serving_path
        delay = path.first_token_s(remote=placement.worker is not None)

        def on_token(seq: SimSequence, now: float) -> None:
            nonlocal delay
            if reservation.tokens(1, now):
                outcome.first_token = now + delay
                if placement.chosen is not None:
                    self.predictor.observe(placement.chosen.choice, placement.chosen.ttft_s, outcome.ttft)
            else:
                delay += path.token_s
                outcome.gaps.append(now + delay - outcome.last_token)
            outcome.last_token = now + delay

        def on_answered(seq: SimSequence, now: float) -> None:
            reservation.release()
            self._unfinished -= 1
            self._in_system -= 1

        if placement.worker is None:
            outcome.placement = placement.bypass
            decode.engine.waiting.append(SimSequence(request, 0, False, on_answered, on_token, hashes_for=hashes_for))
            self._kick(decode)
            return
        outcome.placement = "remote"
        prefill = self._by_view(self.prefills, placement.worker)
        prefill.view.load.picked(self.now)
        prefill_reservation = prefill.view.load.reserve_prefill(request.input_tokens)
        # The decode worker holds the request from now on, allocating its blocks in turn.
        consumer = SimSequence(request, request.input_tokens - 1, False, on_answered, on_token, kv_ready=False)
        consumer.computed = request.input_tokens - 1
        decode.engine.waiting.append(consumer)
        self._kick(decode)

        def on_prefilled(seq: SimSequence, now: float) -> None:
            prefill_reservation.release()
            # Layers stream while the prompt computes: what is left is the part the steps did not hide.
            # Blocks the decode worker holds are not sent.
            transfer = self.shape.prefill.transfer_seconds(request.input_tokens - placement.decode_held_tokens)
            tail = max(self.shape.prefill.transfer_latency_s, transfer - seq.prompt_seconds)
            self._at(now + tail, self._landed, prefill, seq, decode, consumer)

        produced = SimSequence(request, 0, True, on_prefilled, hashes_for=hashes_for)
        pull = placement.pull
        if pull is None:
            self._start_prefill(prefill, produced)
            return
        # A pulled prefix is present once the peer has sent it (the peer's own step for it is
        # not charged to the peer's engine: one block, beside its queue).
        produced.pulled = pull.tokens
        self._at(
            self.now + self.shape.prefill.pull_seconds(pull.tokens, pull.tokens - pull.held_tokens), self._start_prefill, prefill, produced
        )

    def _start_prefill(self, prefill: _Replica, produced: SimSequence) -> None:
        prefill.engine.waiting.append(produced)
        self._kick(prefill)

    def _landed(self, prefill: _Replica, produced: SimSequence, decode: _Replica, consumer: SimSequence) -> None:
        # vLLM's delayed free: the prompt's blocks stay held until the consumer has its KV
        # (staged by the consumer if it has not allocated blocks yet).
        prefill.engine.release(produced)
        self._kick(prefill)
        decode.engine.kv_landed(consumer)
        self._kick(decode)

    @staticmethod
    def _by_view(replicas: list[_Replica], view: WorkerView) -> _Replica:
        return next(r for r in replicas if r.view is view)


def within_slos(outcome: RequestOutcome, slo_ttft_ms: float, slo_itl_ms: float) -> bool:
    """bench serve's test: TTFT within its SLO and the request's TPOT within the ITL SLO."""
    return outcome.ttft * 1e3 <= slo_ttft_ms and outcome.tpot * 1e3 <= slo_itl_ms


def report(sim: ClusterSimulation, slo_ttft_ms: float, slo_itl_ms: float) -> dict:
    """Latency percentiles (keys as in bench serve's JSON), SLO attainment, utilization per
    pool and cost per 1M tokens (the cluster's whole cost over the tokens of each kind)."""
    done = [o for o in sim.outcomes if o.last_token >= 0]
    start = min(o.arrival for o in sim.outcomes)
    duration = max((o.last_token for o in done), default=start) - start
    hours = duration / 3600
    input_tokens = sum(o.request.input_tokens for o in done)
    output_tokens = sum(o.request.output_tokens for o in done)
    pools = {}
    for role, replicas, profile in ((Role.PREFILL, sim.prefills, sim.shape.prefill), (Role.DECODE, sim.decodes, sim.shape.decode)):
        if not replicas:
            continue
        busy = sum(r.engine.busy_seconds for r in replicas)
        prompt = sum(r.engine.prompt_seconds for r in replicas)
        pools[str(role)] = {
            "replicas": len(replicas),
            "tensor_parallel_size": profile.tensor_parallel_size,
            "utilization": round(busy / (duration * len(replicas)), 4) if duration else 0.0,
            "prompt_share_of_busy": round(prompt / busy, 4) if busy else 0.0,
            "cost_per_hour": round(profile.cost_per_hour * len(replicas), 4),
        }
    cost = sim.shape.cost_per_hour * hours
    prompt_tokens = {
        k: sum(r.engine.prompt_tokens[k] for r in (*sim.prefills, *sim.decodes)) for k in ("engine_cache", "tier", "peer", "computed")
    }
    all_prompt_tokens = sum(prompt_tokens.values())
    good = [o for o in done if within_slos(o, slo_ttft_ms, slo_itl_ms)]
    return {
        "requests": len(sim.outcomes),
        "completed": len(done),
        "duration_s": round(duration, 3),
        "req_per_s": round(len(done) / duration, 4) if duration else 0.0,
        "output_tok_per_s": round(output_tokens / duration, 2) if duration else 0.0,
        "ttft_ms": percentiles_ms([o.ttft for o in done]),
        "itl_ms": percentiles_ms([g for o in done for g in o.gaps]),
        "tpot_ms": percentiles_ms([o.tpot for o in done]),
        "e2e_ms": percentiles_ms([o.last_token - o.arrival for o in done]),
        "slo": {"ttft_ms": slo_ttft_ms, "itl_ms": slo_itl_ms},
        "slo_attainment": round(len(good) / len(sim.outcomes), 4),
        "placements": dict(collections.Counter(o.placement for o in sim.outcomes)),
        # Where the prompts' tokens came from: a replica's cache, its host KV tier, a peer (pulled), or computed.
        "prompt_tokens": prompt_tokens,
        "prefix_hit_rate": round(1 - prompt_tokens["computed"] / all_prompt_tokens, 4) if all_prompt_tokens else 0.0,
        "pools": pools,
        "gpus": sim.shape.gpus,
        "cost_per_hour": round(sim.shape.cost_per_hour, 4),
        "cost_usd": round(cost, 6),
        "cost_usd_per_million_tokens": {
            "input": round(cost / input_tokens * 1e6, 6) if input_tokens else None,
            "output": round(cost / output_tokens * 1e6, 6) if output_tokens else None,
        },
    }


def simulate(shape: ClusterShape, requests: list[RequestShape], slo_ttft_ms: float, slo_itl_ms: float) -> dict:
    sim = ClusterSimulation(shape)
    sim.run(requests)
    return report(sim, slo_ttft_ms, slo_itl_ms)
