"""Run a launcher command and own its ranks: forward stop signals, detect dead or frozen
ranks, leave no process behind, and return a non-zero code whenever a rank failed.

The supervisor is the `zerollm launch` process itself (and, under Slurm, one
`python -m launch.node` per node). It starts the deepspeed launcher in a session of
its own, then loops:

- a SIGTERM / SIGINT / SIGHUP / SIGUSR1 it receives goes to every rank on every node
  (`launch.jobctl` over pdsh, or on this node), as SIGTERM or SIGUSR1: the engine saves
  a checkpoint and exits 75. A second signal, or `stop_grace` seconds without the job
  ending, kills the job.
- each rank sends a heartbeat (see `launch.watchdog`); a rank silent for
  `heartbeat_timeout` seconds (killed, frozen) or reporting an error exit stops the job
  at once, with a message naming the rank, its node and host;
- when the launcher exits, every process still carrying the job's id is killed.

Given a `log_path`, the launcher's and the ranks' combined stdout/stderr go to that file
and, through `OutputFilter`, only ZeroLLM's own lines, progress bars and errors reach the
terminal (everything with `verbose`).
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from launch import jobctl
from launch.watchdog import EXIT_PREEMPTED
from launch.watchdog import HEARTBEAT_INTERVAL as BEAT

log = logging.getLogger("zerollm.launch")

# What each signal the supervisor gets becomes for the ranks (the engine saves on both).
FORWARD = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM,
           signal.SIGUSR1: signal.SIGUSR1}  # fmt: skip


def _ignore_usr1() -> None:
    """In the launcher's process: SIGUSR1 ignored, for it and the per-node launchers (it is
    inherited through exec). Slurm signals every process of a step, and the deepspeed
    launchers would die of it; `launch.rank` restores the default for the ranks."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def bind_heartbeat(addr: str) -> socket.socket:
    """A UDP socket on `addr` (an address of this host) for the ranks' heartbeats."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((addr, 0))
    return sock


@dataclass
class Supervisor:
    cmd: list[str]
    env: dict[str, str]
    job_id: str
    nodes: list[str]  # node rank -> host name as the user wrote it
    remote: bool = False  # ranks run on other hosts: reach them over pdsh
    heartbeat: socket.socket | None = None
    heartbeat_timeout: float = 60.0
    stop_grace: float = 120.0
    signal_child_only: bool = False  # forward signals to the command only (srun does the rest)
    python: str = "python3"
    cwd: str = field(default_factory=os.getcwd)
    log_path: Path | None = None  # the job's whole output goes here, the terminal gets OutputFilter's part
    verbose: bool = False  # with log_path: the terminal gets everything too

    def __post_init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.pending: list[int] = []
        self.stopping_since: float | None = None
        self.killed_at: float | None = None
        self.failure: str | None = None
        self.seen: dict[int, dict] = {}  # rank -> last heartbeat message, with "seen" = monotonic time
        self.exits: dict[int, int] = {}
        self.failing: tuple[float, str] | None = None  # (when, what) of the first error exit

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        handled = list(FORWARD)
        previous = {s: signal.signal(s, self._on_signal) for s in handled}
        pump = None
        started = time.monotonic()
        try:
            if self.log_path is None:
                self.proc = subprocess.Popen(self.cmd, env=self.env, start_new_session=True, preexec_fn=_ignore_usr1)
            else:
                self.proc, pump = self._start_piped()
            while self.proc.poll() is None:
                self._tick()
            rc = self.proc.returncode
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        if pump is not None:
            pump.join(5)  # the ranks' last lines (a traceback) before our verdict
        self._drain(0)
        if self.failing is not None and self.killed_at is None:  # the job ended before the kill
            self.failure = self._failing_message(time.monotonic(), min_silence=0.0)
            log.error("zerollm launch: %s", self.failure)
        if not self.signal_child_only:
            left = self._jobctl(signal.SIGKILL)
            if left:
                log.warning("zerollm launch: killed %d leftover process(es) of job %s", left, self.job_id)
        code = self._exit_code(rc)
        if pump is not None:
            pump.join(5)
            took = time.monotonic() - started
            if code == 0:
                log.info("zerollm launch: job %s finished in %.0f s", self.job_id, took)
            else:
                log.error("zerollm launch: job %s ended with exit code %d after %.0f s; its whole output is in %s",
                          self.job_id, code, took, self.log_path)  # fmt: skip
        return code

    def _start_piped(self) -> tuple[subprocess.Popen, threading.Thread]:
        """The launcher with stdout+stderr on a pipe; a thread copies it all to `log_path`
        and the filtered part to our stdout."""
        env = {**self.env, "PYTHONUNBUFFERED": "1"}
        if "COLUMNS" not in env and sys.stdout.isatty():  # tqdm sizes its bar from it on a pipe
            env["COLUMNS"] = str(os.get_terminal_size(sys.stdout.fileno()).columns)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sink = open(self.log_path, "ab")  # noqa: SIM115 - closed by the pump
        proc = subprocess.Popen(self.cmd, env=env, start_new_session=True, preexec_fn=_ignore_usr1,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        shown = OutputFilter(hosts=self.nodes, verbose=self.verbose)
        pump = threading.Thread(target=_pump, args=(proc.stdout, sink, shown), name="zerollm-output", daemon=True)
        pump.start()
        return proc, pump

    def _on_signal(self, signum: int, frame: object) -> None:
        self.pending.append(signum)

    def _tick(self) -> None:
        self._drain(0.5)
        now = time.monotonic()
        while self.pending:
            signum = self.pending.pop(0)
            name = signal.Signals(signum).name
            if self.stopping_since is None:
                self.stopping_since = now
                fwd = FORWARD[signum]
                log.warning(
                    "zerollm launch: %s: asking every rank to save and stop (%s); killing in %.0f s",
                    name, signal.Signals(fwd).name, self.stop_grace,
                )  # fmt: skip
                self._forward(fwd)
            elif self.killed_at is None:
                self._kill(f"second signal ({name}) while stopping: killing the job now", failed=False)
        if self.failing is not None and self.killed_at is None and now - self.failing[0] > 3 * BEAT:
            self._kill(self._failing_message(now, min_silence=2.5 * BEAT) + ": stopping the job")
        for rank, msg in list(self.seen.items()):
            silent = now - msg["seen"]
            if silent > self.heartbeat_timeout and self.killed_at is None:
                self._kill(
                    f"rank {rank} ({self._where(msg)}) sent no heartbeat for {silent:.0f} s "
                    f"(dead or frozen; --heartbeat_timeout {self.heartbeat_timeout:g}): stopping the job"
                )
        if self.stopping_since is not None and self.killed_at is None and now - self.stopping_since > self.stop_grace:
            self._kill(f"the job did not stop within --stop_grace {self.stop_grace:g} s: killing it")
        if self.killed_at is not None and now - self.killed_at > 30 and self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the launcher itself hangs: end it

    def _drain(self, wait: float) -> None:
        if self.heartbeat is None:
            time.sleep(wait)
            return
        deadline = time.monotonic() + wait
        while True:
            ready, _, _ = select.select([self.heartbeat], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return
            data = self.heartbeat.recv(65536)
            try:
                msg = json.loads(data)
            except ValueError:
                continue
            if msg.get("job") != self.job_id:
                continue
            rank = int(msg.get("rank", -1))
            if msg.get("kind") == "exit":
                self.seen.pop(rank, None)
                code = int(msg.get("code", 1))
                self.exits[rank] = code
                if code not in (0, EXIT_PREEMPTED) and self.failing is None:
                    # Often a symptom (a collective broke because a peer died): give the
                    # heartbeats a moment to show which rank went silent first.
                    self.failing = (time.monotonic(), f"rank {rank} ({self._where(msg)}) exited with code {code}")
            elif rank not in self.exits:
                self.seen[rank] = {**msg, "seen": time.monotonic()}

    def _failing_message(self, now: float, min_silence: float) -> str:
        """The first error exit, then the ranks that went silent without reporting an exit:
        those were killed or froze, and are usually the cause."""
        silent = [
            f"rank {r} ({self._where(m)}) stopped without reporting an exit, last heard {now - m['seen']:.0f} s "
            "ago (killed or frozen?)"
            for r, m in sorted(self.seen.items())
            if now - m["seen"] > min_silence
        ]
        return "; ".join([self.failing[1] if self.failing else "", *silent]).lstrip("; ")

    # ------------------------------------------------------------------ actions
    def _where(self, msg: dict) -> str:
        node = int(msg.get("node_rank", -1))
        host = self.nodes[node] if 0 <= node < len(self.nodes) else msg.get("host", "?")
        return f"node {node}, host {host}, pid {msg.get('pid')}"

    def _forward(self, sig: int) -> None:
        if self.signal_child_only:
            if self.proc is not None:
                self.proc.send_signal(sig)
            return
        self._jobctl(sig, ranks=True)

    def _kill(self, reason: str, failed: bool = True) -> None:
        log.error("zerollm launch: %s", reason)
        if failed and self.failure is None:
            self.failure = reason
        self.killed_at = time.monotonic()
        if self.signal_child_only:
            if self.proc is not None:
                os.killpg(self.proc.pid, signal.SIGTERM)  # srun: ends the step on every node
            return
        self._jobctl(signal.SIGKILL)
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _jobctl(self, sig: int, ranks: bool = False) -> int:
        """Send `sig` to this job's processes (only ranks if `ranks`) on every node."""
        if not self.remote:
            return jobctl.signal_job(self.job_id, sig, ranks)
        remote = shlex.join([self.python, "-m", "launch.jobctl", self.job_id, str(int(sig))])
        if ranks:
            remote += " --ranks --node %n"  # pdsh puts in each host's index, as for deepspeed's --node_rank
        hosts = ",".join(self.nodes)
        cmd = ["pdsh", "-S", "-f", "1024", "-w", hosts, f"cd {shlex.quote(self.cwd)} && {remote}"]
        env = {**os.environ, "PDSH_RCMD_TYPE": "ssh"}
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60).stdout
        except subprocess.TimeoutExpired:
            log.error("zerollm launch: pdsh did not reach every node within 60 s to send signal %d", sig)
            return 0
        return sum(int(n) for n in re.findall(r"-> (\d+) process", out))

    def _exit_code(self, rc: int) -> int:
        if rc < 0:
            rc = 128 - rc
        if self.failure is not None:
            return rc if rc not in (0, EXIT_PREEMPTED) else 1
        if self.stopping_since is not None and rc == 0 and any(c != 0 for c in self.exits.values()):
            return EXIT_PREEMPTED
        return rc


