"""The connector's scheduler side under vLLM's real Scheduler, with no model running: the
scheduler is stepped by hand and the worker side's reports are fed back as model-runner
outputs, the way vLLM's own kv_connector unit tests drive a connector."""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from pdcluster.kv_transfer.connector_metadata import (
    CONSUME,
    CONSUME_FROM,
    CONSUMER_HOLDS,
    PRODUCE_TO,
    PULL_FROM,
    PULL_ID,
    PULL_TOKENS,
    TRANSFER_ID,
    LoadSpec,
    PdConnectorMetadata,
)

BLOCK_SIZE = 16
NUM_BLOCKS = 64
MAX_BATCHED_TOKENS = 64


def make_scheduler(model_dir: str, kv_role: str) -> Scheduler:
    model_config = ModelConfig(model=model_dir, dtype="float32", seed=0)
    config = VllmConfig(
        model_config=model_config,
        scheduler_config=SchedulerConfig(
            max_num_seqs=8,
            max_num_batched_tokens=MAX_BATCHED_TOKENS,
            max_model_len=1024,
            enable_chunked_prefill=True,
            is_encoder_decoder=False,
        ),
        cache_config=CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=True),
        kv_transfer_config=KVTransferConfig(
            kv_connector="PdConnector",
            kv_connector_module_path="pdcluster.kv_transfer.connector",
            kv_role=kv_role,
            kv_load_failure_policy="recompute",
        ),
        device_config=DeviceConfig("cpu"),
    )
    config.cache_config.num_gpu_blocks = NUM_BLOCKS
    kv_cache_config = KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(["layer"], FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=1, head_size=1, dtype=torch.float32))
        ],
    )
    return Scheduler(
        vllm_config=config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(config),
        block_size=BLOCK_SIZE,
        log_stats=True,
    )


_hasher_ready = False


def make_request(request_id: str, num_tokens: int, kv: dict | None, max_tokens: int = 4) -> Request:
    global _hasher_ready
    if not _hasher_ready:
        init_none_hash(sha256)
        _hasher_ready = True
    params = SamplingParams(max_tokens=max_tokens, extra_args={"kv_transfer_params": kv} if kv else None)
    params.update_from_generation_config({}, 2)
    prompt = [(i * 7 + len(request_id)) % 500 + 10 for i in range(num_tokens)]
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling_params=params,
        pooling_params=None,
        block_hasher=get_request_block_hasher(BLOCK_SIZE, sha256),
    )


def runner_output(reqs: list[Request], **kv_output) -> ModelRunnerOutput:
    """What the model runner returns for a step; a request still prefilling samples nothing."""
    ids = [r.request_id for r in reqs]
    sampled = [[100] if r.num_computed_tokens >= r.num_prompt_tokens else [] for r in reqs]
    return ModelRunnerOutput(
        req_ids=ids,
        req_id_to_index={rid: i for i, rid in enumerate(ids)},
        sampled_token_ids=sampled,
        kv_connector_output=KVConnectorOutput(**kv_output) if kv_output else None,
    )


def free_blocks(scheduler: Scheduler) -> int:
    return scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def assert_empty(scheduler: Scheduler) -> None:
    """No request, and every block back in the pool (one is vLLM's null block)."""
    assert not scheduler.requests and not scheduler.running and not scheduler.waiting
    assert free_blocks(scheduler) == NUM_BLOCKS - 1
    connector = scheduler.connector._scheduler
    assert not connector._producing and not connector._awaiting_send and not connector._load_claimed


def consume(transfer_id: str) -> dict:
    return {TRANSFER_ID: transfer_id, CONSUME: True, CONSUME_FROM: "127.0.0.1:7000"}


def test_consumer_reserves_blocks_and_runs_once_the_kv_arrived(model_dir):
    scheduler = make_scheduler(model_dir, "kv_consumer")
    request = make_request("r1", 40, consume("t1"))
    scheduler.add_request(request)
    out = scheduler.schedule()
    meta = out.kv_connector_metadata
    assert isinstance(meta, PdConnectorMetadata)
    # Three blocks (the partial last one too) reserved for the whole prompt, none computed here.
    assert meta.loads == [LoadSpec("r1", "t1", meta.loads[0].block_ids, 0, "127.0.0.1:7000")] and len(meta.loads[0].block_ids) == 3
    assert request.status == RequestStatus.WAITING_FOR_REMOTE_KVS and out.total_num_scheduled_tokens == 0
    assert free_blocks(scheduler) == NUM_BLOCKS - 1 - 3
    scheduler.update_from_output(out, runner_output([], finished_recving={"r1"}))
    out = scheduler.schedule()
    # The KV is loaded: only the last prompt token runs, to sample the first output token.
    assert out.num_scheduled_tokens == {"r1": 1} and not out.kv_connector_metadata.loads
    for _ in range(request.max_tokens):
        scheduler.update_from_output(out, runner_output([request]))
        out = scheduler.schedule()
    assert request.is_finished()
    scheduler.update_from_output(out, runner_output([]))
    assert_empty(scheduler)


def test_failed_load_is_recomputed(model_dir):
    scheduler = make_scheduler(model_dir, "kv_consumer")
    request = make_request("r2", 40, consume("t2"))
    scheduler.add_request(request)
    out = scheduler.schedule()
    assert len(out.kv_connector_metadata.loads) == 1
    # The worker side reports the load ended and failed (what the receiver does on a deadline or abort).
    scheduler.update_from_output(out, runner_output([], finished_recving={"r2"}, failed_recving={"r2"}))
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"r2": 40}  # the whole prompt, computed locally
    assert not out.kv_connector_metadata.loads  # and it is not asked for again


