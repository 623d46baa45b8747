"""The run configs and the result table of benchmarks/gpu_check.sh (read that script first).

    python benchmarks/gpu_check.py config STEP --mode gpu|smoke --work DIR [--init-from RUN] [--peak-tflops X]
    python benchmarks/gpu_check.py table --mode gpu|smoke --work DIR [--peak-tflops X]

`config` writes DIR/configs/STEP.yaml (the sizes of both modes are side by side below) and
prints its path. `table` reads each step's status (DIR/status/STEP, written by the script)
and its run's metrics.jsonl, prints one row per step, writes DIR/results.json, and exits 1
when a step failed or, on a GPU, when a check does not hold (fp16 loss did not fall, no MFU).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import yaml

# Every size the two modes differ in. gpu: one H200, the whole script well under 8 minutes;
# smoke: the same steps on CPU in about a minute (tiny model, 2 optimizer steps each).
SIZES = {
    "gpu": {
        "corpus_mb": None,  # the whole stdlib (~12-15 MB)
        "vocab": 4096,
        "tok_mb": 4,
        "small_model": {
            "preset": "tiny",
            "n_layer": 6,
            "n_head": 8,
            "n_kv_head": 4,
            "d_model": 512,
            "max_seq_len": 512,
        },
        "a": {"seq_len": 256, "micro": 32, "steps": 60, "precision": "fp16"},
        "b": {"preset": "gpt2-124m", "seq_len": 1024, "micro": 32, "steps": 40, "warm": 10},
        "sft": {"max_len": 256, "micro": 16, "steps": 4, "precision": "bf16"},
        "reward": {"max_len": 256, "micro": 16, "steps": 4, "precision": "bf16", "stats_pairs": 64},
        "ppo": {"prompt_len": 192, "new_tokens": 64, "micro": 16, "epochs": 2, "steps": 6, "precision": "bf16"},
    },
    "smoke": {
        "corpus_mb": 1,
        "vocab": 512,
        "tok_mb": 0.3,
        "small_model": {"preset": "tiny", "max_seq_len": 256},
        "a": {"seq_len": 64, "micro": 4, "steps": 2, "precision": "fp32"},  # fp16 is GPU-only
        "b": {"preset": "tiny", "seq_len": 64, "micro": 4, "steps": 2, "warm": 1},
        "sft": {"max_len": 128, "micro": 2, "steps": 2, "precision": "fp32"},
        "reward": {"max_len": 128, "micro": 2, "steps": 2, "precision": "fp32", "stats_pairs": 4},
        "ppo": {"prompt_len": 64, "new_tokens": 8, "micro": 2, "epochs": 1, "steps": 2, "precision": "fp32"},
    },
}
DS = {"a": "ds_configs/zero2_fp16.json", "b": "ds_configs/zero2.json", "sft": "ds_configs/zero2.json",
      "reward": "ds_configs/zero2.json", "ppo": "ds_configs/zero3.json"}  # fmt: skip
STEPS = ["data", "a", "b", "ppo", "sft", "reward"]  # the rows in table order
TITLES = {
    "data": "demo corpus -> BPE tokenizer -> .bin/.idx",
    "a": "fp16 dynamic loss scaling, ZeRO-2",
    "b": "bf16 pretraining MFU, ZeRO-2",
    "ppo": "PPO under ZeRO-3 (reward function)",
    "sft": "SFT (ZeRO-2)",
    "reward": "reward model (ZeRO-2)",
}
ROW_IDS = {"data": "data", "a": "a", "b": "b", "ppo": "c", "sft": "d1", "reward": "d2"}
REWARD_FN = "data_pipeline.function_tasks:reward"  # a completion that parses and uses the function's arguments


def tokenizer_vocab(tok_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()


def run_config(step: str, mode: str, work: Path, init_from: str, peak_tflops: float) -> dict:
    """The run config of one step; every run logs a metrics row per step and no TensorBoard."""
    z = SIZES[mode]
    s = z[step]
    data, tasks, tok = work / "data", work / "tasks", str(work / "tokenizer")
    logging = {"run_dir": str(work / "runs" / step), "log_interval": 1, "tensorboard": False}
    train = {"micro_batch_size": s["micro"], "grad_accum_steps": 1, "max_steps": s["steps"], "eval_interval": 0,
             "save_interval": 0, "precision": s.get("precision", "bf16")}  # fmt: skip
    if step in ("a", "b"):
        model = dict(z["small_model"]) if step == "a" else {"preset": s["preset"]}
        if step == "a" or mode == "smoke":
            model["vocab_size"] = tokenizer_vocab(Path(tok))  # gpt2-124m keeps its own 50,257 (> the tokenizer's)
        train |= {"lr": 2.0e-3 if step == "a" else 6.0e-4, "min_lr": 2.0e-4, "warmup_steps": min(10, s["steps"] // 4)}
        if step == "a":
            model |= {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}  # the demo's family
        if step == "b":
            logging["peak_flops"] = peak_tflops * 1e12
        return {"model": model, "train": train, "logging": logging,
                "data": {"train": [str(data / "stdlib_train")], "tokenizer": tok, "seq_len": s["seq_len"]}}  # fmt: skip
    train |= {"lr": 1.0e-4, "min_lr": 1.0e-5, "warmup_steps": 0, "weight_decay": 0.0}
    cfg = {"model": {"dropout": 0.0}, "data": {"seed": 1234}, "train": train, "logging": logging}
    if step == "sft":
        cfg["sft"] = {"train_file": str(tasks / "sft_train.jsonl"), "init_from": init_from, "tokenizer": tok,
                      "max_len": s["max_len"], "packing": True, "eval_prompts": 0}  # fmt: skip
    elif step == "reward":
        cfg["reward"] = {"train_file": str(tasks / "prefs_train.jsonl"), "valid_file": str(tasks / "prefs_valid.jsonl"),
                         "init_from": init_from, "tokenizer": tok, "max_len": s["max_len"],
                         "stats_pairs": s["stats_pairs"]}  # fmt: skip
    elif step == "ppo":
        train["save_interval"] = s["steps"]  # a checkpoint lands between rollouts (a multiple of epochs)
        cfg["ppo"] = {"prompts_file": str(tasks / "prompts_train.jsonl"), "init_from": init_from, "reward": REWARD_FN,
                      "tokenizer": tok, "max_prompt_len": s["prompt_len"], "max_new_tokens": s["new_tokens"],
                      "epochs": s["epochs"], "minibatches": 1, "eval_prompts": 0}  # fmt: skip
    return cfg


# ----------------------------------------------------------------------------- the table


def step_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no metrics")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = sorted((r for r in rows if "loss" in r), key=lambda r: r["step"])
    if not rows:
        raise ValueError(f"{path}: no step rows")
    return rows


def median(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def loss_falls(rows: list[dict]) -> bool:
    k = max(1, len(rows) // 5)  # mean of the first and the last fifth
    first = sum(r["loss"] for r in rows[:k]) / k
    last = sum(r["loss"] for r in rows[-k:]) / k
    return math.isfinite(last) and last < first


def summarise(step: str, work: Path, mode: str, peak_tflops: float) -> tuple[dict, str, list[str]]:
    """(values, one-line summary, failed checks) of a finished step."""
    if step == "data":
        meta = json.loads((work / "data" / "stdlib_train.meta.json").read_text())
        corpus_mb = (work / "data" / "stdlib.jsonl").stat().st_size / 1e6
        tasks = sum(1 for _ in open(work / "tasks" / "prompts_train.jsonl"))
        v = {"corpus_mb": corpus_mb, "train_tokens": meta["tokens"], "vocab": meta["vocab_size"], "prompts": tasks}
        return v, (f"{corpus_mb:.1f} MB of stdlib source, {meta['tokens']:,} train tokens, vocab {meta['vocab_size']}, "
                   f"{tasks} PPO prompts"), []  # fmt: skip
    rows = step_rows(work / "runs" / step)
    cfg = yaml.safe_load((work / "configs" / f"{step}.yaml").read_text())
    n, first, last = len(rows), rows[0]["loss"], rows[-1]["loss"]
    v = {"steps": rows[-1]["step"], "loss_first": first, "loss_last": last}
    v["memory_gb"] = max(r["memory_gb"] for r in rows)
    v |= memory_estimate(step, work, mode, v["memory_gb"])
    bad: list[str] = []
    if not all(math.isfinite(r["loss"]) for r in rows):
        bad.append("non-finite loss")
    if step == "a":
        scales = [r.get("loss_scale") for r in rows]
        v |= {"loss_scale_first": scales[0], "loss_scale_last": scales[-1], "loss_scale_min": min(
            (s for s in scales if s is not None), default=None), "skipped_steps": rows[-1].get("ds_skipped_steps"),
            "tokens_per_s": median(rows, "tokens_per_s"), "precision": cfg["train"]["precision"]}  # fmt: skip
        if mode == "gpu":
            if not loss_falls(rows):
                bad.append("fp16 loss did not fall")
            if v["skipped_steps"] is None or v["skipped_steps"] >= n // 2:
                bad.append(f"{v['skipped_steps']} of {n} steps skipped")
        text = (f"{cfg['train']['precision']} loss {num(first)} -> {num(last)} in {v['steps']} steps; loss scale "
                f"{num(v['loss_scale_first'])} -> {num(v['loss_scale_last'])} (min {num(v['loss_scale_min'])}); "
                f"{v['skipped_steps']} skipped steps; {num(v['tokens_per_s'])} tokens/s")  # fmt: skip
        return v, text, bad
    if step == "b":
        warm = SIZES[mode]["b"]["warm"]
        steady = [r for r in rows if r["step"] > warm] or rows
        v |= {"model": cfg["model"]["preset"], "tokens_per_s": median(steady, "tokens_per_s"),
              "mfu": median(steady, "mfu"), "peak_tflops": peak_tflops, "steady_steps": len(steady)}  # fmt: skip
        if v["mfu"] is None:
            bad.append("no mfu in metrics.jsonl")
        mfu = "n/a" if v["mfu"] is None else f"{100 * v['mfu']:.3g}%"
        text = (f"{v['model']} bf16 seq {cfg['data']['seq_len']} x {cfg['train']['micro_batch_size']}: "
                f"{num(v['tokens_per_s'])} tokens/s, MFU {mfu} of {num(peak_tflops)} TFLOPs (median of "
                f"{len(steady)} steps); peak mem {num(v['memory_gb'])} GB")  # fmt: skip
        return v, text, bad
    if step == "ppo":
        epochs = cfg["ppo"]["epochs"]
        by_step = {r["step"]: r for r in rows}
        gen, spent, rates = 0.0, 0.0, []
        for r in rows:  # steps of rollout 2 on: rollout 1 holds the warm-up, and step 1 has no row before it
            k = r["step"]
            if (k - 1) // epochs == 0 or k - 1 not in by_step:
                continue
            spent += r["time"] - by_step[k - 1]["time"]
            if (k - 1) % epochs == 0:  # the rollout's first step: its generation ran inside it
                gen += r["gen_s"]
                rates.append(r["gen_tokens_per_s"])
        share = gen / spent if spent > 0 else None
        rollouts = rows[-1]["step"] // epochs
        v |= {"rollouts": rollouts, "epochs": epochs, "gen_share": share, "gen_tokens_per_s":
              statistics.median(rates) if rates else None, "step_s": spent / max(1, n - epochs),
              "reward": statistics.mean(r["reward"] for r in rows), "response_len": median(rows, "response_len"),
              "train_tokens_per_s": median(rows, "tokens_per_s")}  # fmt: skip
        if share is None:
            bad.append("no generation share (needs 2 rollouts)")
        share_txt = "n/a" if share is None else f"{100 * share:.3g}%"
        text = (f"{rollouts} rollouts x {epochs} epochs: generating {share_txt} of step time at "
                f"{num(v['gen_tokens_per_s'])} tokens/s ({num(v['response_len'])} tokens/answer); "
                f"{num(v['step_s'])} s/step; reward {num(v['reward'])}")  # fmt: skip
        return v, text, bad
    unit = "tokens_per_s" if step == "sft" else "pairs_per_s"
    v[unit] = median(rows, unit)
    text = f"loss {num(first)} -> {num(last)} in {v['steps']} steps; {num(v[unit])} {unit.replace('_per_s', '')}/s"
    return v, text, bad


def memory_estimate(step: str, work: Path, mode: str, measured_gib: float) -> dict:
    """`zerollm estimate`'s peak for this step's run beside the measured one. On a GPU the
    measured value is max_memory_allocated (from 0 at the start): the ratio is the check
    (target within 10%). On CPU (smoke) memory_gb is the whole process's peak RSS, so only the
    estimate is shown (benchmarks/bench_estimate.py compares CPU runs properly)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from launch.launcher import STAGES, import_stage
        from train.config import load_ds_config, load_run_config
        from train.estimate import estimate

        stage = {"a": "pretrain", "b": "pretrain"}.get(step, step)
        module = import_stage(STAGES[stage], stage)
        cfg = load_run_config(
            str(work / "configs" / f"{step}.yaml"), extra_sections=getattr(module, "CONFIG_SECTIONS", None)
        )
        ds = load_ds_config(str(Path(__file__).resolve().parents[1] / DS[step]), cfg, 1)
        kind = "cuda" if mode == "gpu" else "cpu"
        est = estimate(cfg, ds, 1, stage, kind, None, timed=False).peak_bytes / 2**30
    except Exception as e:  # noqa: BLE001 (the estimate is reported, never the reason a step fails)
        return {"memory_estimate_error": f"{type(e).__name__}: {e}"}
    out = {"memory_estimate_gb": est}
    if mode == "gpu" and measured_gib:
        out["memory_estimate_ratio"] = est / measured_gib
    return out


