"""The prefill service: computes a prompt's KV (reusing cached blocks) and pushes it to decode.

Lifecycle of one request (each step in one module):
1. The gateway calls `Prefill` (servicer.py: checked, INVALID_ARGUMENT naming the field) with the
   prompt, its cache salt, how many leading blocks the kvstore holds (a hint), the sampling
   parameters and a decode worker's `Reservation`.
2. The prompt joins the engine's order (by deadline, engine/scheduler.py) and takes pages from
   this worker's pool when its turn is about a step away (worker.py; a pipelined prompt: on
   arrival); the cached leading blocks are fetched from the kvstore, verified (checksum, key
   and layout) and copied into them (blocks.py). Whatever could not be fetched is computed:
   a store that is down or slow only costs recompute.
3. The rest of the prompt joins the engine (compute.py), whose thread runs prompt chunks of
   several requests per step within a token budget (chunked prefill); when its last chunk is
   done the first token is sampled. By default 2 and 3 overlap: the blocks arrive in layer
   groups while the rest of the prompt computes, each layer waiting only for its own group
   (layer_fetch.py); a block that fails verification is recomputed. A prompt the gateway
   pipelined (`PrefillRequest.pipeline`) is computed with the workers listed there running the
   first layers, chunk by chunk (stage.py); this worker runs the last ones and READs theirs
   (head.py; pipeline.py says how).
4. The prompt's pages are WRITten into the reserved decode pages over NIXL with a notice
   carrying the first token and a checksum (worker.py, services/transfer.py); the call returns
   once the WRITE completed.
5. New full blocks go to the kvstore in the background (blocks.py, best effort); the pages are
   freed once no thread touches them (guard.py).
"""
