"""pdserve.scheduler: worker registry state and load balancers, as pure functions (no I/O)."""
