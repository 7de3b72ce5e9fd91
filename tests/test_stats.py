"""clip_transfer.protocol.stats checked against scipy and statsmodels on fixed cases."""

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar

from clip_transfer.protocol import stats


def _quantile_se(draws: np.ndarray, q: float, resamples: int) -> float:
  """Monte-Carlo standard error of the q-quantile of ``resamples`` draws (normal density)."""
  sd = np.std(draws)
  density = sps.norm.pdf(sps.norm.ppf(q)) / sd
  return float(np.sqrt(q * (1 - q) / resamples) / density)


def _assert_within_mc(ours, ref_draws, n, level=stats.LEVEL, resamples=stats.RESAMPLES):
  """Our interval's ends equal the reference bootstrap's within 3 Monte-Carlo errors (+1/n)."""
  for end, q in zip(ours, ((1 - level) / 2, (1 + level) / 2)):
    ref = np.quantile(ref_draws, q)
    se = _quantile_se(ref_draws, q, resamples) + _quantile_se(ref_draws, q, len(ref_draws))
    assert abs(end - ref) <= 3 * se + 1 / n, (end, ref, se)


@pytest.mark.parametrize('b,c', [(3, 9), (10, 2), (0, 5), (25, 25), (1, 30), (40, 61)])
def test_mcnemar_exact_p_equals_statsmodels(b, c):
  table = [[17, b], [c, 11]]  # the concordant cells do not enter the exact test
  assert stats.mcnemar_exact(b, c) == pytest.approx(mcnemar(table, exact=True).pvalue,
                                                     rel=1e-12, abs=1e-15)


def test_mcnemar_no_discordant_pairs_is_p_one():
  assert stats.mcnemar_exact(0, 0) == 1.0


def test_paired_difference_counts_and_p_from_the_examples():
  rng = np.random.default_rng(1)
  a = rng.random(300) < 0.75
  b = np.where(rng.random(300) < 0.2, ~a, a)  # b disagrees with a on about 20%
  got = stats.paired_difference(a, b)
  only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
  assert (got['only_a'], got['only_b']) == (only_a, only_b)
  assert got['diff'] == pytest.approx(a.mean() - b.mean())
  table = [[int(np.sum(a & b)), only_a], [only_b, int(np.sum(~a & ~b))]]
  assert got['mcnemar_p'] == pytest.approx(mcnemar(table, exact=True).pvalue, rel=1e-12)
  with pytest.raises(ValueError, match='same examples'):
    stats.paired_difference(a, b[:-1])


def test_paired_interval_is_the_paired_bootstrap():
  rng = np.random.default_rng(2)
  a = (rng.random(400) < 0.8).astype(float)
  b = np.where(rng.random(400) < 0.15, 1 - a, a)
  ref = sps.bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis), paired=True,
                      vectorized=True, n_resamples=20000, method='percentile',
                      random_state=np.random.default_rng(0))
  _assert_within_mc(stats.paired_difference(a, b)['ci95'], ref.bootstrap_distribution, len(a))


@pytest.mark.parametrize('n,p,level', [(200, 0.7, 0.95), (1000, 0.93, 0.95), (500, 0.5, 0.9)])
def test_top1_interval_is_the_percentile_bootstrap(n, p, level):
  correct = np.zeros(n)
  correct[:int(n * p)] = 1
  # Resampling n 0/1 values: the bootstrap count is exactly Binomial(n, p̂); scipy draws it too.
  ref_draws = sps.binom.rvs(n, correct.mean(), size=200000, random_state=0) / n
  _assert_within_mc(stats.top1_ci(correct, level=level), ref_draws, n, level=level)


def test_top1_interval_of_seed_averaged_correctness():
  rng = np.random.default_rng(3)
  correct = rng.choice([0, 1 / 3, 2 / 3, 1], size=300, p=[0.1, 0.2, 0.3, 0.4])
  ref = sps.bootstrap((correct,), np.mean, n_resamples=20000, method='percentile',
                      random_state=np.random.default_rng(0))
  _assert_within_mc(stats.top1_ci(correct), ref.bootstrap_distribution, len(correct))


def test_balanced_interval_is_the_bootstrap_of_mean_recall():
  rng = np.random.default_rng(4)
  labels = rng.integers(0, 4, 240)
  correct = (rng.random(240) < np.array([0.9, 0.6, 0.75, 0.4])[labels]).astype(float)

  def balanced(c, y, axis=-1):  # mean recall over the classes present in the resample
    present = [k for k in range(4) if np.any(y == k)]
    return np.mean([c[y == k].mean() for k in present])

  ref = sps.bootstrap((correct, labels), balanced, paired=True, vectorized=False,
                      n_resamples=5000, method='percentile', random_state=np.random.default_rng(0))
  _assert_within_mc(stats.balanced_ci(correct, labels), ref.bootstrap_distribution, len(labels))


def test_intervals_are_stable_for_a_seed():
  correct = np.r_[np.ones(70), np.zeros(30)]
  labels = np.r_[np.zeros(50, int), np.ones(50, int)]
  assert stats.intervals(correct, labels) == stats.intervals(correct, labels)
  assert stats.top1_ci(correct, seed=1) != stats.top1_ci(correct, seed=2)


@pytest.mark.parametrize('ci,p,want', [([0.01, 0.05], 0.001, 'better'),
                                       ([-0.05, -0.01], 0.001, 'worse'),
                                       ([-0.01, 0.03], 0.2, 'no detectable difference'),
                                       ([0.01, 0.05], 0.2, 'no detectable difference')])
def test_verdict(ci, p, want):
  assert stats.verdict({'ci95': ci, 'mcnemar_p': p}) == want
