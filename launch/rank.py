"""Per-rank entry point that `zerollm launch` puts in front of a stage module.

    python -m launch.rank [--local_rank=N] train.pretrain --config RUN.yaml ...

The deepspeed launcher runs this once per rank (`--module launch.rank MODULE ...`).
Before the stage's code runs it: dies with the per-node launcher (no orphan ranks),
starts the heartbeat to the supervising `zerollm launch`, and bounds every process
group's timeout (`launch.watchdog`). Then it runs MODULE as `__main__` in this same
process with the remaining arguments (`--local_rank=N` first, where deepspeed put it),
and reports the exit code to the supervisor.
"""

from __future__ import annotations

import runpy
import signal
import sys

from launch import watchdog


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    leading = []
    while argv and argv[0].startswith("--local_rank"):
        leading.append(argv.pop(0))
    if not argv:
        sys.exit("usage: python -m launch.rank [--local_rank=N] MODULE [ARGS...]")
    module = argv.pop(0)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # the supervisor's launchers ignore it; ranks must not
    watchdog.die_with_parent()
    watchdog.start_heartbeat()
    watchdog.install_pg_timeouts()
    # A stage that goes through train.run leaves with os._exit from its own exit path
    # (orderly teardown, no native destructors at shutdown); it reports the code first.
    from train import run

    run.add_exit_hook(watchdog.report_exit)
    sys.argv = [module, *leading, *argv]
    code: int = 1
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
    finally:
        # Only a module that does not exit through train.run gets here (a --module script,
        # a usage error): its process groups still end in order before Python shuts down,
        # and a late or duplicate stop signal must not turn its exit into death by signal.
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        if code in (0, 75):
            run.end_process_groups(run.EXIT_BARRIER_S)
        watchdog.report_exit(code)


if __name__ == "__main__":
    main()
