"""The gateway: the public API, the worker registry and the global scheduler.

Lifecycle of one `Generate` (each step in one module):
1. servicer.py: authenticate (auth.py), per-client limits, validate and tokenize with the chat
   template (admission.py; INVALID_ARGUMENT naming the field).
2. flow.py LOOKUP: hash the prompt's full blocks (namespace from the workers, the request's
   cache_salt) and ask the kvstore how many leading blocks it holds; no answer = no hits.
3. flow.py PLACE: a decode worker (decode balancer; RESOURCE_EXHAUSTED when none can hold the
   request) and a prefill worker, or a pipeline of them (prefill balancer;
   scheduler/balancers.py over scheduler/registry.py, kept by membership.py).
4. flow.py RESERVE: pages on the decode worker; the decode stream is opened.
5. flow.py PREFILL: the prefill worker computes and pushes the KV; its answer carries the first
   token, which is streamed at once (time to first token).
6. flow.py RELAY: the decode worker's tokens as text deltas (output.py), then finish_reason,
   usage and timing. A worker that fails an attempt is retried or migrated around (policy.py).
7. On any failure or client cancellation the decode reservation is released (workers.py).
8. accounting.py: one ledger row (and the Prometheus counters) records the outcome.
Start-up and shutdown: main.py.
"""
