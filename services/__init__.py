"""pdserve.services: one gRPC servicer per service, the server bootstrap, the NIXL wrapper."""
