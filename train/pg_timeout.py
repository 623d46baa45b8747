"""Bounded timeouts for every torch.distributed process group, DeepSpeed's later ones too.

torch gives a group created with `dist.new_group()` and no timeout its own default
(30 minutes for gloo, whatever `DEEPSPEED_TIMEOUT` says), so a frozen peer would hang a
job for half an hour. `install_pg_timeouts(seconds)` patches torch's default-timeout
lookup, which `init_process_group` and `new_group` consult when they get no explicit
timeout. `train.engine.init_distributed` calls it; `launch.rank` calls it (through
`launch.watchdog`) before the stage's code runs. Only the standard library is imported
at module level; torch inside the function.

    ZEROLLM_PG_TIMEOUT   seconds for every process group (unset: torch's default)
"""

from __future__ import annotations

import os
from datetime import timedelta

ENV_PG_TIMEOUT = "ZEROLLM_PG_TIMEOUT"

_pg_timeout: timedelta | None = None


def install_pg_timeouts(seconds: float | None = None) -> timedelta | None:
    """Make every process group default to `seconds` (or $ZEROLLM_PG_TIMEOUT).

    Returns the timeout, or None when neither the argument nor the variable is set
    (nothing is changed then). Pass the returned value to
    `deepspeed.init_distributed(timeout=...)` as well. Idempotent.
    """
    global _pg_timeout
    if seconds is None:
        raw = os.environ.get(ENV_PG_TIMEOUT, "").strip()
        if not raw:
            return _pg_timeout
        seconds = float(raw)
    if seconds <= 0:
        raise ValueError(f"{ENV_PG_TIMEOUT} must be a positive number of seconds, got {seconds}")
    import torch.distributed.constants as dist_constants
    import torch.distributed.distributed_c10d as c10d

    timeout = timedelta(seconds=seconds)
    c10d._get_default_timeout = lambda backend: timeout  # used when timeout=None
    c10d.default_pg_timeout = timeout
    dist_constants.default_pg_timeout = timeout
    if hasattr(dist_constants, "default_pg_nccl_timeout"):
        dist_constants.default_pg_nccl_timeout = timeout
        c10d.default_pg_nccl_timeout = timeout
    _pg_timeout = timeout
    return timeout
