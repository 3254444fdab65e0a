from __future__ import annotations

import hashlib
import struct

from pdserve.cache.block_hash import block_hashes, cacheable_blocks, chain_root, hash_namespace

NS = hash_namespace("model@abc", "L2-D8-float32-B4-x")


def test_chain_matches_definition():
    toks = list(range(10))
    keys = block_hashes(NS, "salt", toks, 4)
    assert len(keys) == 2  # the 2-token tail has no key
    ns, salt = NS.encode(), b"salt"
    h0 = hashlib.sha256(struct.pack("<I", len(ns)) + ns + struct.pack("<I", 4) + salt).digest()
    h1 = hashlib.sha256(h0 + struct.pack("<4i", 0, 1, 2, 3)).digest()
    h2 = hashlib.sha256(h1 + struct.pack("<4i", 4, 5, 6, 7)).digest()
    assert keys == [h1, h2]
    assert chain_root(NS, "salt") == h0


def test_shared_prefix_shares_keys_until_first_difference():
    a = block_hashes(NS, "", [1] * 8 + [2] * 4 + [3] * 4, 4)
    b = block_hashes(NS, "", [1] * 8 + [9] * 4 + [3] * 4, 4)
    assert a[:2] == b[:2]
    assert a[2] != b[2] and a[3] != b[3]  # chained: a later equal block still differs


def test_salt_and_namespace_isolate():
    toks = list(range(16))
    base = block_hashes(NS, "", toks, 4)
    assert not set(base) & set(block_hashes(NS, "tenant-b", toks, 4))
    assert not set(base) & set(block_hashes(hash_namespace("model@abc", "other"), "", toks, 4))
    # length prefixes: moving a character between namespace and salt changes the root
    assert chain_root("ab", "c") != chain_root("a", "bc")


def test_cacheable_blocks_always_leaves_the_last_token_to_compute():
    assert cacheable_blocks(64, 64) == 0
    assert cacheable_blocks(65, 64) == 1
    assert cacheable_blocks(128, 64) == 1
    assert cacheable_blocks(129, 64) == 2
    assert cacheable_blocks(1, 64) == 0
