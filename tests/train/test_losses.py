"""train/losses.py on tiny tensors; each expected value is worked out by hand below."""

from __future__ import annotations

import math

import pytest
import torch

from train.losses import (
    IGNORE_INDEX,
    bradley_terry_loss,
    compute_gae,
    dpo_loss,
    entropy,
    group_advantages,
    kl_penalty,
    last_token_index,
    lm_loss,
    masked_mean,
    masked_moments,
    masked_whiten,
    ppo_policy_loss,
    token_logprobs,
    value_loss,
)


def test_lm_loss_sums_valid_targets_and_counts_them():
    # Vocabulary of 2, uniform logits: every valid token costs ln 2.
    # Row 0: targets (1, IGNORE) -> one valid token; row 1: (0, 1) -> two.
    logits = torch.zeros(2, 2, 2)
    targets = torch.tensor([[1, IGNORE_INDEX], [0, 1]])
    loss, count = lm_loss(logits, targets)
    assert count == 3
    assert math.isclose(float(loss), 3 * math.log(2), rel_tol=1e-6)


def test_lm_loss_of_a_confident_prediction():
    # logits (0, ln 3) -> p = (1/4, 3/4): target 1 costs -ln(3/4) = 0.28768, target 0 costs ln 4 = 1.38629.
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]])
    loss, count = lm_loss(logits, torch.tensor([[1, 0]]))
    assert count == 2
    assert math.isclose(float(loss), -math.log(0.75) + math.log(4), rel_tol=1e-6)  # 1.67398


def test_lm_loss_runs_the_softmax_in_fp32_for_bf16_logits():
    logits = torch.tensor([[[0.0, math.log(3)]]], dtype=torch.bfloat16)
    loss, _ = lm_loss(logits, torch.tensor([[1]]))
    assert loss.dtype == torch.float32
    # bf16 rounds ln 3 = 1.098612 to 1.1015625 (8 bits of mantissa); -log(sigmoid(1.1015625)) = 0.28695
    assert math.isclose(float(loss), math.log1p(math.exp(-1.1015625)), rel_tol=1e-5)


def test_lm_loss_with_nothing_valid_is_zero_over_zero_tokens():
    loss, count = lm_loss(torch.zeros(1, 2, 3), torch.full((1, 2), IGNORE_INDEX))
    assert count == 0 and float(loss) == 0.0


def test_masked_mean_averages_only_selected_values():
    # (1 + 3) / 2 = 2: the 100 is masked out.
    values = torch.tensor([1.0, 100.0, 3.0])
    assert float(masked_mean(values, torch.tensor([True, False, True]))) == 2.0


def test_masked_mean_broadcasts_a_mask_over_rows():
    # mask (2, 1) keeps row 0 only: mean of (2, 4) = 3.
    values = torch.tensor([[2.0, 4.0], [10.0, 20.0]])
    assert float(masked_mean(values, torch.tensor([[1], [0]]))) == 3.0


def test_masked_mean_of_an_empty_selection_is_zero_not_nan():
    assert float(masked_mean(torch.tensor([5.0, 7.0]), torch.tensor([False, False]))) == 0.0


def test_last_token_index_under_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    # right padding: 3 real tokens -> index 2; left padding: the last column 4; one token: 0; full: 4
    assert last_token_index(mask).tolist() == [2, 4, 0, 4]


def test_bradley_terry_loss_by_hand():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    # -log sigmoid(2) - log sigmoid(0) = log(1 + e^-2) + log 2 = 0.126928 + 0.693147 = 0.820075
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(0.820075, abs=1e-6)
    # margin (1, 0): -log sigmoid(2 - 1) - log sigmoid(0) = log(1 + e^-1) + log 2 = 0.313262 + 0.693147
    assert bradley_terry_loss(rc, rr, torch.tensor([1.0, 0.0])).item() == pytest.approx(1.006409, abs=1e-6)
    # swapping chosen and rejected: log(1 + e^2) + log 2 = 2.126928 + 0.693147 = 2.820075
    assert bradley_terry_loss(rr, rc).item() == pytest.approx(2.820075, abs=1e-6)


# ----------------------------------------------------------------------------- policy optimisation


