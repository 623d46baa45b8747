"""`zerollm launch STAGE`: check a job on this node, then run it on every node with deepspeed.

    zerollm launch pretrain --config RUN.yaml --deepspeed_config ds_configs/zero2.json \\
        --hostfile hostfile [--include/--exclude | --num_nodes/--num_gpus] \\
        [--launcher pdsh|openmpi|slurm] [--env NAME[=VALUE] ...] [--set K=V ...] [--dry-run] [--verbose]

Before any rank starts: the run config and the DeepSpeed config load, the batch
arithmetic holds for the world size the hostfile and filters give, the stage module
imports, and its inputs exist (the stage's `preflight(cfg)`, else the .bin/.idx check).
`--set` overrides apply before any of it, as they do on every rank. Then it prints and
runs the exact `deepspeed` command, always with an explicit `--master_addr` (the first
node's address; deepspeed would otherwise ask `hostname -I`). Every rank runs
`python -m launch.rank STAGE_MODULE ...` (heartbeat, process-group timeouts, death with
its launcher; see `launch.watchdog`).

Environment: PATH, PYTHONPATH, OMP_*, NCCL_*, HF_*, TORCH_*, DEEPSPEED_*, ZEROLLM_* ...
(`launch.env.FORWARD*`), the user's ~/.deepspeed_env and ./.deepspeed_env, and each
`--env` reach every rank on every node, through an env file the deepspeed launcher
parses (RUN_DIR/launch/deepspeed_env, mode 0600, escaped for its remote shell).

Signals and failures: see `launch.supervisor`. `--launcher slurm` runs inside an
allocation (launch/slurm/*.sbatch): one `python -m launch.node` task per node via srun,
each starting `deepspeed --no_ssh --node_rank=$SLURM_NODEID` and supervising its ranks.

Output: the terminal shows ZeroLLM's own lines (`zerollm launch:`, rank 0's `[rank0] ...`,
other ranks' warnings), the stage's progress bar and every error or traceback; all of it,
with DeepSpeed's and torch's own chatter, goes to RUN_DIR/logs/launch-JOB.log
(`launch.supervisor.OutputFilter`). `--verbose` shows everything. Under Slurm, srun
writes each node's output to RUN_DIR/logs/slurm-*.log.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import logging
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import types
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from launch import hostfile as hf
from launch.env import EnvError, escape, forwarded, parse_env_args, read_user_env_file, write_env_file
from train.errors import ZeroLLMError

STAGES = {"pretrain": "train.pretrain", "sft": "train.sft", "reward": "train.reward", "ppo": "train.ppo",
          "dpo": "train.dpo", "grpo": "train.grpo"}  # fmt: skip
_SAFE = re.compile(r"^[\w@%+=:,./-]*$")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="check a job, then run a stage on one or many nodes with the deepspeed launcher",
        description=__doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("stage", help=f"stage to run: {', '.join(STAGES)} (or see --module)")
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--deepspeed_config", "--ds", dest="ds_config", required=True, help="DeepSpeed JSON config")
    p.add_argument("--module", help="run this Python module on each rank instead of the stage's own")
    g = p.add_argument_group("where the ranks run (deepspeed launcher options)")
    g.add_argument("--hostfile", help="HOST slots=N per line (default: /job/hostfile if present, else this node)")
    g.add_argument("--include", default="", help='e.g. "node1@node2:0,1"')
    g.add_argument("--exclude", default="", help='e.g. "node2:1"')
    g.add_argument("--num_nodes", type=int, default=-1, help="use the first N hosts")
    g.add_argument("--num_gpus", "--num_accelerators", type=int, default=-1, help="ranks per host")
    g.add_argument("--launcher", default="pdsh", choices=["pdsh", "openmpi", "slurm"], help="multi-node backend")
    g.add_argument("--launcher_args", default="", help="extra arguments for pdsh/mpirun")
    g.add_argument("--master_addr", default="", help="rendezvous address (default: the first host's)")
    g.add_argument("--master_port", type=int, default=0, help="rendezvous port (default: a free one)")
    g = p.add_argument_group("environment, failures and signals")
    g.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]", help="set/forward to all ranks")
    g.add_argument("--heartbeat_timeout", type=float, default=60.0, help="s without a heartbeat = rank lost")
    g.add_argument("--heartbeat_addr", default="", help="this host's address the ranks reach (default: master)")
    g.add_argument("--pg_timeout", type=float, default=600.0, help="s for every process group's collectives")
    g.add_argument("--stop_grace", type=float, default=120.0, help="s for a graceful stop before a kill")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="check and print only")
    p.add_argument("--skip_memory_check", "--skip-memory-check", action="store_true",
                   help="launch even when the memory estimate says it will not fit")  # fmt: skip
    p.add_argument("--verbose", action="store_true",
                   help="show DeepSpeed's and torch's output too (always in RUN_DIR/logs/launch-JOB.log)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="run-config override, passed to the stage as --set")  # fmt: skip
    p.add_argument("--stage_arg", action="append", default=[], metavar="ARG", help="one more argument for the stage")
    p.set_defaults(func=run_launch)


@dataclass
class Plan:
    module: str
    world_size: int
    active: OrderedDict[str, list[int]]  # host -> slots ("localhost" when single node)
    hostfile: str | None
    master_addr: str
    master_port: int
    run_dir: Path
    multi_node: bool
    env: dict[str, str] = field(default_factory=dict)  # for every rank, beyond os.environ
    estimate: str = ""  # the memory/time estimate's table, printed and at the top of the launch log


def run_launch(args: argparse.Namespace) -> int:
    # kept local: launch.supervisor pulls in ctypes/threading/datetime (~20 ms on zerollm --help)
    from launch.supervisor import Supervisor, bind_heartbeat

    log = logging.getLogger("zerollm.launch")
    if not args.verbose:
        _quiet_deepspeed_here()
    plan = preflight(args)
    job_id = uuid.uuid4().hex[:12]
    if args.launcher == "slurm":
        return _run_slurm(args, plan, job_id)
    heartbeat = None
    if not args.dry_run:
        addr = args.heartbeat_addr or plan.master_addr
        try:
            heartbeat = bind_heartbeat(addr)
        except OSError as e:
            log.warning("zerollm launch: no heartbeat: cannot listen on %s (%s); pass --heartbeat_addr", addr, e)
    hb = f"{heartbeat.getsockname()[0]}:{heartbeat.getsockname()[1]}" if heartbeat else ""
    env = {**plan.env, **_job_env(args, job_id, hb)}
    run_env = {**os.environ, **env}
    if plan.multi_node:
        env_file = plan.run_dir / "launch" / "deepspeed_env"
        run_env["DS_ENV_FILE"] = str(env_file.resolve())
        run_env["PYTHONPATH"] = env["PYTHONPATH"]
    cmd = build_command(args, plan)
    print(f"zerollm launch: job {job_id}, world size {plan.world_size} on {', '.join(plan.active)}", flush=True)
    print(f"zerollm launch: {shlex.join(cmd)}", flush=True)
    output = plan.run_dir / "logs" / f"launch-{job_id}.log"
    if plan.estimate:
        print(plan.estimate, flush=True)
    if args.dry_run:
        return 0
    if plan.estimate:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(plan.estimate + "\n")
    shown = "shown here too" if args.verbose else "--verbose shows it here"
    print(f"zerollm launch: DeepSpeed's and torch's own output: {output} ({shown})", flush=True)
    if plan.multi_node:
        write_env_file(env_file, env)
    sup = Supervisor(
        cmd, run_env, job_id, nodes=list(plan.active), remote=plan.multi_node and args.launcher == "pdsh",
        heartbeat=heartbeat, heartbeat_timeout=args.heartbeat_timeout, stop_grace=args.stop_grace,
        signal_child_only=plan.multi_node and args.launcher != "pdsh", python=sys.executable,
        log_path=output, verbose=args.verbose,
    )  # fmt: skip
    return sup.run()


class _ErrorsOnly:
    """A logging filter: records at ERROR and above."""

    def filter(self, record) -> bool:
        return record.levelno >= 40


def _quiet_deepspeed_here() -> None:
    """This process's own DeepSpeed chatter (accelerator detection while counting devices)
    stays off the terminal like the job's. A filter, not a level: DeepSpeed sets its
    logger's level when it is first imported."""
    ds = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _ErrorsOnly) for f in ds.filters):
        ds.addFilter(_ErrorsOnly())


