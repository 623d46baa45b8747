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


# ----------------------------------------------------------------------------- policy optimisation
# Shapes: B rows (rollouts), T positions; `mask` (B, T) is 1 on response tokens (the
# actions), 0 on prompt and padding. Per-token tensors are fp32.


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) logits, (B, T) tokens -> (B, T) log p(token), softmax in fp32 at `temperature`."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)  # (B, T, V)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) -> (B, T) entropy of the sampling distribution, fp32."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of sampled tokens.

    k1 = logp - ref_logp (unbiased, can be negative); k3 = exp(r) - 1 - r with
    r = ref_logp - logp (unbiased, never negative, lower variance; Schulman 2020).
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        r = ref_logp - logp
        return torch.expm1(r) - r
    raise ValueError(f"kl estimator {kind!r}: expected k1 or k3")


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
    """(sum, sum of squares, count) of `values` where `mask`: all-reduce these across ranks,
    then `masked_whiten(values, mask, moments)` whitens with the global batch's statistics."""
    m = mask.to(values.dtype)
    return float((values * m).sum()), float((values * values * m).sum()), float(m.sum())


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, moments: tuple[float, float, float] | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """(values - mean) / std over the masked entries (population std), 0 outside the mask.
    `moments` = summed masked_moments of the global batch; None: this tensor's own."""
    s, s2, n = moments if moments is not None else masked_moments(values, mask)
    n = max(n, 1.0)
    mean = s / n
    var = max(s2 / n - mean * mean, 0.0)
    return (values - mean) / (var**0.5 + eps) * mask.to(values.dtype)


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's response tokens.

    rewards, values, mask: (B, T); the episode of a row is its masked positions (contiguous),
    the value after the last one is 0 (the episode ends). delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = delta_t + gamma lam A_{t+1}. Returns (advantages, returns = A + V), 0 off the mask.
    """
    m = mask.to(values.dtype)
    B, T = values.shape
    adv = torch.zeros_like(values)
    next_adv = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_value = torch.zeros_like(next_adv)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = (delta + gamma * lam * next_adv) * m[:, t]
        adv[:, t] = a
        # Off the mask, carry nothing into the step before (the episode ends at its last token).
        next_adv = a
        next_value = values[:, t] * m[:, t]
    return adv, (adv + values) * m


def ppo_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate (Schulman et al. 2017), summed over masked tokens:
    max(-A ratio, -A clip(ratio, 1-eps, 1+eps)) with ratio = exp(logp - old_logp).
    Also returns sums over masked tokens: "clipped" (tokens where the clipped term won)
    and "approx_kl" (0.5 (logp - old_logp)^2); divide by the token count for means."""
    m = mask.to(logp.dtype)
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = (torch.maximum(unclipped, clipped) * m).sum()
    with torch.no_grad():
        stats = {
            "clipped": float(((clipped > unclipped).to(m.dtype) * m).sum()),
            "approx_kl": float((0.5 * log_ratio.pow(2) * m).sum()),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss, summed over masked tokens: 0.5 max((V - R)^2, (V_clip - R)^2) with
    V_clip = old_V + clamp(V - old_V, -clip, clip). Also "clipped": tokens where V_clip's term won."""
    m = mask.to(values.dtype)
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    a, b = (values - returns).pow(2), (v_clip - returns).pow(2)
    loss = 0.5 * (torch.maximum(a, b) * m).sum()
    return loss, {"clipped": float(((b > a).to(m.dtype) * m).sum())}


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024): (N,) rewards of N / group_size prompts x group_size samples,
    consecutive -> (r - group mean) / (group std + eps), population std; `scale=False`
    only centres (no division by the std, which up-weights near-uniform groups)."""
    g = rewards.float().view(-1, group_size)  # (prompts, group)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (g.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centred.reshape(-1)


def dpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct preference optimisation (Rafailov et al. 2023), summed over pairs, all (B,)
    summed log-probs of the response tokens. h = (pi_c - ref_c) - (pi_r - ref_r):

    sigmoid       -log sigmoid(beta h); ln 2 per pair when policy == reference
    conservative  -(1 - s) log sigmoid(beta h) - s log sigmoid(-beta h), s = label_smoothing
                  (the labels are wrong with probability s; Mitchell 2023)
    ipo           (h - 1 / (2 beta))^2 (Azar et al. 2023; beta is their tau)

    Also returns the implicit rewards beta (pi - ref) of chosen and rejected, (B,).
    """
    c = pi_chosen.float() - ref_chosen.float()
    r = pi_rejected.float() - ref_rejected.float()
    h = c - r
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif kind == "conservative":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)).pow(2)
    else:
        raise ValueError(f"dpo loss {kind!r}: expected sigmoid, conservative or ipo")
    return losses.sum(), {"chosen_reward": (beta * c).detach(), "rejected_reward": (beta * r).detach()}