def test_token_logprobs_at_temperature_one_and_two():
    # logits (0, ln 3): p(1) = 3/4. At temperature 2: (0, ln 3 / 2) -> p(1) = sqrt3 / (1 + sqrt3) = 0.633975.
    logits = torch.tensor([[[0.0, math.log(3)]]])
    assert math.isclose(float(token_logprobs(logits, torch.tensor([[1]]))), math.log(0.75), rel_tol=1e-6)
    got = float(token_logprobs(logits, torch.tensor([[1]]), temperature=2.0))
    assert math.isclose(got, math.log(math.sqrt(3) / (1 + math.sqrt(3))), rel_tol=1e-6)


def test_entropy_of_uniform_and_certain_distributions():
    # Uniform over 4: ln 4 = 1.386294; one logit far above the rest: ~0.
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    e = entropy(logits)
    assert math.isclose(float(e[0, 0]), math.log(4), rel_tol=1e-6) and float(e[0, 1]) < 1e-6


def test_kl_estimators_k1_and_k3():
    # p = 0.5 (policy), q = 0.25 (reference): k1 = ln 2 = 0.693147;
    # k3 with r = ln q - ln p = -ln 2: e^r - 1 - r = 0.5 - 1 + 0.693147 = 0.193147.
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert math.isclose(float(kl_penalty(logp, ref, "k1")), math.log(2), rel_tol=1e-6)
    assert math.isclose(float(kl_penalty(logp, ref, "k3")), 0.5 - 1 + math.log(2), rel_tol=1e-5)
    assert float(kl_penalty(ref, ref, "k3")) == 0.0
    with pytest.raises(ValueError, match="k1 or k3"):
        kl_penalty(logp, ref, "k2")


def test_masked_whiten_uses_only_masked_values():
    # Masked values 1, 2, 3 (100 is padding): mean 2, population variance 2/3, std 0.816497
    # -> -1.224745, 0, 1.224745, and 0 on the padding.
    v, m = torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1, 1, 1, 0])
    assert masked_moments(v, m) == (6.0, 14.0, 3.0)
    w = masked_whiten(v, m)
    assert w.tolist() == pytest.approx([-1.224745, 0.0, 1.224745, 0.0], abs=1e-5)
    # Given global moments (e.g. summed over ranks), those are used instead: mean 1, var 1.
    assert masked_whiten(v, m, (2.0, 4.0, 2.0)).tolist() == pytest.approx([0.0, 1.0, 2.0, 0.0], abs=1e-6)


def test_gae_on_a_three_step_response_between_prompt_and_padding():
    # Positions: prompt, a0, a1, a2, pad. rewards (0, 0, 1) on the actions, V = (0.5, 0.6, 0.7);
    # values on the prompt and padding are 9 and must not leak in. gamma 0.9, lambda 0.8:
    # t2: delta = 1 + 0 - 0.7 = 0.3                       A2 = 0.3
    # t1: delta = 0 + 0.9 * 0.7 - 0.6 = 0.03              A1 = 0.03 + 0.72 * 0.3 = 0.246
    # t0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04              A0 = 0.04 + 0.72 * 0.246 = 0.21712
    # returns = A + V = 0.71712, 0.846, 1.0
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert adv[0].tolist() == pytest.approx([0.0, 0.21712, 0.246, 0.3, 0.0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.0, 0.71712, 0.846, 1.0, 0.0], abs=1e-6)


def test_gae_with_lambda_one_is_the_discounted_return_minus_the_value():
    # lambda 1, gamma 0.5, rewards (1, 2), V = (0, 0): A1 = 2, A0 = 1 + 0.5 * 2 = 2.
    adv, _ = compute_gae(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=0.5, lam=1.0)
    assert adv[0].tolist() == pytest.approx([2.0, 2.0])


