"""Find and signal the processes of one job on this node, by their ZEROLLM_JOB_ID.

    python -m launch.jobctl JOB_ID SIGNAL [--ranks [--node N]]   # e.g. JOB_ID TERM --ranks; JOB_ID KILL

`zerollm launch` runs this on every node (over pdsh) to forward a stop signal to the
ranks themselves (not only to a launcher that may not pass it on) and, at the end, to
make sure no process of the job survives. A job's processes are those whose initial
environment holds `ZEROLLM_JOB_ID=<id>`; its ranks are those that also hold
`LOCAL_RANK` and whose parent is not itself a rank (data-loader workers are skipped).
Prints one line: `jobctl HOST: SIGNAL -> N process(es)`.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
from pathlib import Path


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def job_processes(job_id: str, ranks_only: bool = False, node: str = "") -> list[int]:
    """Pids on this node whose environment carries ZEROLLM_JOB_ID=job_id (and, with
    `node`, ranks of that node rank only: two "nodes" may share one machine)."""
    me = {os.getpid(), os.getppid()}
    found: dict[int, dict[str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in me:
            continue
        env = _environ(int(entry.name))
        if env.get("ZEROLLM_JOB_ID") == job_id:
            found[int(entry.name)] = env
    if not ranks_only:
        return sorted(found)
    ranks = [p for p, env in found.items() if "LOCAL_RANK" in env and (not node or env.get("CROSS_RANK") == node)]
    return sorted(p for p in ranks if _ppid(p) not in ranks)


def signal_job(job_id: str, sig: int, ranks_only: bool = False, node: str = "") -> int:
    """Send `sig` to the job's processes (ranks first); return how many got it."""
    pids = job_processes(job_id, ranks_only, node)
    if sig == signal.SIGKILL:  # ranks first, so launchers do not start their own teardown
        ranks = set(job_processes(job_id, ranks_only=True))
        pids = sorted(pids, key=lambda p: p not in ranks)
    count = 0
    for pid in pids:
        try:
            os.kill(pid, sig)
            count += 1
        except ProcessLookupError:
            pass
    return count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.jobctl", description=__doc__.splitlines()[0])
    p.add_argument("job_id")
    p.add_argument("signal", help="TERM, USR1, KILL, CONT, ... or a number; 0 only counts")
    p.add_argument("--ranks", action="store_true", help="only the ranks, not their launchers")
    p.add_argument("--node", default="", help="with --ranks: only ranks of this node rank (pdsh's %%n)")
    args = p.parse_args(argv)
    name = args.signal.upper().removeprefix("SIG")
    sig = int(name) if name.isdigit() else int(getattr(signal, f"SIG{name}"))
    count = signal_job(args.job_id, sig, args.ranks, args.node)
    print(f"jobctl {socket.gethostname()}: {args.signal} -> {count} process(es)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
