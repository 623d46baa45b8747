"""Metrics on rank 0: metrics.jsonl, TensorBoard, a progress bar with ETA, a loss-curve PNG.

Other ranks get a `Metrics(enabled=False)` whose methods do nothing, so stage code
calls them unconditionally.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("zerollm")


class Metrics:
    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool,
        tensorboard: bool,
        total_steps: int,
        start_step: int,
        stage: str = "train",
    ):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.file = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        if tensorboard:
            try:
                # kept local: tensorboard/matplotlib are heavy and optional here; tqdm only for the bar
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; metrics go to metrics.jsonl only")
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc=stage, unit="step", dynamic_ncols=True)
        self.t0 = time.time()

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
        if self.bar is not None and "loss" in values:
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values.get('lr', 0):.2e}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self, plot: bool = True) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.file.close()
        if plot:
            plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, out: Path) -> None:
    """Train (and eval) loss against step, from metrics.jsonl (last value wins per step)."""
    rows = read_metrics(metrics_path)
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    if not train:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sorted(train), [train[s] for s in sorted(train)], label="train loss")
    if evals:
        ax.plot(sorted(evals), [evals[s] for s in sorted(evals)], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_curves(
    metrics_path: str | Path, out: str | Path, panels: dict[str, list[str]], title: str = ""
) -> Path | None:
    """One PNG, one panel per entry of `panels` (panel title -> metrics.jsonl keys, each a
    line against step; keys starting with `eval_` drawn with markers). Returns `out`, or
    None when no key of any panel has a value."""
    rows = read_metrics(metrics_path)
    series = {
        k: {r["step"]: r[k] for r in rows if isinstance(r.get(k), (int, float))} for ks in panels.values() for k in ks
    }
    shown = {name: [k for k in ks if series[k]] for name, ks in panels.items()}
    shown = {name: ks for name, ks in shown.items() if ks}
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.4), squeeze=False)
    for ax, (name, keys) in zip(axes[0], shown.items()):
        for k in keys:
            steps = sorted(series[k])
            ax.plot(steps, [series[k][s] for s in steps], "o-" if k.startswith("eval_") else "-", label=k)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
