"""Counter-based sampling noise: Philox4x32-10 in int64 tensor ops against known answers and a pure-Python
implementation, determinism, independence from batch composition, and uniformity."""

from __future__ import annotations

import math

import pytest
import torch

from ccalign.models.sampling import CounterRNG, _mulhilo32, draw_uniform, philox4x32
from ccalign.sample.generate import sample_noise, sample_seed

# Random123's known-answer vectors (kat_vectors): counter (4 words), key (2 words) -> output (4 words)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def philox_reference(counter, key, rounds=10):
    """Philox4x32 from the paper, on Python integers (full-width products, no tensor tricks)."""
    x, (k0, k1) = list(counter), key
    for _ in range(rounds):
        p0, p1 = 0xD2511F53 * x[0], 0xCD9E8D57 * x[2]
        x = [(p1 >> 32) ^ x[1] ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ x[3] ^ k1, p0 & 0xFFFFFFFF]
        k0, k1 = (k0 + 0x9E3779B9) % 2**32, (k1 + 0xBB67AE85) % 2**32
    return tuple(x)


def uniform_reference(key: int, lane: int, step: int, stream: int) -> float:
    word = philox_reference((lane, step, stream, 0), (key % 2**32, key >> 32))[0]
    return (word >> 8) / 2**24


def words(values) -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=torch.int64) for v in values]


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_known_answers(counter, key, expected):
    assert philox_reference(counter, key) == expected
    assert tuple(int(w) for w in philox4x32(words(counter), words(key))) == expected


def test_mulhilo_is_the_exact_64_bit_product():
    g = torch.Generator().manual_seed(0)
    a = torch.cat([torch.randint(0, 2**32, (2000,), generator=g), torch.tensor([0, 1, 2**32 - 1])])
    for m in (0xD2511F53, 0xCD9E8D57, 2**32 - 1, 1):
        hi, lo = _mulhilo32(a, m)
        for x, h, low in zip(a.tolist(), hi.tolist(), lo.tolist(), strict=True):
            assert (h << 32) | low == x * m


def test_uniforms_equal_the_pure_python_values():
    keys = [0, 1, 2**32 + 7, 2**64 - 1, sample_seed(3, 17)]
    rng = CounterRNG(keys)
    for step, stream in ((0, 0), (5, 0), (9, 1), (2**32 - 1, 3)):
        u = rng.uniform(6, step, stream)
        assert u.dtype == torch.float32 and u.shape == (len(keys), 6)
        expected = [[uniform_reference(k, lane, step, stream) for lane in range(6)] for k in keys]
        assert u.tolist() == expected  # exact: 24-bit values are exact in float32


def test_rows_depend_only_on_their_key():
    keys = [sample_seed(0, i) for i in range(7)]
    together = CounterRNG(keys).uniform(50, step=3)
    for b, key in enumerate(keys):
        assert torch.equal(CounterRNG([key]).uniform(50, step=3)[0], together[b])
    shuffled = CounterRNG(keys[::-1]).uniform(50, step=3)
    assert torch.equal(shuffled, together.flip(0))
    again = CounterRNG(keys).uniform(50, step=3)
    assert torch.equal(again, together)  # nothing is consumed: a draw can be repeated
    assert torch.equal(CounterRNG(keys).uniform(80, step=3)[:, :50], together)  # lanes do not shift


def test_keys_steps_lanes_and_streams_give_different_draws():
    rng = CounterRNG([sample_seed(0, 0), sample_seed(0, 1), sample_seed(1, 0)])
    base = rng.uniform(1000)
    assert len({tuple(row) for row in base.tolist()}) == 3  # other sample, other seed: other noise
    for other in (rng.uniform(1000, step=1), rng.uniform(1000, stream=1)):
        assert (other != base).float().mean() > 0.99
    assert len(set(base[0].tolist())) > 990  # lanes differ (24-bit values: a few collisions possible)


def test_uniformity():
    u = CounterRNG(range(4)).uniform(2**16, step=11).flatten().double()  # 262,144 draws
    assert u.min() >= 0 and u.max() < 1
    assert torch.equal(u * 2**24, (u * 2**24).round())  # multiples of 2**-24
    n, bins = len(u), 64
    counts = torch.bincount((u * bins).long(), minlength=bins).double()
    chi2 = ((counts - n / bins) ** 2 / (n / bins)).sum().item()
    assert chi2 < 120  # 63 degrees of freedom: p < 1e-5 above 120
    assert abs(u.mean().item() - 0.5) < 5 / math.sqrt(12 * n)
    assert abs(u.var().item() - 1 / 12) < 0.002
    lag = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()  # neighbouring lanes
    assert abs(lag) < 5 / math.sqrt(n)


def test_draw_uniform_from_a_counter_rng():
    rng = sample_noise(4, [10, 11, 12], "cpu")
    assert torch.equal(draw_uniform(rng, 3, 5, "cpu", step=2, stream=1), rng.uniform(5, 2, 1))
    with pytest.raises(ValueError, match="3 CounterRNG keys for a batch of 2"):
        draw_uniform(rng, 2, 5, "cpu")
    with pytest.raises(ValueError, match="keys must be integers"):
        CounterRNG([2**64])
