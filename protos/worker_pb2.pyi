from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVTransferTarget(_message.Message):
    __slots__ = ("transfer_id", "consumer_endpoint", "consumer_prefix_tokens")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    consumer_endpoint: str
    consumer_prefix_tokens: int
    def __init__(self, transfer_id: _Optional[str] = ..., consumer_endpoint: _Optional[str] = ..., consumer_prefix_tokens: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "target", "sampling_params", "priority", "lora", "pull")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    target: KVTransferTarget
    sampling_params: bytes
    priority: int
    lora: LoRAAdapter
    pull: PeerPull
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., target: _Optional[_Union[KVTransferTarget, _Mapping]] = ..., sampling_params: _Optional[bytes] = ..., priority: _Optional[int] = ..., lora: _Optional[_Union[LoRAAdapter, _Mapping]] = ..., pull: _Optional[_Union[PeerPull, _Mapping]] = ...) -> None: ...

class PeerPull(_message.Message):
    __slots__ = ("worker", "kv_endpoint", "tokens", "held_tokens")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    KV_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HELD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    worker: str
    kv_endpoint: str
    tokens: int
    held_tokens: int
    def __init__(self, worker: _Optional[str] = ..., kv_endpoint: _Optional[str] = ..., tokens: _Optional[int] = ..., held_tokens: _Optional[int] = ...) -> None: ...