# ----------------------------------------------------------------------------- pre-flight


def preflight(args: argparse.Namespace) -> Plan:
    """Every check that can fail before a rank starts; returns what the launch needs."""
    # heavy: train.config imports torch (via train.model), kept out of zerollm --help
    from train.config import load_ds_config, load_run_config, parse_overrides

    module = args.module or STAGES.get(args.stage)
    if module is None:
        raise ZeroLLMError(f"unknown stage {args.stage!r} (stages: {', '.join(STAGES)}; or pass --module)")
    stage = import_stage(module, args.stage)
    sections = getattr(stage, "CONFIG_SECTIONS", None)
    cfg = load_run_config(args.config, parse_overrides(args.set), extra_sections=sections)

    path = args.hostfile
    if path is None and args.launcher != "slurm" and os.path.isfile("/job/hostfile"):
        path = "/job/hostfile"  # what the deepspeed launcher would pick up by itself
    if args.launcher == "slurm":
        hosts = _slurm_hosts(args)
    elif path:
        hosts = hf.parse_hostfile(path)
    else:
        hosts = OrderedDict(localhost=args.num_gpus if args.num_gpus > 0 else _local_device_count())
    active = hf.select(hosts, args.include, args.exclude, args.num_nodes, args.num_gpus)
    world_size = sum(len(s) for s in active.values())
    multi_node = args.launcher == "slurm" or (path is not None and len(active) > 1)
    ds = load_ds_config(args.ds_config, cfg, world_size)  # batch arithmetic for this world size
    _check_inputs(stage, cfg)
    ranks_per_node = max(len(s) for s in active.values())
    estimate_table, estimate_bytes = _memory_check(args, cfg, ds, world_size, ranks_per_node)

    master_addr = args.master_addr or hf.resolve(next(iter(active)))
    if not re.match(r"^[A-Za-z0-9_.:-]+$", master_addr):
        raise ZeroLLMError(f"--master_addr {master_addr!r} is not a host name or address")
    master_port = args.master_port or _free_port(master_addr)

    environ = dict(os.environ)
    env = forwarded(environ)
    env["PYTHONPATH"] = ":".join(p for p in [os.getcwd(), environ.get("PYTHONPATH", "")] if p)
    for user_file in (Path.home() / ".deepspeed_env", Path(".deepspeed_env")):
        if user_file.is_file():
            env.update(read_user_env_file(user_file))
    env.update(parse_env_args(args.env, environ))
    if estimate_bytes:
        from train.memory import ENV_ESTIMATE

        env[ENV_ESTIMATE] = f"{estimate_bytes:.0f}"  # rank 0 logs it beside its measured peak
    if multi_node and args.launcher == "pdsh":
        for name, value in env.items():
            escape(value, name)  # raises EnvError if it cannot travel
        if not _SAFE.match(os.getcwd()):
            raise EnvError(f"the deepspeed launcher runs `cd {os.getcwd()}` unquoted on each node; use a plainer path")
        if args.launcher == "pdsh":
            if not shutil.which("pdsh"):
                raise ZeroLLMError("--launcher pdsh: pdsh is not installed on this node (apt-get install pdsh)")
    return Plan(module, world_size, active, path, master_addr, master_port, Path(cfg.logging.run_dir),
                multi_node, env, estimate_table)  # fmt: skip


