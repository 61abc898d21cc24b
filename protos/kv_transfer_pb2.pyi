from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HeldBlocksRequest(_message.Message):
    __slots__ = ("transfer_id", "auth_token", "wait_ms")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    auth_token: str
    wait_ms: int
    def __init__(self, transfer_id: _Optional[str] = ..., auth_token: _Optional[str] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class HeldBlocksReply(_message.Message):
    __slots__ = ("scheduled", "first_block")
    SCHEDULED_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    scheduled: bool
    first_block: int
    def __init__(self, scheduled: _Optional[bool] = ..., first_block: _Optional[int] = ...) -> None: ...

class NixlTargetRequest(_message.Message):
    __slots__ = ("transfer_id", "auth_token", "producer_agent", "known_agent", "wait_ms", "layout", "dtype", "lease_ms", "compatibility")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_AGENT_FIELD_NUMBER: _ClassVar[int]
    KNOWN_AGENT_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPATIBILITY_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    auth_token: str
    producer_agent: str
    known_agent: str
    wait_ms: int
    layout: str
    dtype: str
    lease_ms: int
    compatibility: str
    def __init__(self, transfer_id: _Optional[str] = ..., auth_token: _Optional[str] = ..., producer_agent: _Optional[str] = ..., known_agent: _Optional[str] = ..., wait_ms: _Optional[int] = ..., layout: _Optional[str] = ..., dtype: _Optional[str] = ..., lease_ms: _Optional[int] = ..., compatibility: _Optional[str] = ...) -> None: ...

class NixlWrittenRequest(_message.Message):
    __slots__ = ("transfer_id", "auth_token", "producer_agent")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_AGENT_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    auth_token: str
    producer_agent: str
    def __init__(self, transfer_id: _Optional[str] = ..., auth_token: _Optional[str] = ..., producer_agent: _Optional[str] = ...) -> None: ...

class LayerSpan(_message.Message):
    __slots__ = ("base", "block_stride", "piece_stride", "pieces", "device")
    BASE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_STRIDE_FIELD_NUMBER: _ClassVar[int]
    PIECE_STRIDE_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    base: int
    block_stride: int
    piece_stride: int
    pieces: int
    device: int
    def __init__(self, base: _Optional[int] = ..., block_stride: _Optional[int] = ..., piece_stride: _Optional[int] = ..., pieces: _Optional[int] = ..., device: _Optional[int] = ...) -> None: ...

class NixlTargetReply(_message.Message):
    __slots__ = ("status", "agent", "agent_metadata", "memory", "layers", "block_ids", "first_block")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        READY: _ClassVar[NixlTargetReply.Status]
        NOT_SCHEDULED: _ClassVar[NixlTargetReply.Status]
        NO_NIXL: _ClassVar[NixlTargetReply.Status]
        COMPLETE: _ClassVar[NixlTargetReply.Status]
    READY: NixlTargetReply.Status
    NOT_SCHEDULED: NixlTargetReply.Status
    NO_NIXL: NixlTargetReply.Status
    COMPLETE: NixlTargetReply.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    status: NixlTargetReply.Status
    agent: str
    agent_metadata: bytes
    memory: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerSpan]
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    first_block: int
    def __init__(self, status: _Optional[_Union[NixlTargetReply.Status, str]] = ..., agent: _Optional[str] = ..., agent_metadata: _Optional[bytes] = ..., memory: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerSpan, _Mapping]]] = ..., block_ids: _Optional[_Iterable[int]] = ..., first_block: _Optional[int] = ...) -> None: ...

class DataChannelRequest(_message.Message):
    __slots__ = ("auth_token",)
    AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    auth_token: str
    def __init__(self, auth_token: _Optional[str] = ...) -> None: ...

class DataChannel(_message.Message):
    __slots__ = ("host", "port")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    host: str
    port: int
    def __init__(self, host: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("header", "payload")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    header: bytes
    payload: bytes
    def __init__(self, header: _Optional[bytes] = ..., payload: _Optional[bytes] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("transfer_id", "bytes_received", "complete")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    bytes_received: int
    complete: bool
    def __init__(self, transfer_id: _Optional[str] = ..., bytes_received: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class AbortTransferRequest(_message.Message):
    __slots__ = ("transfer_id", "reason", "auth_token")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    reason: str
    auth_token: str
    def __init__(self, transfer_id: _Optional[str] = ..., reason: _Optional[str] = ..., auth_token: _Optional[str] = ...) -> None: ...

class AbortTransferReply(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class KVStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KVStats(_message.Message):
    __slots__ = ("bytes_sent", "bytes_received", "send_seconds", "receive_seconds", "transfers_sent", "transfers_received", "transfers_failed", "checksum_failures", "send_retries", "recomputes", "expired_leases", "pending_sends", "pending_receives", "staged_bytes", "bytes_sent_by_transport", "bytes_received_by_transport", "transfers_by_transport", "engine_compile_seconds", "tier_blocks_stored", "tier_blocks_loaded", "tier_checksum_failures")
    class BytesSentByTransportEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class BytesReceivedByTransportEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class TransfersByTransportEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    SEND_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RECEIVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_SENT_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FAILED_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    SEND_RETRIES_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTES_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_LEASES_FIELD_NUMBER: _ClassVar[int]
    PENDING_SENDS_FIELD_NUMBER: _ClassVar[int]
    PENDING_RECEIVES_FIELD_NUMBER: _ClassVar[int]
    STAGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_BY_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_BY_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_BY_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    ENGINE_COMPILE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIER_BLOCKS_STORED_FIELD_NUMBER: _ClassVar[int]
    TIER_BLOCKS_LOADED_FIELD_NUMBER: _ClassVar[int]
    TIER_CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    bytes_sent: int
    bytes_received: int
    send_seconds: float
    receive_seconds: float
    transfers_sent: int
    transfers_received: int
    transfers_failed: int
    checksum_failures: int
    send_retries: int
    recomputes: int
    expired_leases: int
    pending_sends: int
    pending_receives: int
    staged_bytes: int
    bytes_sent_by_transport: _containers.ScalarMap[str, int]
    bytes_received_by_transport: _containers.ScalarMap[str, int]
    transfers_by_transport: _containers.ScalarMap[str, int]
    engine_compile_seconds: float
    tier_blocks_stored: int
    tier_blocks_loaded: int
    tier_checksum_failures: int
    def __init__(self, bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., send_seconds: _Optional[float] = ..., receive_seconds: _Optional[float] = ..., transfers_sent: _Optional[int] = ..., transfers_received: _Optional[int] = ..., transfers_failed: _Optional[int] = ..., checksum_failures: _Optional[int] = ..., send_retries: _Optional[int] = ..., recomputes: _Optional[int] = ..., expired_leases: _Optional[int] = ..., pending_sends: _Optional[int] = ..., pending_receives: _Optional[int] = ..., staged_bytes: _Optional[int] = ..., bytes_sent_by_transport: _Optional[_Mapping[str, int]] = ..., bytes_received_by_transport: _Optional[_Mapping[str, int]] = ..., transfers_by_transport: _Optional[_Mapping[str, int]] = ..., engine_compile_seconds: _Optional[float] = ..., tier_blocks_stored: _Optional[int] = ..., tier_blocks_loaded: _Optional[int] = ..., tier_checksum_failures: _Optional[int] = ...) -> None: ...
