"""pdserve.cache: block hashing, the KV block codec and the RocksDB block store."""