def _memory_check(args: argparse.Namespace, cfg, ds: dict, world: int, ranks_per_node: int) -> tuple[str, float]:
    """The memory/time estimate's table (train/estimate.py); a run that would not fit in the
    device memory stops here, before any rank starts, with the changes that would fit."""
    from train.estimate import device_budget, estimate, not_fitting_error

    if args.stage not in STAGES or args.module:
        return "", 0.0
    import torch

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        budget, source = device_budget(kind, ranks_per_node, None)
        est = estimate(cfg, ds, world, args.stage, kind, budget, cfg.logging.peak_flops or None)
    except Exception as e:  # noqa: BLE001 (an estimate that cannot be made never blocks a launch)
        return f"zerollm launch: no memory estimate ({type(e).__name__}: {e})", 0.0
    if not est.fits and not args.skip_memory_check:
        raise ZeroLLMError(not_fitting_error(est, f"{args.config} with {args.ds_config}"))
    table = f"zerollm launch: estimate (device memory: {source}; `zerollm estimate` for other sizes)\n{est.table()}"
    return table, est.peak_bytes


def import_stage(module: str, stage: str = "") -> types.ModuleType:
    """Import a stage module (stages import only light modules at the top)."""
    name = stage or module
    try:
        found = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        found = None
    if found is None:
        raise ZeroLLMError(f"stage {name!r}: module {module} is not importable from {os.getcwd()}")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ZeroLLMError(f"stage {name!r}: importing {module} failed: {e}") from None


def _check_inputs(stage: types.ModuleType, cfg) -> None:
    """The stage's own `preflight(cfg)` input check; without one, the token-data check."""
    from train.config import check_token_data

    getattr(stage, "preflight", check_token_data)(cfg)


def _local_device_count() -> int:
    from deepspeed.accelerator import get_accelerator

    return max(1, get_accelerator().device_count())


def _free_port(addr: str) -> int:
    """A free TCP port on `addr` when it is this host's, else deepspeed's default 29500.

    Taken from 29500-32767, below Linux's ephemeral range (32768+), so an outgoing
    connection cannot grab it between this check and the rendezvous."""
    candidates = random.sample(range(29500, 32768), 50)
    for port in candidates:
        try:
            with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as s:
                s.bind((addr, port))
                return port
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return 29500  # not an address of this host
    return 29500


def _job_env(args: argparse.Namespace, job_id: str, heartbeat: str) -> dict[str, str]:
    return {
        "ZEROLLM_JOB_ID": job_id,
        "ZEROLLM_HEARTBEAT": heartbeat,
        "ZEROLLM_PG_TIMEOUT": f"{args.pg_timeout:g}",
        "DEEPSPEED_TIMEOUT": str(max(1, round(args.pg_timeout / 60))),  # minutes, for deepspeed's own default
    }


