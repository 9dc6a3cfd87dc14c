"""The timer's statistics: the paired ratio of interleaved rounds and the confidence interval of
its median, which the benchmarks' check of compiled rows reads."""
import random

import pytest

from ptuning_fast._timing import median_interval, paired_ratios, paired_speedup, paired_speedup_interval


def test_paired_ratios_are_per_round():
    summaries = {"peft": {"samples_ms": [2.0, 4.0, 9.0]}, "ours": {"samples_ms": [1.0, 1.0, 3.0]}}
    assert paired_ratios(summaries, "peft", "ours") == [2.0, 4.0, 3.0]
    assert paired_speedup(summaries, "peft", "ours") == 3.0
    assert paired_speedup_interval(summaries, "peft", "ours") == (2.0, 4.0)  # 3 rounds: min, max


@pytest.mark.parametrize("n, k", [(5, 1), (6, 1), (20, 6), (40, 14), (200, 86)])
def test_median_interval_order_statistics(n, k):
    """The k-th smallest and k-th largest of n: the binomial tables' 95% ranks."""
    values = random.Random(n).sample(range(1000), n)
    ordered = sorted(values)
    assert median_interval(values) == (ordered[k - 1], ordered[n - k])


@pytest.mark.parametrize("n", [20, 40])
def test_median_interval_covers_the_median_at_its_confidence(n):
    """Drawn from a distribution of median 1 (skewed, as step times are), the interval holds 1 in
    at least 95% of the runs, and is not much wider than it must be (at most ~98.5% for these n)."""
    rng = random.Random(0)
    trials = 4000
    hits = 0
    for _ in range(trials):
        lo, hi = median_interval([rng.lognormvariate(0.0, 0.3) for _ in range(n)])
        hits += lo <= 1.0 <= hi
    assert 0.95 - 0.01 <= hits / trials <= 0.99


def test_median_interval_rejects_bad_arguments():
    with pytest.raises(ValueError, match="values"):
        median_interval([])
    with pytest.raises(ValueError, match="confidence"):
        median_interval([1.0, 2.0], confidence=1.5)
