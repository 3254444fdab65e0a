from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "seed", "stop_token_ids", "top_k", "top_p", "logprobs", "position_offset")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    POSITION_OFFSET_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_k: int
    top_p: float
    logprobs: bool
    position_offset: int
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., logprobs: _Optional[bool] = ..., position_offset: _Optional[int] = ...) -> None: ...

class PageDescriptor(_message.Message):
    __slots__ = ("addr", "length", "device_id")
    ADDR_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    addr: int
    length: int
    device_id: int
    def __init__(self, addr: _Optional[int] = ..., length: _Optional[int] = ..., device_id: _Optional[int] = ...) -> None: ...

class Reservation(_message.Message):
    __slots__ = ("request_id", "worker_id", "epoch", "agent_name", "agent_metadata", "mem_type", "page_ids", "pages", "layout_fingerprint", "lease_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    MEM_TYPE_FIELD_NUMBER: _ClassVar[int]
    PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    worker_id: str
    epoch: int
    agent_name: str
    agent_metadata: bytes
    mem_type: str
    page_ids: _containers.RepeatedScalarFieldContainer[int]
    pages: _containers.RepeatedCompositeFieldContainer[PageDescriptor]
    layout_fingerprint: str
    lease_s: float
    def __init__(self, request_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., epoch: _Optional[int] = ..., agent_name: _Optional[str] = ..., agent_metadata: _Optional[bytes] = ..., mem_type: _Optional[str] = ..., page_ids: _Optional[_Iterable[int]] = ..., pages: _Optional[_Iterable[_Union[PageDescriptor, _Mapping]]] = ..., layout_fingerprint: _Optional[str] = ..., lease_s: _Optional[float] = ...) -> None: ...

class TransferNotice(_message.Message):
    __slots__ = ("request_id", "epoch", "first_token", "num_prompt_tokens", "kv_checksum", "num_bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    epoch: int
    first_token: int
    num_prompt_tokens: int
    kv_checksum: int
    num_bytes: int
    def __init__(self, request_id: _Optional[str] = ..., epoch: _Optional[int] = ..., first_token: _Optional[int] = ..., num_prompt_tokens: _Optional[int] = ..., kv_checksum: _Optional[int] = ..., num_bytes: _Optional[int] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "role", "address", "epoch", "model_id", "layout_fingerprint", "hash_namespace", "block_tokens", "total_pages", "max_context", "vocab_size")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HASH_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: str
    address: str
    epoch: int
    model_id: str
    layout_fingerprint: str
    hash_namespace: str
    block_tokens: int
    total_pages: int
    max_context: int
    vocab_size: int
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[str] = ..., address: _Optional[str] = ..., epoch: _Optional[int] = ..., model_id: _Optional[str] = ..., layout_fingerprint: _Optional[str] = ..., hash_namespace: _Optional[str] = ..., block_tokens: _Optional[int] = ..., total_pages: _Optional[int] = ..., max_context: _Optional[int] = ..., vocab_size: _Optional[int] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("free_pages", "total_pages", "running", "waiting", "queued_tokens", "queued_attention", "num_finished", "draining")
    FREE_PAGES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PAGES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    NUM_FINISHED_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    free_pages: int
    total_pages: int
    running: int
    waiting: int
    queued_tokens: int
    queued_attention: float
    num_finished: int
    draining: bool
    def __init__(self, free_pages: _Optional[int] = ..., total_pages: _Optional[int] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., queued_tokens: _Optional[int] = ..., queued_attention: _Optional[float] = ..., num_finished: _Optional[int] = ..., draining: _Optional[bool] = ...) -> None: ...
