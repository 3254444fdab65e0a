"""pdserve: disaggregated prefill/decode LLM serving around a shared disk-backed KV cache."""

__version__ = "0.1.0"
