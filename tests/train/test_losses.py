"""train/losses.py on tiny tensors; each expected value is worked out by hand below."""

from __future__ import annotations

import math

import pytest
import torch

from train.losses import IGNORE_INDEX, bradley_terry_loss, last_token_index, lm_loss, masked_mean


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
