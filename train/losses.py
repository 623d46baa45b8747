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


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B,) index of each row's last real token (left or right padding)."""
    T = attention_mask.size(1)
    pos = torch.arange(T, device=attention_mask.device)  # (T,)
    return (attention_mask.long() * pos).argmax(dim=1)  # the largest position whose mask is 1


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Summed -log sigmoid(r_chosen - r_rejected - margin) over pairs, all (B,); fp32."""
    diff = r_chosen.float() - r_rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    return -F.logsigmoid(diff).sum()
