"""`train.pretrain` with two more entries in every metrics.jsonl step row: DeepSpeed's loss
scale and its count of skipped (overflowed) steps. Row (a) of benchmarks/gpu_check.sh.

    zerollm pretrain --module benchmarks.gpu_check_probe --config RUN.yaml --deepspeed_config ds_configs/zero2_fp16.json
    python -m benchmarks.gpu_check_probe --config RUN.yaml --deepspeed_config ds_configs/zero2_fp16.json

`loss_scale` is the ZeRO optimizer's current scale (dynamic under fp16, a static 1.0 under
bf16/fp32); `ds_skipped_steps` counts the updates DeepSpeed skipped because the scaled
gradients overflowed. Neither is in the loop's own row (train/loop.py step_row), and the
probe changes nothing else: the stage, its checks and its exit codes are train.pretrain's.
"""

from __future__ import annotations

from train import loop, pretrain

# `zerollm launch` reads these from the module it is given; they stay train.pretrain's own.
for _name in ("CONFIG_SECTIONS", "preflight", "RESUME_CHECKS"):
    if hasattr(pretrain, _name):
        globals()[_name] = getattr(pretrain, _name)


def with_loss_scale(step_row):
    def row(engine, *args, **kwargs):
        out = step_row(engine, *args, **kwargs)
        scale = getattr(engine.optimizer, "loss_scale", None)  # ZeRO-1/2 optimizers; torch's own has none
        out["loss_scale"] = None if scale is None else float(scale)
        out["ds_skipped_steps"] = int(getattr(engine, "skipped_steps", 0))
        return out

    return row


if __name__ == "__main__":
    loop.step_row = with_loss_scale(loop.step_row)
    pretrain.main()
