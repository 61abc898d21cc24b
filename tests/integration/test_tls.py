"""TLS and mutual TLS on every connection, with certificates generated here: clients,
router, workers and the KV transfer (control RPCs and the raw-TCP data channel) all
refuse peers without a certificate from the cluster's CA."""

from __future__ import annotations

import asyncio
import ssl

import grpc
import httpx
import pytest

from pdcluster.common.tiny_model.generate import CORPUS
from pdcluster.common.tls import TLSFiles
from pdcluster.common.worker_auth import token_metadata
from pdcluster.kv_transfer.kv_transfer_service import fetch_kv_stats
from pdcluster.kv_transfer.tcp_transport import push_over_tcp
from pdcluster.protos import inference_pb2 as ipb
from pdcluster.protos import inference_pb2_grpc as igrpc
from pdcluster.protos import kv_transfer_pb2 as kpb
from pdcluster.protos import worker_pb2 as wpb
from pdcluster.protos import worker_pb2_grpc as wgrpc

from tests.support.certificates import make_certificates
from tests.support.processes import running_pair, start_router
from tests.support.vllm_reference import ENGINE_FLAGS

pytestmark = pytest.mark.slow

TOKEN = "cluster-secret"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, TLSFiles]:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def tls_args(tls: TLSFiles) -> list[str]:
    return ["--tls-cert", tls.cert, "--tls-key", tls.key, "--tls-ca", tls.ca]


@pytest.fixture(scope="module")
def tls_cluster(certs):
    args = tls_args(certs["member"]) + ["--auth-token", TOKEN, *ENGINE_FLAGS]
    with running_pair(args, args) as (prefill, decode):
        router = start_router([prefill.address, decode.address], tls_args(certs["member"]) + ["--worker-token", TOKEN])
        try:
            yield router, prefill, decode
        finally:
            router.stop()


def test_requests_flow_over_mutual_tls_with_exact_tokens(tls_cluster, certs, tokenizer, vllm_reference):
    router, prefill, decode = tls_cluster
    member = certs["member"]
    assert router.record.http.startswith("https://")
    prompt_ids = tokenizer(CORPUS.read_text()).input_ids[:300]
    with httpx.Client(base_url=router.record.http, verify=ssl.create_default_context(cafile=member.ca), timeout=120) as http:
        assert http.get("/health").status_code == 200
        reply = http.post("/v1/completions", json={"prompt": prompt_ids, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
        assert reply.status_code == 200, reply.text
    kv = asyncio.run(fetch_kv_stats(decode.kv_endpoint, tls=member))
    assert kv.bytes_received > 0 and kv.recomputes == 0  # the KV went over the TLS data channel
    with grpc.secure_channel(router.record.grpc, grpc.ssl_channel_credentials(open(member.ca, "rb").read())) as channel:
        tokens = list(
            igrpc.InferenceStub(channel)
            .Complete(ipb.GenerateRequest(prompt_token_ids=prompt_ids, max_tokens=16, temperature=0.0, ignore_eos=True))
            .token_ids
        )
    assert tokens == vllm_reference.greedy([prompt_ids], 16, ignore_eos=True)[0]


def _worker_stats(address: str, credentials) -> wpb.WorkerStats:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        return wgrpc.WorkerStub(channel).Stats(wpb.StatsRequest(), timeout=10, metadata=token_metadata(TOKEN))


def test_workers_refuse_peers_without_a_cluster_certificate(tls_cluster, certs):
    _, prefill, decode = tls_cluster
    member, outsider = certs["member"], certs["outsider"]
    ca = open(member.ca, "rb").read()
    assert _worker_stats(decode.address, member.channel_credentials()).role == "decode"
    for credentials in (None, grpc.ssl_channel_credentials(ca), outsider.channel_credentials()):
        with pytest.raises(grpc.RpcError) as e:  # plaintext, no client certificate, a stranger's certificate
            _worker_stats(decode.address, credentials)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError):
        asyncio.run(fetch_kv_stats(decode.kv_endpoint, timeout=5, tls=outsider))
    stats = asyncio.run(fetch_kv_stats(decode.kv_endpoint, tls=member))  # a member's certificate reads them
    assert stats.pending_receives == 0 and stats.transfers_failed == 0


def test_kv_data_channel_refuses_plaintext_and_strangers(tls_cluster, certs):
    _, prefill, decode = tls_cluster
    member, outsider = certs["member"], certs["outsider"]

    async def data_channel() -> tuple[str, int]:
        from pdcluster.common.tls import open_channel

        async with open_channel(decode.kv_endpoint, member) as channel:
            call = channel.unary_unary(
                "/pdcluster.v1.KVTransfer/OpenDataChannel",
                request_serializer=kpb.DataChannelRequest.SerializeToString,
                response_deserializer=kpb.DataChannel.FromString,
            )
            reply = await call(kpb.DataChannelRequest(auth_token="cluster-secret"), timeout=10)
        return reply.host, reply.port

    host, port = asyncio.run(data_channel())

    async def no_chunks():
        return
        yield

    for context in (None, outsider.client_context()):
        with pytest.raises(OSError):  # the consumer hangs up: no status frame comes back
            asyncio.run(push_over_tcp(host, port, no_chunks(), 10, context))
    assert asyncio.run(push_over_tcp(host, port, no_chunks(), 10, member.client_context())) == ("OK", "")
