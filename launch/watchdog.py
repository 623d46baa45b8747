"""Rank-side watchdog: bounded process-group timeouts, heartbeats, death with the parent.

`zerollm launch` supervises every rank of a job. Each rank (started through
`python -m launch.rank`, which calls everything below before the stage's code runs)
sends a small UDP datagram to the supervisor every `ZEROLLM_HEARTBEAT_INTERVAL`
seconds and one last datagram with its exit code. A rank that dies (SIGKILL, OOM) or
freezes (SIGSTOP, a hung host) stops beating; the supervisor then stops the whole job
within `--heartbeat_timeout` seconds and names the rank and host. The heartbeat runs
in a thread, so a rank blocked in a collective still beats: a hung collective is bounded
by the process-group timeout instead (`ZEROLLM_PG_TIMEOUT`), which
`install_pg_timeouts` applies to every group, including the ones DeepSpeed creates
later with `dist.new_group()` and no timeout (torch's default for those is 30 minutes
for gloo, whatever `DEEPSPEED_TIMEOUT` says).

Environment (set by `zerollm launch`, forwarded to every node):
    ZEROLLM_JOB_ID              job id; the supervisor finds a job's processes by it
    ZEROLLM_HEARTBEAT           host:port of the supervisor's UDP socket ("" = off)
    ZEROLLM_HEARTBEAT_INTERVAL  seconds between beats (default 2)
    ZEROLLM_PG_TIMEOUT          seconds for every process group (unset = torch default)

Engine use (idempotent; `launch.rank` already did both when the launcher started it):
    launch.watchdog.install_pg_timeouts()   # before deepspeed.init_distributed(...)
    launch.watchdog.start_heartbeat()
Only the standard library is imported at module level (and train/'s two standard-library
modules errors.py and pg_timeout.py); torch only inside `install_pg_timeouts`.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import threading
import time

# Both are standard-library-only modules of train/: the exit codes and the timeout patch
# live there (the engine uses them without importing launch/); re-exported for the launcher.
from train.errors import EXIT_PREEMPTED as EXIT_PREEMPTED
from train.pg_timeout import ENV_PG_TIMEOUT as ENV_PG_TIMEOUT
from train.pg_timeout import install_pg_timeouts as install_pg_timeouts

HEARTBEAT_INTERVAL = 2.0  # seconds, unless ZEROLLM_HEARTBEAT_INTERVAL says otherwise
ENV_JOB = "ZEROLLM_JOB_ID"
ENV_HEARTBEAT = "ZEROLLM_HEARTBEAT"
ENV_INTERVAL = "ZEROLLM_HEARTBEAT_INTERVAL"

_beat_lock = threading.Lock()
_beat_thread: threading.Thread | None = None


def identity() -> dict:
    """Who this rank is, from the variables the deepspeed launcher sets."""
    env = os.environ
    return {
        "job": env.get(ENV_JOB, ""),
        "rank": int(env.get("RANK", "-1")),
        "local_rank": int(env.get("LOCAL_RANK", "-1")),
        "node_rank": int(env.get("CROSS_RANK", env.get("GROUP_RANK", "-1"))),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def _target() -> tuple[str, int] | None:
    raw = os.environ.get(ENV_HEARTBEAT, "").strip()
    if not raw:
        return None
    host, _, port = raw.rpartition(":")
    return host.strip("[]"), int(port)


def _send(message: dict) -> None:
    target = _target()
    if target is None:
        return
    try:
        with socket.socket(socket.AF_INET6 if ":" in target[0] else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(json.dumps(message).encode(), target)
    except OSError:
        pass  # the supervisor is gone or unreachable: nothing useful to do from here


def start_heartbeat(interval: float | None = None) -> bool:
    """Start the heartbeat thread (once per process). False when no supervisor is set."""
    global _beat_thread
    if _target() is None:
        return False
    if interval is None:
        interval = float(os.environ.get(ENV_INTERVAL) or HEARTBEAT_INTERVAL)
    with _beat_lock:
        if _beat_thread is not None and _beat_thread.pid == os.getpid():  # type: ignore[attr-defined]
            return True
        me = identity()

        def beat() -> None:
            while True:
                _send({**me, "kind": "beat", "t": time.time()})
                time.sleep(interval)

        _beat_thread = threading.Thread(target=beat, name="zerollm-heartbeat", daemon=True)
        _beat_thread.pid = os.getpid()  # type: ignore[attr-defined]
        _beat_thread.start()
    return True


def report_exit(code: int) -> None:
    """Tell the supervisor this rank is exiting on purpose with `code` (0, 75, or an error)."""
    _send({**identity(), "kind": "exit", "code": int(code), "t": time.time()})


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent (the per-node launcher) dies.

    The deepspeed per-node launcher killed with SIGKILL would otherwise orphan its ranks.
    SIGTERM lets the engine try its graceful stop; a stop that cannot finish is ended by
    the process-group timeout or by the supervisor.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)
