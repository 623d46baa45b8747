"""Learning-rate schedules: one pure function of the optimizer step.

    lr_at(step, peak, floor, warmup, total, kind, decay_fraction)

1. step < warmup: linear warmup from peak/warmup to peak (step 0 gets peak/warmup,
   never 0, so the first update is not wasted).
2. cosine: from peak at the end of warmup down to floor at `total` (Loshchilov &
   Hutter 2017), held at floor afterwards.
   wsd: warmup-stable-decay (Hu et al. 2024, MiniCPM): peak until the last
   `decay_fraction` of `total`, then linear to floor.
   constant: peak.
"""

from __future__ import annotations

import math


def lr_at(
    step: int,
    peak: float,
    floor: float,
    warmup: int,
    total: int,
    kind: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    if kind == "cosine":
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)
    if kind == "wsd":
        decay_steps = max(1, round(decay_fraction * total))
        decay_start = max(warmup, total - decay_steps)
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return peak + progress * (floor - peak)
    raise ValueError(f"unknown schedule {kind!r} (valid: cosine, wsd, constant)")
