"""The stored form of one KV block: a checked header, then the page's raw bytes.

    offset size  field
    0      4     magic b"PDKV"
    4      2     format version
    6      2     reserved (0)
    8      16    layout id (first 16 bytes of SHA-256 of the layout fingerprint)
    24     32    block key (the hash-chain digest the block is stored under)
    56     4     token count
    60     8     payload length
    68     8     xxh3_64 of the payload
    76     -     payload
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import xxhash

from pdserve.cache.block_hash import BlockHash
from pdserve.cache.errors import CorruptBlock

MAGIC = b"PDKV"
VERSION = 1
_HEADER = struct.Struct("<4sHH16s32sIQQ")
HEADER_SIZE = _HEADER.size
CHECKSUM_MISMATCH = "payload checksum mismatch"


def layout_id(fingerprint: str) -> bytes:
    return hashlib.sha256(fingerprint.encode()).digest()[:16]


@dataclass(frozen=True)
class BlockHeader:
    layout: bytes
    key: bytes  # the key the block says it was stored under (checked against the asked one)
    num_tokens: int
    payload_len: int
    checksum: int


def checksum(data: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(data)


def encode_block(key: BlockHash, fingerprint: str, num_tokens: int,
                 payload: bytes | memoryview, payload_checksum: int | None = None) -> bytes:
    """Header + payload, in one copy of the payload; `payload_checksum` when the caller has
    it already (xxh3-64 of exactly these bytes), else computed here."""
    if len(key) != 32:
        raise ValueError(f"block key must be 32 bytes, got {len(key)}")
    header = _HEADER.pack(MAGIC, VERSION, 0, layout_id(fingerprint), key, num_tokens,
                          len(payload), checksum(payload) if payload_checksum is None
                          else payload_checksum)
    return b"".join((header, payload))


def read_header(value: bytes | memoryview, total: int | None = None) -> BlockHeader:
    """Parses and checks a block's header; `total` is the stored length when `value` holds only
    the block's first bytes."""
    total = len(value) if total is None else total
    if total < HEADER_SIZE or len(value) < HEADER_SIZE:
        raise CorruptBlock(f"block of {total} bytes is shorter than its header")
    magic, version, _, layout, key, ntok, plen, csum = _HEADER.unpack_from(value)
    if magic != MAGIC:
        raise CorruptBlock("bad magic")
    if version != VERSION:
        raise CorruptBlock(f"unknown block format version {version}")
    if plen != total - HEADER_SIZE:
        raise CorruptBlock(f"payload length {total - HEADER_SIZE}, header says {plen}")
    return BlockHeader(layout, key, ntok, plen, csum)


def check_header(key: BlockHash, value: bytes | memoryview, total: int | None = None,
                 fingerprint: str | None = None) -> BlockHeader:
    h = read_header(value, total)
    if h.key != key:
        raise CorruptBlock("block stored under another key")
    if fingerprint is not None and h.layout != layout_id(fingerprint):
        raise CorruptBlock("block has another KV layout")
    return h


def verify_block(key: BlockHash, value: bytes, fingerprint: str | None = None) -> memoryview:
    """Checks the header, key and checksum (and the layout when given); returns the payload."""
    h = check_header(key, value, None, fingerprint)
    payload = memoryview(value)[HEADER_SIZE:]
    if checksum(payload) != h.checksum:
        raise CorruptBlock(CHECKSUM_MISMATCH)
    return payload
