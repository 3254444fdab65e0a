"""Every fixed limit the services check, in one place (the settable ones are in pdserve/config.py).
A refusal names the field and the limit."""

from __future__ import annotations

# The public API (gateway)
MAX_REQUEST_ID = 256       # characters of a client's request_id
MAX_SALT = 1024            # characters of a cache_salt
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKENS = 64

# Internal calls: an attempt's id is the client's id plus "#<attempt>" (services/gateway/flow.py)
MAX_INTERNAL_REQUEST_ID = MAX_REQUEST_ID + 16

# Pipelined prefill (services/prefill/pipeline.py)
MAX_STAGES = 64            # PrefillRequest.pipeline entries at most
MAX_CHUNK_TOKENS = 65_536  # tokens of one hidden-state chunk between stages

# KV store (services/kvstore/)
MAX_KEYS = 65_536          # block keys in one call
MAX_PARTS = 1024           # parts of a block in one part-wise Get
KEY_BYTES = 32             # a block key is a SHA-256 digest
PUT_BATCH_BYTES = 64 << 20  # a Put stream is written to the store in batches of about this

# Worker registry (services/gateway/membership.py)
MAX_WORKER_ID = 128
MAX_ADDRESS = 300
