"""Creating a NIXL agent the way every pdserve process does (kept free of torch imports)."""

from __future__ import annotations

import logging
import os
from typing import Any


def quiet_nixl() -> None:
    logging.getLogger("NIXL").setLevel(logging.WARNING)
    os.environ.setdefault("UCX_LOG_LEVEL", "error")


def new_agent(name: str) -> Any:
    """A NIXL agent on the UCX backend, without a progress thread: that thread spins a whole
    core; transfers progress when polled instead (check_xfer_state on the initiator,
    get_new_notifs on the target)."""
    quiet_nixl()
    from nixl._api import nixl_agent, nixl_agent_config

    return nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
