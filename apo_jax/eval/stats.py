"""Paired comparisons of two cells scored on the same problems over the same seeds.

Each cell is a table `[seeds, problems]` of per-problem scores (a greedy answer's 0/1, or the share of
a problem's samples that are right), rows in the same seed order and columns in the same problem order
for both cells: at one seed two cells share M, its answers and the problems, so their difference is
measured on the same footing (paired) and the variance they share cancels.

`paired(a, b)` gives the mean difference a − b with two 95% intervals:
- `t`: Student's t over the seeds' mean differences, with seeds − 1 degrees of freedom (with one
  seed, over the problems' differences, problems − 1 degrees of freedom);
- `bootstrap`: the percentile interval of the mean difference when seeds and problems are both
  resampled with replacement (one draw of problems shared by every drawn seed, since every seed is
  scored on the same problems).
`verdict` marks a claim from them: "A beats B" when both intervals lie above 0, "B beats A" when both
lie below, else no difference shown; `at_least_as_good` holds when both lower ends lie above −margin,
a non-inferiority margin fixed before looking at the numbers. `unpaired(a, b)` (Welch's t over the
seeds' means, as if the cells were independent) is here to show what the pairing buys.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as _scipy_stats

LEVEL = 0.95
MARGIN = 0.02  # the non-inferiority margin, absolute accuracy (README, "What the miniature shows")


def _table(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"a cell's scores are a [seeds, problems] table, got shape {x.shape}")
    return x


def t_interval(values, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval of the mean of `values` (n − 1 degrees of freedom)."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan
    half = float(_scipy_stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


def bootstrap_interval(d, level: float = LEVEL, draws: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """The percentile interval of the mean of a [seeds, problems] table when seeds and problems are
    resampled with replacement (one problem draw shared by the drawn seeds)."""
    d = _table(d)
    n_seeds, n_problems = d.shape
    rng = np.random.default_rng(seed)
    means = np.empty(draws)
    for start in range(0, draws, 500):
        k = min(500, draws - start)
        seeds = rng.integers(0, n_seeds, size=(k, n_seeds))
        problems = rng.integers(0, n_problems, size=(k, n_problems))
        # mean over the drawn seeds of each drawn seed's mean over the drawn problems
        per_problem = d[:, problems]  # [seeds, k, problems]
        per_seed = per_problem.mean(axis=2).T  # [k, seeds]
        means[start : start + k] = np.take_along_axis(per_seed, seeds, axis=1).mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def paired(a, b, *, level: float = LEVEL, draws: int = 10_000, seed: int = 0) -> dict:
    """The difference a − b of two cells paired by seed and problem (see the module's docstring)."""
    a, b = _table(a), _table(b)
    if a.shape != b.shape:
        raise ValueError(f"paired cells need the same seeds and problems: shapes {a.shape} and {b.shape}")
    d = a - b
    n_seeds = d.shape[0]
    per_seed = d.mean(axis=1)
    _, t_low, t_high = t_interval(per_seed if n_seeds > 1 else d[0], level)
    b_low, b_high = bootstrap_interval(d, level, draws, seed)
    return {
        "diff": float(d.mean()),
        "t": (t_low, t_high),
        "dof": (n_seeds if n_seeds > 1 else d.shape[1]) - 1,
        "bootstrap": (b_low, b_high),
        "seeds": n_seeds,
        "problems": d.shape[1],
        "per_seed": [float(x) for x in per_seed],
        "wins": int((per_seed > 0).sum()),  # seeds where a is ahead
    }


def unpaired(a, b, level: float = LEVEL) -> dict:
    """a − b as if the cells were independent: Welch's t over each cell's per-seed means."""
    ma, mb = _table(a).mean(axis=1), _table(b).mean(axis=1)
    va, vb = ma.var(ddof=1) / len(ma), mb.var(ddof=1) / len(mb)
    se = math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(ma) - 1) + vb**2 / (len(mb) - 1)) if se else math.inf
    half = float(_scipy_stats.t.ppf(0.5 + level / 2, dof)) * se
    diff = float(ma.mean() - mb.mean())
    return {"diff": diff, "t": (diff - half, diff + half), "dof": dof}


def _lows_highs(result: dict) -> tuple[list[float], list[float]]:
    intervals = [iv for k in ("t", "bootstrap") if (iv := result.get(k)) and not math.isnan(iv[0])]
    return [iv[0] for iv in intervals], [iv[1] for iv in intervals]


def verdict(result: dict) -> str:
    """ "A beats B", "B beats A" or "no difference shown", from every interval `result` holds."""
    lows, highs = _lows_highs(result)
    if lows and min(lows) > 0:
        return "A beats B"
    if highs and max(highs) < 0:
        return "B beats A"
    return "no difference shown"


def at_least_as_good(result: dict, margin: float = MARGIN) -> bool:
    """Non-inferiority: A is at least as good as B when every interval's lower end is above −margin."""
    lows, _ = _lows_highs(result)
    return bool(lows) and min(lows) > -margin


def describe(result: dict, digits: int = 3) -> str:
    """'+0.012 (t [−0.004, +0.028], bootstrap [+0.001, +0.023]; ahead at 3 of 3 seeds)'."""
    f = f"+.{digits}f"
    parts = [f"t, {result['dof']} dof [{result['t'][0]:{f}}, {result['t'][1]:{f}}]"]
    if "bootstrap" in result:
        parts.append(f"bootstrap [{result['bootstrap'][0]:{f}}, {result['bootstrap'][1]:{f}}]")
    text = f"{result['diff']:{f}} (95%: " + ", ".join(parts)
    if "wins" in result:
        text += f"; ahead at {result['wins']} of {result['seeds']} seeds"
    return text + ")"
