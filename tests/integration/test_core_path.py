"""The core path on real vLLM engines: prefill worker -> KV transfer -> decode worker
returns exactly the tokens one plain vLLM engine returns. Over the raw-TCP data channel the
engines run vLLM's compiled default; over NIXL they run eager, like the rest of the suite. Both
are compared with the shared vLLM reference (eager): on a CPU vLLM compiles by tracing with
Dynamo and runs the same kernels, and a compiled plain engine gave the reference's tokens for
every prompt here (2026-12-07), so a compiled engine of its own would only cost a start."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid

import grpc
import msgspec
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdcluster.common.cluster_token import local_cluster_token, local_token_path
from pdcluster.common.ports import free_port
from pdcluster.common.tiny_model.generate import CORPUS
from pdcluster.kv_transfer.kv_transfer_service import KVClient, fetch_kv_stats
from pdcluster.kv_transfer.settings import KVEndpointSettings
from pdcluster.protos import worker_pb2 as wpb
from pdcluster.protos import worker_pb2_grpc as wgrpc

from tests.support.processes import running_pair
from tests.support.tcp_proxy import CorruptingProxy
from tests.support.worker_calls import KV_CHUNK_BYTES, KV_LOAD_TIMEOUT_S, MAX_TOKENS, generate, greedy_params, kv_stats, worker_channel

pytestmark = pytest.mark.slow

# 4 layers x 2 KV heads x 32 dims x (K, V) x float32
TINY_KV_BYTES_PER_TOKEN = 4 * 2 * 32 * 2 * 4
CPU_BLOCK_SIZE = 128  # whole blocks move, the partial last one included
COMPILED_PATH = "tcp"  # the data path whose engines run compiled
# token counts around the CPU block size (128) and the test chunk size (32 tokens)
PROMPT_LENGTHS = [3, 31, 100, 127, 128, 129, 300, 777, 1500]


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    text = CORPUS.read_text()
    ids = tokenizer(text * 3).input_ids
    # Different offsets so prompts do not share prefixes.
    return [ids[i * 37 : i * 37 + n] for i, n in enumerate(PROMPT_LENGTHS)]


@pytest.fixture(scope="module")
def kv_data_proxy():
    """Sits in front of the decode worker's KV data channel; tests arm it to corrupt."""
    port = free_port()
    proxy = CorruptingProxy(f"127.0.0.1:{port}")
    proxy.upstream_port = port
    yield proxy
    proxy.close()


@pytest.fixture(scope="module", params=["tcp", "nixl"])  # torn down before another module starts its engines
def pd_pair(request, model_dir, kv_data_proxy):
    """One prefill and one decode worker process on the tiny model, moving KV over each data path."""
    args = ["--kv-transport", request.param, "--kv-chunk-bytes", str(KV_CHUNK_BYTES), "--kv-load-timeout", str(KV_LOAD_TIMEOUT_S)]
    decode_args = ["--kv-data-port", str(kv_data_proxy.upstream_port), "--kv-data-advertise", kv_data_proxy.address]
    with running_pair(args, args + decode_args, compiled=request.param == COMPILED_PATH) as pair:
        yield pair


@pytest.fixture(scope="module")
def expected(prompts, vllm_reference) -> list[list[int]]:
    """What one plain engine answers."""
    return vllm_reference.greedy(prompts, MAX_TOKENS)