def memory_text(v: dict) -> str:
    if "memory_estimate_gb" not in v:
        return f"; memory estimate failed ({v.get('memory_estimate_error')})"
    ratio = v.get("memory_estimate_ratio")
    return f"; memory estimate {num(v['memory_estimate_gb'])} GiB" + (f" ({ratio:.2f}x measured)" if ratio else "")


def table(mode: str, work: Path, peak_tflops: float, elapsed: float | None = None) -> int:
    results, failed = [], []
    lines = [f"{'row':<5} {'check':<44} {'status':<8} {'wall_s':>7}  result"]
    for step in STEPS:
        status_file = work / "status" / step
        status, wall, note = "missing", None, "not run"
        if status_file.is_file():
            parts = status_file.read_text().split(maxsplit=2)
            status, wall, note = parts[0], float(parts[1]), (parts[2].strip() if len(parts) > 2 else "")
        values: dict = {}
        if status == "ok":
            try:
                values, note, bad = summarise(step, work, mode, peak_tflops)
            except (OSError, ValueError, KeyError, TypeError) as e:
                status, bad, note = "failed", [f"unreadable result: {e}"], ""
            if step != "data":
                note += memory_text(values)
            if bad:
                status = "failed"
                note = f"CHECK FAILED: {'; '.join(bad)}; {note}"
        if status != "ok":
            failed.append(f"{'NOT RUN' if status == 'skipped' else 'FAILED'}: {ROW_IDS[step]} ({step}): {note}")
        results.append({"row": ROW_IDS[step], "step": step, "check": TITLES[step], "status": status, "wall_s": wall,
                        "values": values, "result": note})  # fmt: skip
        lines.append(f"{ROW_IDS[step]:<5} {TITLES[step]:<44} {status:<8} {num(wall, 3) if wall is not None else '-':>7}"
                     f"  {note}")  # fmt: skip
    total = sum(r["wall_s"] or 0.0 for r in results) if elapsed is None else elapsed  # steps may overlap (smoke)
    lines.append(f"{'total':<5} {'wall time of the whole check':<44} {'':<8} {num(total, 4):>7}")
    (work / "results.json").write_text(json.dumps({"mode": mode, "peak_tflops": peak_tflops, "elapsed_s": total,
                                                   "rows": results}, indent=1))  # fmt: skip
    print("\n".join(lines))
    for line in failed:
        print(f"gpu_check: {line}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["config", "table"])
    ap.add_argument("step", nargs="?", choices=[s for s in STEPS if s != "data"])
    ap.add_argument("--mode", choices=list(SIZES), required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--init-from", default="", help="the post-training steps' starting run dir")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="per-device dense bf16 peak for MFU")
    ap.add_argument("--elapsed", type=float, default=None, help="the whole check's wall time (table)")
    args = ap.parse_args(argv)
    if args.what == "table":
        return table(args.mode, args.work, args.peak_tflops, args.elapsed)
    if args.step is None:
        ap.error("config: which step?")
    path = args.work / "configs" / f"{args.step}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = run_config(args.step, args.mode, args.work, args.init_from, args.peak_tflops)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
