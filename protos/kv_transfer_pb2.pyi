from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

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
    __slots__ = ("bytes_sent", "bytes_received", "send_seconds", "receive_seconds", "transfers_sent", "transfers_received", "transfers_failed", "checksum_failures", "send_retries", "recomputes", "expired_leases", "pending_sends", "pending_receives", "staged_bytes")
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
    def __init__(self, bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., send_seconds: _Optional[float] = ..., receive_seconds: _Optional[float] = ..., transfers_sent: _Optional[int] = ..., transfers_received: _Optional[int] = ..., transfers_failed: _Optional[int] = ..., checksum_failures: _Optional[int] = ..., send_retries: _Optional[int] = ..., recomputes: _Optional[int] = ..., expired_leases: _Optional[int] = ..., pending_sends: _Optional[int] = ..., pending_receives: _Optional[int] = ..., staged_bytes: _Optional[int] = ...) -> None: ...