def test_disaggregated_equals_single_engine_one_at_a_time(pd_pair, prompts, expected):
    prefill, decode = pd_pair
    sent_before, received_before = kv_stats(prefill).bytes_sent, kv_stats(decode).bytes_received
    recomputes_before = kv_stats(decode).recomputes
    for prompt, want in zip(prompts, expected):
        tokens, reply, _ = asyncio.run(generate(prefill, decode, prompt))
        assert tokens == want, f"prompt of {len(prompt)} tokens diverged"
        assert reply.first_token_id == want[0]
    # The decode side loaded the prompts' KV (their blocks) rather than recomputing it.
    prompt_kv = sum(-(-len(p) // CPU_BLOCK_SIZE) for p in prompts) * CPU_BLOCK_SIZE * TINY_KV_BYTES_PER_TOKEN
    assert kv_stats(prefill).bytes_sent - sent_before == prompt_kv
    assert kv_stats(decode).bytes_received - received_before == prompt_kv
    assert kv_stats(decode).recomputes == recomputes_before


def test_a_prompt_the_decode_worker_holds_moves_only_the_block_it_lacks(pd_pair, prompts, expected):
    """The decode worker holds the longest prompt's KV from the test above (its prefix cache),
    as it holds a conversation's earlier turns: on every data path only the last block, which
    vLLM does not take from its cache, crosses the link."""
    prefill, decode = pd_pair
    sent_before, received_before = kv_stats(prefill).bytes_sent, kv_stats(decode).bytes_received
    tokens, _, _ = asyncio.run(generate(prefill, decode, prompts[8], decode_holds=len(prompts[8]) - 1))  # as the router would say
    assert tokens == expected[8]
    one_block = CPU_BLOCK_SIZE * TINY_KV_BYTES_PER_TOKEN
    assert kv_stats(decode).bytes_received - received_before == one_block
    assert kv_stats(prefill).bytes_sent - sent_before == one_block


def test_a_prefill_worker_pulls_the_prefix_its_decode_worker_holds_and_computes_only_the_rest(pd_pair, tokenizer, vllm_reference):
    """A conversation's earlier turns are on its decode worker only (computed there); the next
    turn adds more than a short rest. The prefill worker pulls those blocks from the decode
    worker, computes the rest, and sends back only the blocks the decode worker lacks."""
    prefill, decode = pd_pair
    ids = tokenizer(CORPUS.read_text() * 4).input_ids
    # 1500 tokens held, 100 new. No other test's prompt starts there (the corpus repeats every
    # ~665 tokens), so the shared vLLM reference caches no other test's blocks from it.
    earlier, turn = ids[420:1920], ids[420:2020]
    tokens, _, _ = asyncio.run(generate(None, decode, earlier))  # computed on the decode worker alone
    pulled = len(earlier) // CPU_BLOCK_SIZE * CPU_BLOCK_SIZE  # whole blocks
    before = {w.role: kv_stats(w) for w in pd_pair}
    pull = wpb.PeerPull(worker=decode.address, kv_endpoint=decode.kv_endpoint, tokens=pulled)
    tokens, reply, _ = asyncio.run(generate(prefill, decode, turn, decode_holds=pulled, pull=pull))
    assert tokens == vllm_reference.greedy([turn], MAX_TOKENS)[0]
    assert reply.num_cached_tokens == pulled  # none of it computed on the prefill worker
    after = {w.role: kv_stats(w) for w in pd_pair}
    p, d = prefill.role, decode.role
    block = CPU_BLOCK_SIZE * TINY_KV_BYTES_PER_TOKEN
    assert after[p].bytes_received - before[p].bytes_received == pulled // CPU_BLOCK_SIZE * block
    lacking = -(-len(turn) // CPU_BLOCK_SIZE) - pulled // CPU_BLOCK_SIZE  # the turn's blocks past the pulled ones
    assert after[d].bytes_received - before[d].bytes_received == lacking * block
    assert after[d].bytes_sent - before[d].bytes_sent == pulled // CPU_BLOCK_SIZE * block
    assert after[p].recomputes == before[p].recomputes


def test_each_worker_records_when_its_start_steps_happened(pd_pair, request):
    compiled = request.node.callspec.params["pd_pair"] == COMPILED_PATH
    for worker in pd_pair:
        marks = worker.worker.start  # from its ready file
        assert 0 < marks.process < marks.main < marks.engine and marks.placed == 0  # no Ray actor here
        # The compile seconds vLLM counted in the engine's own process, read through its KV endpoint.
        # vLLM counts them in its VLLM_COMPILE mode (GPUs); on a CPU it compiles in another mode
        # (DYNAMO_TRACE_ONCE) and counts nothing, so here a compiled engine's compile stays in its load.
        assert marks.compile_s == kv_stats(worker).engine_compile_seconds
        assert marks.compile_s == 0 or compiled


def test_disaggregated_equals_single_engine_concurrently(pd_pair, prompts, expected):
    prefill, decode = pd_pair

    async def all_at_once():
        return await asyncio.gather(*(generate(prefill, decode, p) for p in prompts))

    results = asyncio.run(all_at_once())
    for (tokens, _, _), want, prompt in zip(results, expected, prompts):
        assert tokens == want, f"prompt of {len(prompt)} tokens diverged under concurrency"


def test_decode_uses_the_transferred_kv(pd_pair, prompts, expected):
    """Feed the decode side another prompt's KV (same length, valid checksums): its
    output must change, which it could not if it recomputed the prompt."""
    prefill, decode = pd_pair
    target, other = prompts[6], list(reversed(prompts[6]))
    tokens, _, _ = asyncio.run(generate(prefill, decode, target, prefill_prompt=other))
    assert tokens != expected[6]


@pytest.mark.parametrize("pd_pair", ["tcp"], indirect=True)  # a proxy on the TCP data channel; NIXL's: test_nixl_transfer
def test_chunk_corrupted_in_flight_is_detected_and_output_stays_exact(pd_pair, kv_data_proxy, prompts, expected):
    prefill, decode = pd_pair
    failures_before = kv_stats(decode).checksum_failures
    # Byte 40,000 of the next data connection lands inside its first 64 KiB payload.
    kv_data_proxy.arm(40_000)
    tokens, _, _ = asyncio.run(generate(prefill, decode, prompts[8]))
    assert kv_data_proxy.corrupted
    assert kv_stats(decode).checksum_failures == failures_before + 1
    assert kv_stats(prefill).send_retries >= 1
    assert tokens == expected[8]


def test_failed_prefill_does_not_hang_decode(pd_pair, prompts, expected):
    """The producer gives up (as the router does when prefill fails): the decode side
    stops waiting at once, recomputes visibly, and still returns the exact tokens."""
    prefill, decode = pd_pair
    recomputes_before = kv_stats(decode).recomputes

    async def run():
        transfer_id = f"kv-{uuid.uuid4().hex}"
        task = asyncio.create_task(generate(prefill, decode, prompts[5], skip_prefill=True, transfer_id=transfer_id))
        while not (await fetch_kv_stats(decode.kv_endpoint)).pending_receives:
            await asyncio.sleep(0.05)
        client = KVClient(KVEndpointSettings(auth_token=local_cluster_token("pdcluster")))  # as a hand-started producer has it
        await client.abort(decode.kv_endpoint, transfer_id, "prefill failed")
        await client.close()
        # well inside the decode side's own deadline: the abort ended the wait
        return await asyncio.wait_for(task, timeout=KV_LOAD_TIMEOUT_S / 2)

    tokens, _, _ = asyncio.run(run())
    assert tokens == expected[5]
    assert kv_stats(decode).recomputes == recomputes_before + 1


def test_short_prompt_bypass_runs_on_decode_alone(pd_pair, prompts, expected):
    prefill, decode = pd_pair
    received_before = kv_stats(decode).bytes_received

    async def run():
        async with worker_channel(decode.address) as dc:
            stream = wgrpc.WorkerStub(dc).Decode(
                wpb.DecodeRequest(request_id="bypass", prompt_token_ids=prompts[1], sampling_params=greedy_params(MAX_TOKENS))
            )
            return [t async for chunk in stream for t in chunk.token_ids]

    assert asyncio.run(run()) == expected[1]
    assert kv_stats(decode).bytes_received == received_before


def test_worker_stats_and_health(pd_pair):
    async def run(worker, service=""):
        async with worker_channel(worker.address) as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service))
            return health, await wgrpc.WorkerStub(ch).Stats(wpb.StatsRequest())

    async def without_token(worker):
        async with grpc.aio.insecure_channel(worker.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await wgrpc.WorkerStub(ch).Stats(wpb.StatsRequest())
            return refused.value.code()

    for worker in pd_pair:
        # Started by hand without --auth-token, yet never open: the user's local token for the cluster.
        assert asyncio.run(without_token(worker)) == grpc.StatusCode.UNAUTHENTICATED
        assert local_token_path("pdcluster").stat().st_mode & 0o777 == 0o600
        health, stats = asyncio.run(run(worker, worker.role))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert stats.role == worker.role and stats.pid == worker.record.pid
        assert stats.total_kv_blocks > 0 and 0 < stats.free_kv_blocks <= stats.total_kv_blocks
        assert stats.kv_endpoint == worker.kv_endpoint
        # Each transfer went over the data path the pair was started with.
        assert set(stats.kv_bytes_by_transport) == set(stats.kv_transfers_by_transport) == {stats.kv_transport}
    prefill, decode = pd_pair
    assert asyncio.run(run(prefill))[1].kv_bytes_sent > 0
    assert asyncio.run(run(decode))[1].kv_bytes_received > 0
    transport = asyncio.run(run(prefill))[1].kv_transport
    for worker, direction in ((prefill, "sent"), (decode, "received")):
        text = urllib.request.urlopen(f"http://127.0.0.1:{worker.record.metrics_port}/metrics", timeout=5).read().decode()
        line = next(row for row in text.splitlines() if row.startswith(f"pdcluster_kv_bytes_{direction}_total"))
        assert f'role="{worker.role}"' in line and float(line.rsplit(" ", 1)[1]) > 0
        by_path = next(
            row for row in text.splitlines() if row.startswith("pdcluster_kv_bytes_total{") and f'direction="{direction}"' in row
        )
        assert f'transport="{transport}"' in by_path and float(by_path.rsplit(" ", 1)[1]) > 0
        assert "pdcluster_worker_running_requests" in text


def test_bad_input_gets_invalid_argument_and_workers_keep_serving(pd_pair, prompts, expected):
    prefill, decode = pd_pair

    async def call(coro_fn):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await coro_fn()
        return info.value.code()

    async def run():
        async with worker_channel(prefill.address) as pc, worker_channel(decode.address) as dc:
            p, d = wgrpc.WorkerStub(pc), wgrpc.WorkerStub(dc)

            async def drain(req):
                async for _ in d.Decode(req):
                    pass

            target = wpb.KVTransferTarget(transfer_id="x", consumer_endpoint=decode.kv_endpoint)
            codes = [
                await call(lambda: p.Prefill(wpb.PrefillRequest(request_id="x", prompt_token_ids=[]))),
                # a prefix sent to a peer is not itself pulled from another
                await call(
                    lambda: d.SendPrefix(
                        wpb.PrefillRequest(
                            request_id="x", prompt_token_ids=[5] * 300, target=target, pull=wpb.PeerPull(worker="x:1", tokens=128)
                        )
                    )
                ),
                await call(lambda: p.Prefill(wpb.PrefillRequest(request_id="x", prompt_token_ids=[1, 2]))),
                await call(lambda: drain(wpb.DecodeRequest(request_id="x", prompt_token_ids=[10**6]))),
                await call(lambda: drain(wpb.DecodeRequest(request_id="x", prompt_token_ids=[5] * 5000))),
                await call(
                    lambda: drain(
                        wpb.DecodeRequest(
                            request_id="x", prompt_token_ids=[5, 6], sampling_params=msgspec.msgpack.encode({"temperature": -1.0})
                        )
                    )
                ),
                await call(
                    lambda: drain(
                        wpb.DecodeRequest(request_id="x", prompt_token_ids=[5, 6], sampling_params=msgspec.msgpack.encode({"top_p": 7.0}))
                    )
                ),
            ]
            return codes

    async def wrong_role_call():
        async with worker_channel(prefill.address) as pc:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in wgrpc.WorkerStub(pc).Decode(wpb.DecodeRequest(request_id="x", prompt_token_ids=[5])):
                    pass
            return info.value.code()

    codes = asyncio.run(run())
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * len(codes)
    assert asyncio.run(wrong_role_call()) == grpc.StatusCode.FAILED_PRECONDITION
    tokens, _, _ = asyncio.run(generate(prefill, decode, prompts[2]))
    assert tokens == expected[2]
