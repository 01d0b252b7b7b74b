"""The comparison helpers the golden tests rest on: normwise bounds, exactness where defined, near-ties."""

from __future__ import annotations

import pytest
import torch
from testkit import NearTies, close, code_margins


def test_close_bound_is_normwise():
    expected = torch.tensor([100.0, 1e-3])
    close(expected + torch.tensor([0.0, 9e-4]), expected, rtol=1e-5)  # 9e-4 ≤ 1e-5·100 near zero
    with pytest.raises(AssertionError, match=r"logits: \|Δ\| = 0.0011 > allowed 0.001 at \(1,\)"):
        close(expected + torch.tensor([0.0, 1.1e-3]), expected, rtol=1e-5, what="logits")
    close(torch.tensor([0.5]), torch.tensor([0.5 + 9e-6]))  # magnitudes below 1 count as 1
    with pytest.raises(AssertionError, match="exceed"):
        close(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 1.0]))
    with pytest.raises(AssertionError, match="exceed"):
        close(torch.tensor([1.0 + 1e-7]), torch.tensor([1.0]), rtol=0)  # rtol 0: equality


def test_near_ties_exact_where_defined_and_reported():
    ties = NearTies("sets/var/s1")
    ref = torch.tensor([[3, 4, 5]])
    margin = torch.tensor([[1.0, 1e-6, 1.0]])
    ties.exact(torch.tensor([[3, 9, 5]]), ref, margin, 1e-4, "f.pt key")  # the near-tie may differ
    assert ties.found == ["f.pt key at (0, 1): margin 1e-06 <= float32 noise 0.0001"]
    with pytest.raises(AssertionError, match=r"f.pt key: 1 of 2 defined indices differ, first at \(0, 2\)"):
        ties.exact(torch.tensor([[3, 4, 6]]), ref, margin, 1e-4, "f.pt key")
    with pytest.raises(
        pytest.skip.Exception, match=r"var/s1: near-ties .* f.pt key at \(0, 1\): margin 1e-06"
    ):
        ties.report()
    NearTies("sets/var/s1").report()  # nothing found: no skip


def test_sampled_sequence_stops_comparing_after_a_flipped_near_tie():
    ties = NearTies("s")
    ref = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    margin = torch.tensor([[1.0, 1e-9, 1.0, 1.0], [1.0, 1e-9, 1.0, 1.0]])
    steps = torch.tensor([0, 1, 1, 2])  # positions 1 and 2 are sampled together
    ours = torch.tensor([[1, 7, 3, 9], [1, 2, 3, 4]])  # row 0: the near-tie flipped, later steps differ
    full = ties.exact_sampled(ours, ref, margin, torch.tensor(1e-6), "seq", steps)
    assert full.tolist() == [False, True]
    assert any("row 0: steps after 1 not comparable" in f for f in ties.found)
    with pytest.raises(
        AssertionError, match=r"first at \(0, 2\)"
    ):  # same step as the near-tie: still defined
        ties.exact_sampled(
            torch.tensor([[1, 7, 8, 4], [1, 2, 3, 4]]), ref, margin, torch.tensor(1e-6), "seq", steps
        )


def test_decisions_leave_out_ties_by_construction_without_a_skip():
    ties = NearTies("s")
    ref_pos, ref_neg = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([1.0, 1.0, 3.0])
    ours_pos, ours_neg = torch.tensor([1.0 + 1e-6, 2.0, 0.0]), torch.tensor([1.0, 1.0, 3.0])
    tied = torch.tensor([True, False, False])
    compared = ties.exact_decisions(ours_pos, ours_neg, ref_pos, ref_neg, 1e-3, "acc", tied)
    assert compared.tolist() == [False, True, True] and ties.found == []
    with pytest.raises(AssertionError, match="acc"):
        ties.exact_decisions(torch.tensor([1.0, 0.5, 0.0]), ours_neg, ref_pos, ref_neg, 1e-3, "acc", tied)


@pytest.mark.parametrize("normalize", [False, True])
def test_code_margin_noise_bounds_the_change_a_latent_error_makes(normalize):
    g = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(64, 8, generator=g, dtype=torch.float64) * 3, torch.randn(32, 8, generator=g)
    eps = 1e-5
    margin, noise, nearest = code_margins(z, codebook, eps, normalize=normalize)
    assert (margin >= 0).all() and (nearest >= 0).all() and (noise > 0).all()
    for _ in range(20):  # corners of the error box never move the margin by more than the noise
        delta = eps * torch.sign(torch.randn(z.shape, generator=g, dtype=torch.float64))
        moved, _, _ = code_margins(z + delta, codebook, eps, normalize=normalize)
        keep = margin > 2 * noise  # same two nearest codes
        assert ((moved - margin).abs()[keep] <= 1.01 * noise[keep] + 1e-12).all()
