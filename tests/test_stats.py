"""Paired statistics (apo_jax.eval.stats) on hand-made tables whose intervals are worked out by hand,
and where the paired and the unpaired verdicts differ."""

from __future__ import annotations

import numpy as np
import pytest

from apo_jax.eval import stats

T_2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom (a t table)


def _cell(base_right: list[int], extra: list[int], problems: int = 40) -> np.ndarray:
    """A [3 seeds, problems] 0/1 table: at seed s the first base_right[s] problems are right, and the
    `extra[s]` problems after them too."""
    t = np.zeros((3, problems))
    for s, (n, k) in enumerate(zip(base_right, extra, strict=True)):
        t[s, : n + k] = 1
    return t


def test_paired_and_unpaired_verdicts_differ_on_a_hand_made_table():
    # Seeds move both cells together (8, 20, 32 of 40 right: the shared M of each seed); A is right on
    # 8, 6 and 10 more problems than B at every seed, B never on one A misses.
    b = _cell([8, 20, 32], [0, 0, 0])
    a = _cell([8, 20, 32], [8, 6, 8])
    result = stats.paired(a, b)
    # per-seed differences 8/40, 6/40, 8/40 = 0.2, 0.15, 0.2: mean 0.18333, sample sd 0.028868
    assert result["per_seed"] == pytest.approx([0.2, 0.15, 0.2])
    mean, sd = 0.55 / 3, 0.028867513459481287
    assert result["diff"] == pytest.approx(mean)
    assert result["dof"] == 2
    half = T_2 * sd / np.sqrt(3)
    assert result["t"] == pytest.approx((mean - half, mean + half))  # [0.1116, 0.2550]
    low, high = result["bootstrap"]
    assert 0 < low < mean < high  # 8 of 40 problems win at every seed: a draw without one is rare
    assert stats.verdict(result) == "A beats B" and result["wins"] == 3
    # unpaired: per-seed means A 0.4, 0.65, 1.0 and B 0.2, 0.5, 0.8: Welch's t, seeds' spread of both
    unpaired = stats.unpaired(a, b)
    va, vb = np.var([0.4, 0.65, 1.0], ddof=1) / 3, np.var([0.2, 0.5, 0.8], ddof=1) / 3
    se = np.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    assert unpaired["dof"] == pytest.approx(dof)  # 3.96
    assert unpaired["diff"] == pytest.approx(mean)
    assert unpaired["t"][0] < 0 < unpaired["t"][1]  # ±0.53 around 0.18: the seeds' spread swamps it
    assert unpaired["t"][1] - unpaired["diff"] == pytest.approx(2.7764451051977987 * se, rel=0.02)
    assert stats.verdict(unpaired) == "no difference shown"


def test_non_inferiority_against_a_fixed_margin():
    # A misses one problem of 40 that B gets at every seed, and gets one B misses at one seed
    b = _cell([20, 20, 20], [1, 1, 1])
    a = _cell([20, 20, 20], [0, 0, 1])
    a[1, 30] = 1  # seed 1: a problem B misses
    result = stats.paired(a, b)
    # per-seed differences -1/40, 0, 0: mean -1/120; sd 0.014434; t half-width 4.3027 × 0.014434 / √3
    assert result["per_seed"] == pytest.approx([-0.025, 0.0, 0.0])
    half = T_2 * 0.014433756729740645 / np.sqrt(3)
    assert result["t"] == pytest.approx((-1 / 120 - half, -1 / 120 + half))  # [-0.0442, +0.0275]
    assert stats.verdict(result) == "no difference shown"
    assert not stats.at_least_as_good(result, margin=0.02)  # -0.044 is past -0.02
    assert stats.at_least_as_good(result, margin=0.06)  # bootstrap low end -0.05
    # one seed: the t interval runs over the problems (39 dof)
    one = stats.paired(a[:1], b[:1])
    d = np.zeros(40)
    d[20] = -1
    se = d.std(ddof=1) / np.sqrt(40)
    assert one["dof"] == 39 and one["t"][0] == pytest.approx(-0.025 - 2.0226909117347285 * se)


def test_mismatched_cells_are_refused():
    with pytest.raises(ValueError, match="same seeds and problems"):
        stats.paired(np.zeros((3, 10)), np.zeros((2, 10)))
