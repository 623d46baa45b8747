"""Pure tensor math of every stage: tensors in, tensors out.

No model, no engine, no distributed code here, so each function is tested on 2-4
element tensors with the expected value worked out by hand (tests/train/test_losses.py).
Losses are *sums* with a separate count wherever a stage normalises by a global count
(valid tokens, pairs) across ranks and micro batches: the shared loop divides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # target id of a position without loss (padding, prompt tokens)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy summed over valid targets, and their count.

    logits (B, T, V), targets (B, T) with IGNORE_INDEX where there is no loss. The
    softmax runs in fp32 even for bf16 logits.
    """
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),  # (B*T, V)
        targets.reshape(-1),  # (B*T,)
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((targets != IGNORE_INDEX).sum())


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is true; 0 when nothing is selected (not NaN)."""
    mask = mask.to(values.dtype).expand_as(values)
    return (values * mask).sum() / mask.sum().clamp(min=1)
