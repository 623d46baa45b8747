"""One Slurm task per node: start this node's ranks and supervise them.

    srun --ntasks-per-node=1 python -m launch.node [--heartbeat_timeout S] [--stop_grace S] \\
        -- deepspeed --hostfile H --no_ssh --node_rank=-1 ... --module launch.rank MODULE ...

`zerollm launch --launcher slurm` builds this line. Here `--node_rank=-1` becomes
`--node_rank=$SLURM_NODEID`; the ranks heartbeat to this process on 127.0.0.1; a
signal srun forwards (SIGUSR1 on preemption, SIGTERM on scancel) reaches the ranks;
a lost rank ends this task non-zero, and srun's --kill-on-bad-exit ends the others.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid

from launch.supervisor import Supervisor, bind_heartbeat


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(prog="python -m launch.node")
    p.add_argument("--heartbeat_timeout", type=float, default=60.0)
    p.add_argument("--stop_grace", type=float, default=120.0)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    node = os.environ.get("SLURM_NODEID", os.environ.get("SLURM_PROCID", "0"))
    cmd = [f"--node_rank={node}" if a == "--node_rank=-1" else a for a in cmd]
    job = f"{os.environ.get('SLURM_JOB_ID', 'local')}-{os.environ.get('SLURM_RESTART_COUNT', '0')}-n{node}"
    job_id = f"{job}-{uuid.uuid4().hex[:6]}"
    heartbeat = bind_heartbeat("127.0.0.1")
    env = {
        **os.environ,
        "ZEROLLM_JOB_ID": job_id,
        "ZEROLLM_HEARTBEAT": f"127.0.0.1:{heartbeat.getsockname()[1]}",
    }
    print(
        f"launch.node: node {node} ({os.uname().nodename}), slurm restart count "
        f"{os.environ.get('SLURM_RESTART_COUNT', '0')}: {' '.join(cmd)}",
        flush=True,
    )
    sup = Supervisor(cmd, env, job_id, nodes=[], heartbeat=heartbeat, heartbeat_timeout=args.heartbeat_timeout,
                     stop_grace=args.stop_grace, python=sys.executable)  # fmt: skip
    return sup.run()


if __name__ == "__main__":
    sys.exit(main())
