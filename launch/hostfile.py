"""Hostfiles and resource filters, with errors that name the file and the line.

A hostfile lists one node per line, `HOST slots=N` (N ranks on that node), in the
deepspeed launcher's format; `#` starts a comment and blank lines are ignored. The
filters are the deepspeed launcher's own and give the same result:

    --include "host1@host2:0,2"   only these hosts (and slots)
    --exclude "host2:1"           everything but these
    --num_nodes 2 --num_gpus 4    the first 2 hosts, the first 4 slots on each

    hosts = parse_hostfile("hostfile")            # {"node1": 8, "node2": 8}
    active = select(hosts, include="node2")       # {"node2": [0, 1, ..., 7]}
"""

from __future__ import annotations

import re
import socket
from collections import OrderedDict
from pathlib import Path

from train.errors import ZeroLLMError

_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.:\[\]-]+)\s+slots\s*=\s*(?P<slots>\d+)$")


class HostfileError(ZeroLLMError):
    """A hostfile or an --include/--exclude/--num_* filter is malformed or selects nothing."""


def parse_hostfile(path: str | Path) -> OrderedDict[str, int]:
    path = Path(path)
    if not path.is_file():
        raise HostfileError(f"{path}: hostfile not found")
    hosts: OrderedDict[str, int] = OrderedDict()
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m:
            raise HostfileError(f"{path}:{number}: expected 'HOST slots=N', got {raw.strip()!r}")
        host, slots = m["host"], int(m["slots"])
        if host in hosts:
            raise HostfileError(f"{path}:{number}: host {host!r} is listed twice")
        if slots < 1:
            raise HostfileError(f"{path}:{number}: {host} has slots={slots}; it must be at least 1")
        hosts[host] = slots
    if not hosts:
        raise HostfileError(f"{path}: no hosts (expected lines like 'node1 slots=8')")
    return hosts


def _parse_filter(text: str, hosts: OrderedDict[str, int], flag: str) -> dict[str, list[int] | None]:
    out: dict[str, list[int] | None] = {}
    for part in text.split("@"):
        host, _, slots = part.partition(":")
        if host not in hosts:
            raise HostfileError(f"{flag} {text!r}: host {host!r} is not in the hostfile ({', '.join(hosts)})")
        if not slots:
            out[host] = None
            continue
        try:
            ids = [int(s) for s in slots.split(",")]
        except ValueError:
            raise HostfileError(f"{flag} {text!r}: slots of {host} must be integers, got {slots!r}") from None
        bad = [i for i in ids if not 0 <= i < hosts[host]]
        if bad:
            raise HostfileError(f"{flag} {text!r}: {host} has slots 0..{hosts[host] - 1}, not {bad}")
        out[host] = ids
    return out


def select(
    hosts: OrderedDict[str, int],
    include: str = "",
    exclude: str = "",
    num_nodes: int = -1,
    num_gpus: int = -1,
) -> OrderedDict[str, list[int]]:
    """Host -> slot ids that will run ranks, in hostfile order (the node ranks)."""
    if (include or exclude) and (num_nodes > 0 or num_gpus > 0):
        raise HostfileError("--include/--exclude cannot be combined with --num_nodes/--num_gpus")
    if include and exclude:
        raise HostfileError("--include and --exclude cannot be used together")
    active: OrderedDict[str, list[int]] = OrderedDict((h, list(range(n))) for h, n in hosts.items())
    if include:
        chosen = _parse_filter(include, hosts, "--include")
        active = OrderedDict((h, sorted(chosen[h]) if chosen[h] else s) for h, s in active.items() if h in chosen)
    if exclude:
        dropped = _parse_filter(exclude, hosts, "--exclude")
        for h, ids in dropped.items():
            active[h] = [] if ids is None else [s for s in active[h] if s not in ids]
        active = OrderedDict((h, s) for h, s in active.items() if s)
    if num_nodes > 0:
        if num_nodes > len(active):
            raise HostfileError(f"--num_nodes {num_nodes}: only {len(active)} host(s) available: {', '.join(active)}")
        active = OrderedDict(list(active.items())[:num_nodes])
    if num_gpus > 0:
        short = [h for h, s in active.items() if len(s) < num_gpus]
        if short:
            raise HostfileError(f"--num_gpus {num_gpus}: host(s) {', '.join(short)} have fewer slots")
        active = OrderedDict((h, s[:num_gpus]) for h, s in active.items())
    if not active:
        raise HostfileError("the hostfile and filters leave no host to run on")
    return active


def resolve(host: str) -> str:
    """The IPv4 address of `host` (for --master_addr); 'localhost' -> 127.0.0.1."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        return socket.gethostbyname(host)
    except OSError as e:
        raise HostfileError(f"cannot resolve host {host!r} for --master_addr ({e}); pass --master_addr") from None


def write_hostfile(path: str | Path, hosts: OrderedDict[str, int]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{h} slots={n}\n" for h, n in hosts.items()))
    return path