# ----------------------------------------------------------------------------- the terminal

_OURS = re.compile(r"(zerollm[ :]|launch\.node:|\[rank\d+\] )")  # our CLI, launcher and stage loggers
_BAR = re.compile(r"([^\s|][^|]*: *)? *\d{1,3}%\|")  # tqdm: "pretrain:  40%|####      | 2/5 [00:01<00:01, ...]"
_WHOLE_BAR = re.compile(_BAR.pattern + r"[^|\r\n]*\|[^\[\r\n]*\[[^]\r\n]*\] *")  # ... to its "]" and padding
# A log line with a level: DeepSpeed's "[2026-12-01 11:05:30,578] [INFO] [launch.py:152:main] ..." and
# torch/glog's "[W1201 11:05:30.123456 ProcessGroupGloo.cpp:...]" / "W1201 11:05:30.123000 1234 ...".
_LEVEL = re.compile(r"\[[\d-]+ [\d:,.]+\] \[([A-Z]+)\]|\[?([IWEF])\d{4} \d")
_PY_WARNING = re.compile(r"\S+:\d+: \w*Warning: ")  # warnings.warn's "FILE:LINE: FutureWarning: ..."
_ERROR = re.compile(r"\b(error|exception|fatal|terminate called|segmentation fault|core dumped|killed|abort)", re.I)
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


