"""masked_cross_entropy against hand sums of −log softmax and torch.nn.functional.cross_entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from maskedlm.objective import masked_accuracy_counts, masked_cross_entropy

V = 11


def hand_nll(logits_row, target):
    """−log softmax(z)[t] written out with Python floats: −(z_t − log Σ_j exp z_j)."""
    z = [float(v) for v in logits_row]
    m = max(z)
    return -(z[target] - (m + math.log(sum(math.exp(v - m) for v in z))))


def test_textbook_two_masks_two_terms():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, V)  # one row, two masked positions
    targets = torch.tensor([[3, 7]])
    expected = hand_nll(logits[0, 0], 3) + hand_nll(logits[0, 1], 7)
    got = masked_cross_entropy(logits, targets, reduction="sum")
    assert got.dtype == torch.float32
    assert abs(got.item() - expected) < 1e-6


def test_sum_equals_hand_sum_over_selected_positions_only():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, V) * 3
    targets = torch.full((3, 4), -100)
    targets[0, 1], targets[0, 3] = 2, 9  # a row with two masks
    targets[1, 0] = 5  # a row with one
    targets[2, 2] = 0  # target id 0 is a real id, not "ignore"
    expected = sum(
        hand_nll(logits[b, k], int(targets[b, k])) for b in range(3) for k in range(4) if targets[b, k] != -100
    )
    assert abs(masked_cross_entropy(logits, targets).item() - expected) < 1e-6
    assert abs(masked_cross_entropy(logits, targets.int()).item() - expected) < 1e-6  # int32 targets too
    mean = masked_cross_entropy(logits, targets, reduction="mean").item()
    assert abs(mean - expected / 4) < 1e-6
    none = masked_cross_entropy(logits, targets, reduction="none")
    assert none.shape == targets.shape
    assert torch.all(none[targets == -100] == 0)
    assert abs(none[0, 1].item() - hand_nll(logits[0, 1], 2)) < 1e-6
    # normaliser: the global count of A(x) in the step, not this call's count
    assert abs(masked_cross_entropy(logits, targets, normalizer=10).item() - expected / 10) < 1e-6
    assert abs(masked_cross_entropy(logits, targets, reduction="mean", normalizer=torch.tensor(8.0)).item() - expected / 8) < 1e-6


def test_empty_selection_mean_is_zero_not_nan():
    logits = torch.randn(2, 3, V)
    targets = torch.full((2, 3), -100)
    assert masked_cross_entropy(logits, targets, reduction="mean").item() == 0.0
    assert masked_cross_entropy(logits, targets, reduction="sum").item() == 0.0


def test_outside_selection_changes_nothing_and_gets_zero_gradient():
    torch.manual_seed(2)
    B, T = 2, 9
    dense = torch.randn(B, T, V, requires_grad=True)
    targets = torch.full((B, T), -100)
    targets[0, 2], targets[0, 5], targets[1, 7] = 1, 4, 10
    in_a = targets != -100
    loss = masked_cross_entropy(dense, targets)
    loss.backward()
    assert torch.all(dense.grad[~in_a] == 0)  # exactly zero, not merely small
    assert torch.all(dense.grad[in_a].abs().sum(-1) > 0)
    changed = dense.detach().clone()
    changed[~in_a] = torch.randn_like(changed[~in_a]) * 100
    assert masked_cross_entropy(changed, targets).item() == loss.item()
    # ...while changing a selected position's logits does change it
    changed[0, 2, 1] += 1.0
    assert masked_cross_entropy(changed, targets).item() != loss.item()


def test_equals_torch_cross_entropy_with_ignore_labels():
    torch.manual_seed(3)
    logits = torch.randn(4, 16, 50)
    targets = torch.randint(0, 50, (4, 16))
    targets[torch.rand(4, 16) > 0.3] = -100
    ref_sum = F.cross_entropy(logits.view(-1, 50), targets.view(-1), ignore_index=-100, reduction="sum")
    ref_mean = F.cross_entropy(logits.view(-1, 50), targets.view(-1), ignore_index=-100, reduction="mean")
    assert abs(masked_cross_entropy(logits, targets).item() - ref_sum.item()) < 1e-5 * max(1.0, ref_sum.item())
    assert abs(masked_cross_entropy(logits, targets, reduction="mean").item() - ref_mean.item()) < 1e-6


def test_log_softmax_in_fp32_under_bf16_autocast():
    torch.manual_seed(4)
    logits = (torch.randn(2, 5, V) * 4).to(torch.bfloat16)
    targets = torch.randint(0, V, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = masked_cross_entropy(logits, targets)
    assert got.dtype == torch.float32
    expected = sum(hand_nll(logits[b, k].float(), int(targets[b, k])) for b in range(2) for k in range(5))
    assert abs(got.item() - expected) < 1e-5


def test_accuracy_counts_argmax_hits_at_labelled_positions_only():
    logits = torch.zeros(2, 3, V)
    logits[0, 0, 4] = logits[0, 1, 2] = logits[1, 2, 7] = 1.0
    targets = torch.tensor([[4, 3, -100], [-100, -100, 7]])
    correct, count = masked_accuracy_counts(logits, targets)
    assert (correct.item(), count.item()) == (2, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accuracy_counts_follow_argmax_on_ties(dtype):
    """Top-1 is torch.argmax's: the first maximum when several entries tie (frequent in bf16)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 4, (6, 9, 50), generator=g).to(dtype)  # values 0..3: many ties per row
    targets = torch.randint(0, 50, (6, 9), generator=g)
    targets[:, ::4] = -100
    first = logits.argmax(dim=-1)
    targets[1] = torch.where(targets[1] >= 0, first[1], targets[1])  # some rows right by construction
    correct, count = masked_accuracy_counts(logits, targets)
    in_a = targets != -100
    assert count.item() == in_a.sum().item()
    assert correct.item() == ((first == targets) & in_a).sum().item() > 0


def test_masked_cross_entropy_refuses_an_unknown_reduction_and_shapes_that_disagree():
    with pytest.raises(ValueError, match="reduction"):
        masked_cross_entropy(torch.zeros(1, 2, V), torch.zeros(1, 2, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="disagree"):
        masked_cross_entropy(torch.zeros(1, 2, V), torch.zeros(1, 3, dtype=torch.long))
