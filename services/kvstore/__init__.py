"""The kvstore service: a shard of the disk-backed KV block store (cache/store.py) behind gRPC
(servicer.py), with a NIXL staging buffer for one-sided bulk reads (staging.py); start-up and
the life of a block in main.py."""