class OutputFilter:
    """Which of the job's output reaches the terminal: ZeroLLM's own lines (`zerollm ...:`,
    `[rankN] ...`), tqdm bars, Python tracebacks, log lines at ERROR or above, and any other
    line that mentions an error; not DeepSpeed's and torch's INFO/WARNING chatter.

    `feed(text)` takes output as it arrives (any chunking) and returns what to print. A
    bar redraws itself after a carriage return without a newline, so it passes at once;
    other lines when their newline arrives. A line from a remote node keeps pdsh's
    `HOST: ` prefix, and is judged without it."""

    def __init__(self, hosts: list[str] = (), verbose: bool = False):
        self.verbose = verbose
        self.host = re.compile("|".join(re.escape(h) + ": " for h in hosts)) if hosts else None
        self.buf = ""  # the line (or bar redraw) being received
        self.cr = False  # `buf` follows a carriage return: a bar redrawing itself
        self.at_line_start = True  # of what we returned so far
        self.bar_open = False  # the last thing returned is a bar, its "\n" still to come
        self.traceback = False

    def feed(self, text: str) -> str:
        if self.verbose:
            return text
        out: list[str] = []
        for piece in re.split(r"([\r\n])", text):
            if piece in ("\r", "\n"):
                self._end(piece, out)
            else:
                self.buf += piece
                self._take_bar(_WHOLE_BAR, out)
        self._take_bar(_BAR, out, whole=True)  # a redraw the pipe cut short: show it now all the same
        return "".join(out)

    def _take_bar(self, pattern: re.Pattern, out: list[str], whole: bool = False) -> None:
        """A bar redraw at the start of `buf` goes out at once; what follows it without a
        "\r" or "\n" (a warning from another process) is a line of its own."""
        line = self._strip(self.buf)
        m = pattern.match(line)
        if m:
            end = len(self.buf) if whole else len(self.buf) - len(line) + m.end()
            self._emit(self.buf[:end], out)
            self.buf, self.cr, self.bar_open = self.buf[end:], False, True

    def close(self) -> str:
        """What is left once the output has ended."""
        out: list[str] = []
        if self.buf and not self.verbose:
            self._end("\n", out)
        if not self.at_line_start:
            out.append("\n")
        return "".join(out)

    def wanted(self, line: str) -> bool:
        """Whether a whole line (without its newline) goes to the terminal."""
        line = self._strip(line)
        if self.traceback:
            self.traceback = line[:1].isspace()  # the first unindented line is the exception itself
            return True
        if line.startswith("Traceback (most recent call last)"):
            self.traceback = True
            return True
        if _OURS.match(line) or _BAR.match(line) or line.startswith(_CHAINED):
            return True
        level = _LEVEL.match(line)
        if level:
            return (level.group(1) or level.group(2)) in ("ERROR", "CRITICAL", "FATAL", "E", "F")
        return not _PY_WARNING.match(line) and bool(_ERROR.search(line))

    def _strip(self, line: str) -> str:
        m = self.host.match(line) if self.host else None
        return line[m.end() :] if m else line

    def _end(self, sep: str, out: list[str]) -> None:
        if self.buf:
            self.bar_open = False
            if self.wanted(self.buf):
                self._emit(self.buf, out)
                if sep == "\n":
                    out.append("\n")
                    self.at_line_start = True
        elif sep == "\n" and self.bar_open:  # the newline that closes a bar
            out.append("\n")
            self.at_line_start, self.bar_open = True, False
        # A "\r" is kept for the next piece: it redraws this line only if that one is shown too.
        self.buf, self.cr = "", sep == "\r"

    def _emit(self, text: str, out: list[str]) -> None:
        if self.at_line_start:
            pass
        elif self.cr:
            out.append("\r")
        else:
            out.append("\n")  # a hidden line interrupted a bar: start a fresh line
        out.append(text)
        self.at_line_start = False


def _pump(stream, sink, shown: OutputFilter) -> None:
    """Copy the job's output to `sink` (bytes, all of it) and its shown part to stdout."""
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
    fd = stream.fileno()
    try:
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            sink.write(data)
            sink.flush()
            _write(shown.feed(decode(data)))
        _write(shown.feed(decode(b"", final=True)) + shown.close())
    finally:
        sink.close()
        stream.close()


def _write(text: str) -> None:
    if text:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except (OSError, ValueError):
            pass  # our stdout went away (a closed pipe): the log file still has everything