def test_abort_while_waiting_for_kv_frees_blocks_once_the_load_ends(model_dir):
    scheduler = make_scheduler(model_dir, "kv_consumer")
    request = make_request("r3", 40, consume("t3"))
    scheduler.add_request(request)
    out = scheduler.schedule()
    scheduler.finish_requests("r3", RequestStatus.FINISHED_ABORTED)
    # Chunks may still be landing in its blocks: they stay allocated until the worker side
    # reports the load over (it cancels the transfer when it sees the request finished).
    assert free_blocks(scheduler) < NUM_BLOCKS - 1
    scheduler.update_from_output(out, runner_output([], finished_recving={"r3"}, failed_recving={"r3"}))
    out = scheduler.schedule()
    scheduler.update_from_output(out, runner_output([]))
    assert_empty(scheduler)


def test_abort_before_scheduling_plans_nothing(model_dir):
    scheduler = make_scheduler(model_dir, "kv_consumer")
    scheduler.add_request(make_request("r4", 40, consume("t4")))
    scheduler.finish_requests("r4", RequestStatus.FINISHED_ABORTED)
    out = scheduler.schedule()
    assert not out.kv_connector_metadata.loads
    assert_empty(scheduler)


def test_producer_sends_blocks_as_computed_and_holds_them_until_sent(model_dir):
    scheduler = make_scheduler(model_dir, "kv_producer")
    prompt_len = 100  # two chunked-prefill steps of 64 tokens
    request = make_request("p1", prompt_len, {TRANSFER_ID: "t5", PRODUCE_TO: "127.0.0.1:1", CONSUMER_HOLDS: 48}, max_tokens=1)
    scheduler.add_request(request)
    saves = []
    out = scheduler.schedule()
    while not request.is_finished():
        saves += out.kv_connector_metadata.saves
        scheduler.update_from_output(out, runner_output([request] if out.num_scheduled_tokens else []))
        out = scheduler.schedule()
    # Full blocks as soon as computed (64 tokens: 4 blocks), then the rest with the prompt's end.
    assert [(s.start, s.end, s.first, s.final) for s in saves] == [(0, 4, True, False), (4, 7, False, True)]
    assert all(s.transfer_id == "t5" and s.endpoint == "127.0.0.1:1" for s in saves)
    assert [s.consumer_holds for s in saves] == [48, 0]  # the router's word opens the transfer
    # Delayed free: vLLM keeps the blocks while the transfer reads them.
    assert scheduler.connector.has_pending_push_work()
    assert free_blocks(scheduler) == NUM_BLOCKS - 1 - 7
    scheduler.update_from_output(out, runner_output([], finished_sending={"p1"}))
    out = scheduler.schedule()
    scheduler.update_from_output(out, runner_output([]))
    assert not scheduler.connector.has_pending_push_work()
    assert_empty(scheduler)


def test_a_pulled_prefix_is_loaded_then_the_rest_computed_and_the_whole_prompt_sent(model_dir):
    scheduler = make_scheduler(model_dir, "kv_both")
    prompt_len = 100
    kv = {TRANSFER_ID: "t6", PRODUCE_TO: "127.0.0.1:1", PULL_ID: "t6-pull", PULL_TOKENS: 64, PULL_FROM: "127.0.0.1:2"}
    request = make_request("p2", prompt_len, kv, max_tokens=1)
    scheduler.add_request(request)
    out = scheduler.schedule()
    # Blocks for the pulled 64 tokens (4) are expected from the peer; nothing computes yet.
    (load,) = out.kv_connector_metadata.loads
    assert (load.transfer_id, load.first_block, len(load.block_ids), load.producer) == ("t6-pull", 0, 4, "127.0.0.1:2")
    assert out.total_num_scheduled_tokens == 0 and not out.kv_connector_metadata.saves
    scheduler.update_from_output(out, runner_output([], finished_recving={"p2"}))
    saves = []
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"p2": prompt_len - 64}  # only what the peer did not send
    while not request.is_finished():
        saves += out.kv_connector_metadata.saves
        scheduler.update_from_output(out, runner_output([request] if out.num_scheduled_tokens else []))
        out = scheduler.schedule()
    # The consumer gets every block of the prompt, the pulled ones included, in one step.
    assert [(s.transfer_id, s.start, s.end, s.final) for s in saves] == [("t6", 0, 7, True)]
    scheduler.update_from_output(out, runner_output([], finished_sending={"p2"}))
    out = scheduler.schedule()
    scheduler.update_from_output(out, runner_output([]))
    assert_empty(scheduler)


def test_a_failed_pull_is_computed_and_a_pull_never_takes_the_prompts_last_token(model_dir):
    scheduler = make_scheduler(model_dir, "kv_both")
    kv = {TRANSFER_ID: "t7", PRODUCE_TO: "127.0.0.1:1", PULL_ID: "t7-pull", PULL_TOKENS: 48, PULL_FROM: "127.0.0.1:2"}
    request = make_request("p3", 48, kv, max_tokens=1)  # a pull of the whole prompt: its last token stays here
    scheduler.add_request(request)
    out = scheduler.schedule()
    (load,) = out.kv_connector_metadata.loads
    assert len(load.block_ids) == 3
    scheduler.update_from_output(out, runner_output([], finished_recving={"p3"}, failed_recving={"p3"}))
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"p3": 48} and not out.kv_connector_metadata.loads  # computed, not asked again
    assert [(s.start, s.end, s.final) for s in out.kv_connector_metadata.saves] == [(0, 3, True)]


def test_plain_requests_are_untouched(model_dir):
    scheduler = make_scheduler(model_dir, "kv_consumer")
    request = make_request("plain", 20, None, max_tokens=2)
    scheduler.add_request(request)
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"plain": 20}
    assert not out.kv_connector_metadata.loads and not out.kv_connector_metadata.saves
