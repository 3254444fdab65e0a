from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LookupRequest(_message.Message):
    __slots__ = ("keys", "per_key")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PER_KEY_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    per_key: bool
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., per_key: _Optional[bool] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("num_prefix", "present", "evicted")
    NUM_PREFIX_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    num_prefix: int
    present: _containers.RepeatedScalarFieldContainer[bool]
    evicted: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, num_prefix: _Optional[int] = ..., present: _Optional[_Iterable[bool]] = ..., evicted: _Optional[_Iterable[bool]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("keys", "part_cuts")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PART_CUTS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    part_cuts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., part_cuts: _Optional[_Iterable[int]] = ...) -> None: ...

class Block(_message.Message):
    __slots__ = ("key", "value", "depth", "part")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    depth: int
    part: int
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., depth: _Optional[int] = ..., part: _Optional[int] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    def __init__(self, stored: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("num_blocks", "num_bytes", "hits", "misses", "puts", "corrupt", "evicted", "expired", "write_errors", "accepting_writes", "capacity_bytes")
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    PUTS_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    WRITE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTING_WRITES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    num_bytes: int
    hits: int
    misses: int
    puts: int
    corrupt: int
    evicted: int
    expired: int
    write_errors: int
    accepting_writes: bool
    capacity_bytes: int
    def __init__(self, num_blocks: _Optional[int] = ..., num_bytes: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., puts: _Optional[int] = ..., corrupt: _Optional[int] = ..., evicted: _Optional[int] = ..., expired: _Optional[int] = ..., write_errors: _Optional[int] = ..., accepting_writes: _Optional[bool] = ..., capacity_bytes: _Optional[int] = ...) -> None: ...

class StageRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class StagedBlock(_message.Message):
    __slots__ = ("header", "addr", "length")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    header: bytes
    addr: int
    length: int
    def __init__(self, header: _Optional[bytes] = ..., addr: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class StageResponse(_message.Message):
    __slots__ = ("stage_id", "agent_name", "agent_metadata", "blocks", "lease_s", "mem_type")
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    MEM_TYPE_FIELD_NUMBER: _ClassVar[int]
    stage_id: int
    agent_name: str
    agent_metadata: bytes
    blocks: _containers.RepeatedCompositeFieldContainer[StagedBlock]
    lease_s: float
    mem_type: str
    def __init__(self, stage_id: _Optional[int] = ..., agent_name: _Optional[str] = ..., agent_metadata: _Optional[bytes] = ..., blocks: _Optional[_Iterable[_Union[StagedBlock, _Mapping]]] = ..., lease_s: _Optional[float] = ..., mem_type: _Optional[str] = ...) -> None: ...

class StageRelease(_message.Message):
    __slots__ = ("stage_id",)
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    stage_id: int
    def __init__(self, stage_id: _Optional[int] = ...) -> None: ...
