"""The decode service: reserves KV pages, receives prompt KV over NIXL, streams tokens.

Lifecycle of one request (each step in one module):
1. `Reserve` (servicer.py -> worker.py -> requests.py): pages for prompt + max_tokens are set
   aside (RESOURCE_EXHAUSTED if they do not fit) and returned as NIXL descriptors with this
   worker's agent metadata and epoch; the request is RESERVED.
2. The prefill worker WRITEs the prompt's pages and sends a `TransferNotice` (first token,
   checksum of the written bytes).
3. The engine thread picks the notice up (worker.py), checks epoch, token count and checksum
   (requests.py), and only then starts decoding (RUNNING); a bad transfer fails the request
   (DATA_LOSS) and frees its pages; no notice within the lease fails it (DEADLINE_EXCEEDED) and
   quarantines its pages; a late notice is dropped.
4. `Stream` (servicer.py) yields tokens after the first as the continuous batch produces them
   (engine/engine.py, driven by services/engine_thread.py).
5. Finish (stop token / max_tokens), `Release`, or a cancelled stream frees the pages (DONE).
"""
