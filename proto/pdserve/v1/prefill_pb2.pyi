from pdserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "cache_salt", "cached_blocks_hint", "sampling", "reservation", "pipeline")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_HINT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    cache_salt: str
    cached_blocks_hint: int
    sampling: _common_pb2.SamplingParams
    reservation: _common_pb2.Reservation
    pipeline: _containers.RepeatedCompositeFieldContainer[PipelinePeer]
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., cache_salt: _Optional[str] = ..., cached_blocks_hint: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., reservation: _Optional[_Union[_common_pb2.Reservation, _Mapping]] = ..., pipeline: _Optional[_Iterable[_Union[PipelinePeer, _Mapping]]] = ...) -> None: ...

class PipelinePeer(_message.Message):
    __slots__ = ("worker_id", "address")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class PipelineStageRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "cache_salt", "cached_blocks", "layer_begin", "layer_end", "chunk_tokens", "upstream", "upstream_layers")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LAYER_BEGIN_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    cache_salt: str
    cached_blocks: int
    layer_begin: int
    layer_end: int
    chunk_tokens: int
    upstream: _containers.RepeatedCompositeFieldContainer[PipelinePeer]
    upstream_layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., cache_salt: _Optional[str] = ..., cached_blocks: _Optional[int] = ..., layer_begin: _Optional[int] = ..., layer_end: _Optional[int] = ..., chunk_tokens: _Optional[int] = ..., upstream: _Optional[_Iterable[_Union[PipelinePeer, _Mapping]]] = ..., upstream_layers: _Optional[_Iterable[int]] = ...) -> None: ...

class PipelineStageOutput(_message.Message):
    __slots__ = ("hidden", "kv")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    hidden: HiddenChunk
    kv: StageKV
    def __init__(self, hidden: _Optional[_Union[HiddenChunk, _Mapping]] = ..., kv: _Optional[_Union[StageKV, _Mapping]] = ...) -> None: ...

class HiddenChunk(_message.Message):
    __slots__ = ("begin", "num_tokens", "dtype", "data")
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    begin: int
    num_tokens: int
    dtype: str
    data: bytes
    def __init__(self, begin: _Optional[int] = ..., num_tokens: _Optional[int] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class StageKV(_message.Message):
    __slots__ = ("agent_name", "agent_metadata", "layer_begin", "layer_end", "ranges", "mem_type")
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    LAYER_BEGIN_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    MEM_TYPE_FIELD_NUMBER: _ClassVar[int]
    agent_name: str
    agent_metadata: bytes
    layer_begin: int
    layer_end: int
    ranges: _containers.RepeatedCompositeFieldContainer[_common_pb2.PageDescriptor]
    mem_type: str
    def __init__(self, agent_name: _Optional[str] = ..., agent_metadata: _Optional[bytes] = ..., layer_begin: _Optional[int] = ..., layer_end: _Optional[int] = ..., ranges: _Optional[_Iterable[_Union[_common_pb2.PageDescriptor, _Mapping]]] = ..., mem_type: _Optional[str] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token", "cached_tokens", "computed_tokens", "bytes_transferred", "fetch_s", "compute_s", "transfer_s", "first_logprob")
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_TRANSFERRED_FIELD_NUMBER: _ClassVar[int]
    FETCH_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    first_token: int
    cached_tokens: int
    computed_tokens: int
    bytes_transferred: int
    fetch_s: float
    compute_s: float
    transfer_s: float
    first_logprob: float
    def __init__(self, first_token: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., computed_tokens: _Optional[int] = ..., bytes_transferred: _Optional[int] = ..., fetch_s: _Optional[float] = ..., compute_s: _Optional[float] = ..., transfer_s: _Optional[float] = ..., first_logprob: _Optional[float] = ...) -> None: ...
