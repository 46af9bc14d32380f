"""Uncertainty of the benchmark's metrics: bootstrap intervals over records, paired comparisons of two runs.

Every metric of :mod:`pointvl.evaluation.scoring` is a function of sums over records (a
:class:`Statistic`): a mean (IoU, KPA, RPC, category accuracy, ROUGE, BERTScore) is ``sum(v) / sum(1)``,
attribute accuracy ``sum(right) / sum(asked)``, QA accuracy the same over every pair asked, and corpus
BLEU is sacrebleu's score of the summed n-gram statistics. Resampling records is therefore weighting
them with the counts of a resample, without recomputing per-record scores:

- **Interval**: percentile bootstrap, :data:`RESAMPLES` resamples of the n records with replacement
  (seeded: the same input gives the same interval), the 2.5th and 97.5th percentiles of the metric.
- **Paired comparison** of two runs scored on the same records: the difference ``d = m(A) - m(B)``;
  its 95 % interval from the same resamples applied to both runs (paired bootstrap); and the p-value
  of a paired permutation test (:data:`PERMUTATIONS` random swaps of the two runs' outputs, each record
  swapped with probability 1/2): ``p = (1 + #{|d*| >= |d|}) / (1 + PERMUTATIONS)``, two-sided.

The intervals are over records only: they say how much the score would move on another test set of the
same size, not over training seeds (repeat the training for that).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

logger = logging.getLogger(__name__)

RESAMPLES = 2000
PERMUTATIONS = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Statistic:
    """A metric as a function of per-record sums.

    Attributes:
        rows: ``(n, k)`` per-record values whose column sums determine the metric.
        value: maps summed rows ``(..., k)`` to the metric ``(...)`` (vectorised over leading axes).
    """

    rows: NDArray[np.float64]
    value: Callable[[NDArray[np.float64]], NDArray[np.float64]]

    def __call__(self, weights: NDArray[np.float64] | None = None) -> NDArray[np.float64]:
        """The metric of the records (``weights=None``) or of each weighted resample (``weights (B, n)``)."""
        return self.value(self.rows.sum(axis=0) if weights is None else weights @ self.rows)


def ratio(numerator: NDArray, denominator: NDArray) -> Statistic:
    """``sum(numerator) / sum(denominator)`` (0 when the denominator sums to 0)."""
    rows = np.stack([np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)], axis=1)
    return Statistic(rows, lambda s: np.divide(s[..., 0], s[..., 1], out=np.zeros_like(s[..., 0]),
                                               where=s[..., 1] > 0))


def mean(values: NDArray) -> Statistic:
    """The mean of per-record values."""
    v = np.asarray(values, np.float64)
    return ratio(v, np.ones_like(v))


def resample_counts(n: int, resamples: int, seed: int) -> NDArray[np.float64]:
    """``(resamples, n)`` multiplicities of the n records in each bootstrap resample (each row sums to n)."""
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    flat = idx + n * np.arange(resamples)[:, None]
    return np.bincount(flat.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def _percentiles(values: NDArray, level: float) -> list[float]:
    tail = (1 - level) / 2 * 100
    return [float(v) for v in np.percentile(values, [tail, 100 - tail])]


def bootstrap_interval(stat: Statistic, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL,
                       counts: NDArray | None = None) -> list[float]:
    """The percentile-bootstrap interval ``[lo, hi]`` of ``stat`` over records (``counts`` reuses resamples)."""
    w = counts if counts is not None else resample_counts(len(stat.rows), resamples, seed)
    return _percentiles(stat(w), level)


def paired_comparison(a: Statistic, b: Statistic, resamples: int = RESAMPLES, permutations: int = PERMUTATIONS,
                      seed: int = 0, level: float = LEVEL) -> dict[str, float | list[float]]:
    """``{"difference", "interval", "p_value"}`` of ``m(a) - m(b)`` over the same records (module docstring)."""
    if a.rows.shape != b.rows.shape:
        raise ValueError(f"a paired comparison needs the same records: shapes {a.rows.shape} and {b.rows.shape}")
    n = len(a.rows)
    d = float(a() - b())
    w = resample_counts(n, resamples, seed)
    interval = _percentiles(a(w) - b(w), level)
    swap = np.random.default_rng(seed + 1).integers(0, 2, size=(permutations, n)).astype(np.float64)
    delta = b.rows - a.rows
    sa, sb = a.rows.sum(axis=0), b.rows.sum(axis=0)
    d_perm = a.value(sa + swap @ delta) - b.value(sb - swap @ delta)
    p = (1 + int(np.sum(np.abs(d_perm) >= abs(d) - 1e-12))) / (1 + permutations)
    return {"difference": d, "interval": interval, "p_value": p}