# ----------------------------------------------------------------------------- commands


def deepspeed_prefix() -> list[str]:
    exe = Path(sys.executable).parent / "deepspeed"
    return [str(exe)] if exe.is_file() else [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]


def build_command(args: argparse.Namespace, plan: Plan, node_rank: str | None = None) -> list[str]:
    """The deepspeed launcher's argv. User text never goes through a local shell; on the
    pdsh path, deepspeed joins the stage's arguments into a remote shell line, so they
    are quoted for that shell here."""
    cmd = deepspeed_prefix()
    if plan.hostfile:
        cmd += ["--hostfile", plan.hostfile]
    for flag in ("include", "exclude"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    if args.num_nodes > 0:
        cmd += ["--num_nodes", str(args.num_nodes)]
    if args.num_gpus > 0:
        cmd += ["--num_gpus", str(args.num_gpus)]
    cmd += ["--master_addr", plan.master_addr, "--master_port", str(plan.master_port)]
    if node_rank is not None:
        cmd += ["--no_ssh", f"--node_rank={node_rank}"]
    elif plan.multi_node:
        cmd += ["--launcher", args.launcher]
        if args.launcher_args:
            cmd += ["--launcher_args", args.launcher_args]
    stage = [plan.module, "--config", args.config, "--deepspeed_config", args.ds_config]
    for item in args.set:
        stage += ["--set", item]
    stage += args.stage_arg
    if plan.multi_node and args.launcher == "pdsh" and node_rank is None:
        stage = [_pdsh_quote(a) for a in stage]
    return cmd + ["--module", "launch.rank", *stage]


def _pdsh_quote(arg: str) -> str:
    """Quote one argument for the remote shell line deepspeed's pdsh runner builds: it
    wraps an argument holding a space in double quotes (escaping only `"`), and leaves
    any other argument bare."""
    if " " in arg:
        return re.sub(r"([\\$`])", r"\\\1", arg)
    return shlex.quote(arg)


# ----------------------------------------------------------------------------- Slurm


def _slurm_hosts(args: argparse.Namespace) -> OrderedDict[str, int]:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist or "SLURM_JOB_ID" not in os.environ:
        raise ZeroLLMError("--launcher slurm runs inside a Slurm allocation (sbatch launch/slurm/pretrain.sbatch)")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    nodes = out.stdout.split()
    per_node = args.num_gpus
    if per_node <= 0:
        gpus = os.environ.get("SLURM_GPUS_ON_NODE", "")
        per_node = int(gpus) if gpus.isdigit() else _local_device_count()
    return OrderedDict((n, per_node) for n in nodes)


def _run_slurm(args: argparse.Namespace, plan: Plan, job_id: str) -> int:
    """One srun task per node, each `python -m launch.node` -> `deepspeed --no_ssh`."""
    from launch.supervisor import Supervisor

    job, restart = os.environ["SLURM_JOB_ID"], os.environ.get("SLURM_RESTART_COUNT", "0")
    launch_dir = plan.run_dir / "launch"
    logs = plan.run_dir / "logs"
    plan.hostfile = str(launch_dir / f"hostfile-{job}")
    nodes = len(plan.active)
    node_cmd = build_command(args, plan, node_rank="-1")  # launch.node puts in $SLURM_NODEID
    srun = [
        "srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        "--export=ALL", f"--output={logs}/slurm-{job}-restart{restart}-node%n.log", "--open-mode=append",
        sys.executable, "-u", "-m", "launch.node", f"--heartbeat_timeout={args.heartbeat_timeout:g}",
        f"--stop_grace={args.stop_grace:g}", "--", *node_cmd,
    ]  # fmt: skip
    print(f"zerollm launch: slurm job {job}, restart count {restart}, world size {plan.world_size}", flush=True)
    if plan.estimate:
        print(plan.estimate, flush=True)
    print(f"zerollm launch: {shlex.join(srun)}", flush=True)
    print(f"zerollm launch: rank logs in {logs}/slurm-{job}-restart{restart}-node*.log", flush=True)
    if args.dry_run:
        return 0
    hf.write_hostfile(plan.hostfile, OrderedDict((h, len(s)) for h, s in plan.active.items()))
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **plan.env, **_job_env(args, "", "")}
    env.pop("ZEROLLM_JOB_ID")  # each node's launch.node makes its own
    logging.getLogger("zerollm.launch").info("zerollm launch: hostfile %s", plan.hostfile)
    sup = Supervisor(srun, env, job_id, nodes=list(plan.active), stop_grace=args.stop_grace + 30,
                     signal_child_only=True, python=sys.executable)  # fmt: skip
    return sup.run()
