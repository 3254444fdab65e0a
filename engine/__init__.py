"""pdserve.engine: torch models, the paged KV pool, sampling and the single-process engine."""
