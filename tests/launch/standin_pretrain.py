"""A small stand-in for `train.pretrain` with the same launch contract, for launch tests
that must not depend on the data pipeline: same arguments, a real DeepSpeed engine
(ZeRO from the given ds_config) on a tiny regression model, `metrics.jsonl` rows with
`world_size`, DeepSpeed checkpoints under `<run_dir>/checkpoints` with `latest`, resume
from `latest`, and SIGTERM/SIGUSR1 -> all ranks agree, save, exit 75.

    zerollm launch pretrain --module tests.launch.standin_pretrain --config RUN.yaml \\
        --deepspeed_config ds_configs/zero2.json --num_gpus 2 -- --step_time 0.2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--deepspeed_config", required=True)
    p.add_argument("--local_rank", type=int, default=None)
    p.add_argument("--step_time", type=float, default=0.0, help="sleep per step (signal tests)")
    args = p.parse_args()

    stop = {"requested": 0.0}

    def on_signal(signum, frame):
        stop["requested"] = 1.0

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGUSR1, on_signal)

    import datetime

    import deepspeed
    import torch
    import torch.distributed as dist

    from launch import watchdog
    from train.config import load_ds_config, load_run_config

    timeout = watchdog.install_pg_timeouts() or datetime.timedelta(minutes=10)
    deepspeed.init_distributed(dist_backend="gloo", timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_run_config(args.config)
    ds = load_ds_config(args.deepspeed_config, cfg, world)
    torch.manual_seed(cfg.train.seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    run_dir = Path(cfg.logging.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    step = 0
    if (ckpt_dir / "latest").is_file():
        _, client = engine.load_checkpoint(str(ckpt_dir))
        step = int(client["step"])
    resumed_from = step
    gen = torch.Generator().manual_seed(cfg.train.seed + rank)

    def save(at: int) -> None:
        engine.save_checkpoint(str(ckpt_dir), tag=f"step{at:08d}", client_state={"step": at})

    t = cfg.train
    while step < t.max_steps:
        flag = torch.tensor([stop["requested"]])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if flag.item() > 0:
            save(step)
            print(f"standin rank {rank}: stopped at step {step}; checkpoint saved", flush=True)
            return watchdog.EXIT_PREEMPTED
        for _ in range(t.grad_accum_steps):
            x = torch.randn(t.micro_batch_size, 8, generator=gen)
            loss = torch.nn.functional.mse_loss(engine(x), x.sum(1, keepdim=True))
            engine.backward(loss)
            engine.step()
        step += 1
        if rank == 0 and (step % cfg.logging.log_interval == 0 or step == t.max_steps):
            row = {"step": step, "loss": float(loss), "lr": t.lr, "world_size": world, "resumed_from": resumed_from}
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        if (t.save_interval and step % t.save_interval == 0) or step == t.max_steps:
            save(step)
        time.sleep(args.step_time)
    if rank == 0:
        print(f"standin: finished {step} steps on {world} ranks (pid {os.getpid()})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