class LoRAAdapter(_message.Message):
    __slots__ = ("name", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class PrefillReply(_message.Message):
    __slots__ = ("first_token_id", "num_cached_tokens", "prompt_logprobs")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    num_cached_tokens: int
    prompt_logprobs: bytes
    def __init__(self, first_token_id: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., prompt_logprobs: _Optional[bytes] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling_params", "transfer_id", "producer_kv_endpoint", "reasoning_ended", "reasoning_parser_kwargs", "priority", "lora")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_KV_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    REASONING_ENDED_FIELD_NUMBER: _ClassVar[int]
    REASONING_PARSER_KWARGS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: bytes
    transfer_id: str
    producer_kv_endpoint: str
    reasoning_ended: bool
    reasoning_parser_kwargs: bytes
    priority: int
    lora: LoRAAdapter
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[bytes] = ..., transfer_id: _Optional[str] = ..., producer_kv_endpoint: _Optional[str] = ..., reasoning_ended: _Optional[bool] = ..., reasoning_parser_kwargs: _Optional[bytes] = ..., priority: _Optional[int] = ..., lora: _Optional[_Union[LoRAAdapter, _Mapping]] = ...) -> None: ...

class DecodeChunk(_message.Message):
    __slots__ = ("token_ids", "text", "finish_reason", "num_prompt_tokens", "num_output_tokens", "num_cached_tokens", "logprobs", "prompt_logprobs", "cumulative_logprob", "stop_string", "stop_token_id")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    STOP_STRING_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: str
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    logprobs: bytes
    prompt_logprobs: bytes
    cumulative_logprob: float
    stop_string: str
    stop_token_id: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., num_output_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., logprobs: _Optional[bytes] = ..., prompt_logprobs: _Optional[bytes] = ..., cumulative_logprob: _Optional[float] = ..., stop_string: _Optional[str] = ..., stop_token_id: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("role", "worker_id", "pid", "running", "queued", "free_kv_blocks", "total_kv_blocks", "kv_bytes_sent", "kv_bytes_received", "kv_endpoint", "model", "queued_prefill_tokens", "block_size", "draining", "max_model_len", "kv_transport", "kv_bytes_by_transport", "kv_transfers_by_transport", "prompt_tokens", "generation_tokens", "busy_seconds", "prefill_seconds_p90", "itl_seconds_p90", "metrics_port", "lora_adapters", "kv_compatibility")
    class KvBytesByTransportEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class KvTransfersByTransportEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class KvCompatibilityEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ROLE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    FREE_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    KV_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUEUED_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_BY_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFERS_BY_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_P90_FIELD_NUMBER: _ClassVar[int]
    ITL_SECONDS_P90_FIELD_NUMBER: _ClassVar[int]
    METRICS_PORT_FIELD_NUMBER: _ClassVar[int]
    LORA_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    KV_COMPATIBILITY_FIELD_NUMBER: _ClassVar[int]
    role: str
    worker_id: str
    pid: int
    running: int
    queued: int
    free_kv_blocks: int
    total_kv_blocks: int
    kv_bytes_sent: int
    kv_bytes_received: int
    kv_endpoint: str
    model: str
    queued_prefill_tokens: int
    block_size: int
    draining: bool
    max_model_len: int
    kv_transport: str
    kv_bytes_by_transport: _containers.ScalarMap[str, int]
    kv_transfers_by_transport: _containers.ScalarMap[str, int]
    prompt_tokens: int
    generation_tokens: int
    busy_seconds: float
    prefill_seconds_p90: float
    itl_seconds_p90: float
    metrics_port: int
    lora_adapters: _containers.RepeatedScalarFieldContainer[str]
    kv_compatibility: _containers.ScalarMap[str, str]
    def __init__(self, role: _Optional[str] = ..., worker_id: _Optional[str] = ..., pid: _Optional[int] = ..., running: _Optional[int] = ..., queued: _Optional[int] = ..., free_kv_blocks: _Optional[int] = ..., total_kv_blocks: _Optional[int] = ..., kv_bytes_sent: _Optional[int] = ..., kv_bytes_received: _Optional[int] = ..., kv_endpoint: _Optional[str] = ..., model: _Optional[str] = ..., queued_prefill_tokens: _Optional[int] = ..., block_size: _Optional[int] = ..., draining: _Optional[bool] = ..., max_model_len: _Optional[int] = ..., kv_transport: _Optional[str] = ..., kv_bytes_by_transport: _Optional[_Mapping[str, int]] = ..., kv_transfers_by_transport: _Optional[_Mapping[str, int]] = ..., prompt_tokens: _Optional[int] = ..., generation_tokens: _Optional[int] = ..., busy_seconds: _Optional[float] = ..., prefill_seconds_p90: _Optional[float] = ..., itl_seconds_p90: _Optional[float] = ..., metrics_port: _Optional[int] = ..., lora_adapters: _Optional[_Iterable[str]] = ..., kv_compatibility: _Optional[_Mapping[str, str]] = ...) -> None: ...

class WatchPrefixCacheRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrefixCacheUpdate(_message.Message):
    __slots__ = ("reset", "block_size", "stored", "removed", "tier_stored", "tier_removed")
    RESET_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    TIER_STORED_FIELD_NUMBER: _ClassVar[int]
    TIER_REMOVED_FIELD_NUMBER: _ClassVar[int]
    reset: bool
    block_size: int
    stored: _containers.RepeatedScalarFieldContainer[int]
    removed: _containers.RepeatedScalarFieldContainer[int]
    tier_stored: _containers.RepeatedScalarFieldContainer[int]
    tier_removed: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, reset: _Optional[bool] = ..., block_size: _Optional[int] = ..., stored: _Optional[_Iterable[int]] = ..., removed: _Optional[_Iterable[int]] = ..., tier_stored: _Optional[_Iterable[int]] = ..., tier_removed: _Optional[_Iterable[int]] = ...) -> None: ...

class SwitchRoleRequest(_message.Message):
    __slots__ = ("role",)
    ROLE_FIELD_NUMBER: _ClassVar[int]
    role: str
    def __init__(self, role: _Optional[str] = ...) -> None: ...

class SwitchRoleReply(_message.Message):
    __slots__ = ("role", "drained_seconds")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DRAINED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    role: str
    drained_seconds: float
    def __init__(self, role: _Optional[str] = ..., drained_seconds: _Optional[float] = ...) -> None: ...

class LoadLoRAReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