def test_ppo_policy_loss_clips_on_both_sides_of_one_plus_minus_eps():
    # eps 0.2. Tokens (ratio, A): (1.5, +1): -1.5 vs clipped -1.2 -> -1.2, clipped term wins;
    # (0.5, -1): 0.5 vs clip 0.8 -> 0.8, clipped wins; (1, 2): -2 both; (1.5, -1): 1.5 vs 1.2
    # -> 1.5 (pessimistic: the unclipped term); a 5th token is masked out. Sum -1.2 + 0.8 - 2 + 1.5 = -0.9.
    # approx_kl = 0.5 (ln^2 1.5 + ln^2 0.5 + 0 + ln^2 1.5) = 0.5 (0.164402 + 0.480453 + 0.164402) = 0.404628
    ratio = torch.tensor([[1.5, 0.5, 1.0, 1.5, 3.0]])
    old = torch.zeros(1, 5)
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = ppo_policy_loss(ratio.log(), old, adv, mask, clip_eps=0.2)
    assert math.isclose(float(loss), -0.9, rel_tol=1e-6)
    assert stats["clipped"] == 2.0 and math.isclose(stats["approx_kl"], 0.404628, rel_tol=1e-5)


def test_ppo_policy_loss_at_ratio_one_is_minus_the_advantage_and_its_gradient():
    # ratio 1 (the first mini-batch of a rollout): loss = -sum A, d loss / d logp = -A.
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, stats = ppo_policy_loss(logp, torch.zeros(1, 2), torch.tensor([[0.5, -2.0]]), torch.ones(1, 2), 0.2)
    loss.backward()
    assert float(loss) == pytest.approx(1.5) and logp.grad.tolist() == [[-0.5, 2.0]] and stats["clipped"] == 0


def test_value_loss_takes_the_larger_of_clipped_and_unclipped():
    # clip 0.2, old V 0.5. Token 1: V 1, R 0: (1)^2 = 1 vs V_clip 0.7: 0.49 -> 1.
    # Token 2: V 2, R 2: 0 vs V_clip 0.7: 1.69 -> 1.69 (clipped wins). 0.5 (1 + 1.69) = 1.345.
    loss, stats = value_loss(
        torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]), torch.tensor([0.0, 2.0]), torch.ones(2), clip=0.2
    )
    assert math.isclose(float(loss), 1.345, rel_tol=1e-6) and stats["clipped"] == 1.0


def test_group_advantages_normalise_within_each_group():
    # Group (1, 0, 0, 0): mean 0.25, population std sqrt(0.1875) = 0.4330127
    # -> 1.732051, -0.577350 x3. Group (1, 1, 1, 1): no signal -> 0, not NaN.
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]), group_size=4)
    assert a.tolist() == pytest.approx([1.732051, -0.57735, -0.57735, -0.57735, 0, 0, 0, 0], abs=1e-5)
    centred = group_advantages(torch.tensor([1.0, 0.0]), group_size=2, scale=False)
    assert centred.tolist() == [0.5, -0.5]


def test_dpo_loss_is_ln2_per_pair_when_policy_equals_reference():
    lp = torch.tensor([-3.0, -7.5])
    loss, stats = dpo_loss(lp, lp + 1, lp, lp + 1, beta=0.1)
    assert math.isclose(float(loss), 2 * math.log(2), rel_tol=1e-6)
    assert stats["chosen_reward"].tolist() == [0.0, 0.0]


def test_dpo_variants_on_a_worked_pair():
    # pi_c -1, pi_r -3, ref_c -2, ref_r -2: h = (1) - (-1) = 2; beta 0.5 -> beta h = 1.
    # sigmoid: ln(1 + e^-1) = 0.313262; conservative s = 0.1: 0.9 * 0.313262 + 0.1 * ln(1 + e) = 0.413262;
    # ipo: (2 - 1 / (2 * 0.5))^2 = 1. Implicit rewards: 0.5 * 1 = 0.5 and 0.5 * -1 = -0.5.
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    loss, stats = dpo_loss(*args)
    assert math.isclose(float(loss), math.log1p(math.exp(-1)), rel_tol=1e-6)
    assert stats["chosen_reward"].tolist() == [0.5] and stats["rejected_reward"].tolist() == [-0.5]
    loss, _ = dpo_loss(*args, kind="conservative", label_smoothing=0.1)
    assert math.isclose(float(loss), 0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.e), rel_tol=1e-6)
    assert math.isclose(float(dpo_loss(*args, kind="ipo")[0]), 1.0, rel_tol=1e-6)
