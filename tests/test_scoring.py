"""Scoring: pooled Pearson correlation (the paper's score), top/random scores, secondary metrics."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from neuron_pipeline.interp.scoring import (
    Score,
    ScoredSequence,
    absolute_dev_explained,
    correlation,
    rsquared,
    score_simulation,
)


def seq(real, predicted) -> ScoredSequence:
    return ScoredSequence(list(real), list(predicted))


def pearson(xs, ys) -> float:
    """Textbook Pearson correlation, independent of numpy."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    vx = sum((x - mx) ** 2 for x in xs)
    vy = sum((y - my) ** 2 for y in ys)
    return cov / math.sqrt(vx * vy)


# Worked example, computed by hand:
#   top    real [0, 1, 2], simulated [0, 1, 3]
#   random real [0, 0, 1], simulated [1, 0, 1]
# pooled: mean r = 2/3, mean p = 1; sum dr*dp = 4; sum dr^2 = 10/3; sum dp^2 = 6
#   -> r = 4 / sqrt(20) = 2 / sqrt(5)
# top: sum dr*dp = 3, sum dr^2 = 2, sum dp^2 = 14/3 -> sqrt(27/28)
# random: sum dr*dp = 1/3, sum dr^2 = 2/3, sum dp^2 = 2/3 -> 1/2
TOP = [seq([0, 1, 2], [0, 1, 3])]
RANDOM = [seq([0, 0, 1], [1, 0, 1])]


def test_pooled_score_by_hand():
    result = score_simulation(TOP, RANDOM)
    assert result.score == pytest.approx(2 / math.sqrt(5))
    assert result.score_top == pytest.approx(math.sqrt(27 / 28))
    assert result.score_random == pytest.approx(0.5)
    assert result.n_tokens == 6
    assert result.null_reason is None
    # The headline score is pooled, not the mean of the two per-split scores.
    assert result.score != pytest.approx((result.score_top + result.score_random) / 2)


def test_pooled_over_all_tokens_not_mean_of_per_excerpt_correlations():
    # Each excerpt alone is perfectly correlated (r = 1), but across excerpts the simulator puts
    # the high values on the wrong excerpt. Pooled: mean 5.5 both sides, deviations
    # r: [-5.5, -4.5, 4.5, 5.5], p: [4.5, 5.5, -5.5, -4.5] -> -99 / 101.
    a = seq([0, 1], [10, 11])
    b = seq([10, 11], [0, 1])
    result = score_simulation([a], [b])
    per_excerpt_mean = (pearson([0, 1], [10, 11]) + pearson([10, 11], [0, 1])) / 2
    assert per_excerpt_mean == pytest.approx(1.0)
    assert result.score == pytest.approx(-99 / 101)
    assert result.score_top == pytest.approx(1.0)
    assert result.score_random == pytest.approx(1.0)


def test_pooled_across_several_top_excerpts():
    top = [seq([0, 1], [10, 11]), seq([10, 11], [0, 1])]
    result = score_simulation(top, [])
    assert result.score == pytest.approx(-99 / 101)
    assert result.score_top == pytest.approx(-99 / 101)
    assert result.score_random is None


def test_matches_textbook_pearson_on_random_data():
    rng = random.Random(0)
    top = [seq([rng.gauss(0, 1) for _ in range(64)], [rng.randint(0, 10) for _ in range(64)]) for _ in range(5)]
    rand = [seq([rng.gauss(0, 1) for _ in range(64)], [rng.randint(0, 10) for _ in range(64)]) for _ in range(5)]
    result = score_simulation(top, rand)
    real = [x for s in [*top, *rand] for x in s.true_activations]
    pred = [x for s in [*top, *rand] for x in s.expected_activations]
    assert result.score == pytest.approx(pearson(real, pred))
    assert result.score_top == pytest.approx(
        pearson([x for s in top for x in s.true_activations], [x for s in top for x in s.expected_activations])
    )
    assert result.n_tokens == 640


def test_correlation_is_scale_free_but_secondary_metrics_are_not():
    a = score_simulation(TOP, RANDOM, value_scale=1.0)
    b = score_simulation(TOP, RANDOM, value_scale=0.5)
    assert a.score == pytest.approx(b.score)
    assert a.rsquared != pytest.approx(b.rsquared)


def test_rsquared_and_absolute_deviation_by_hand():
    # r = [0, 1, 2, 0, 0, 1]; p = [0, 1, 3, 1, 0, 1]
    # value_scale 0.5: p' = [0, .5, 1.5, .5, 0, .5]; r - p' = [0, .5, .5, -.5, 0, .5]
    #   mean (r-p')^2 = 1/6, mean r^2 = 1 -> rsquared 5/6
    #   mean |r-p'| = 1/3, mean |r| = 2/3 -> absolute deviation explained 1/2
    result = score_simulation(TOP, RANDOM, value_scale=0.5)
    assert result.rsquared == pytest.approx(5 / 6)
    assert result.absolute_dev_explained == pytest.approx(0.5)
    # value_scale 1: r - p = [0, 0, -1, -1, 0, 0] -> mean sq 1/3 -> 2/3; mean abs 1/3 -> 1/2
    unscaled = score_simulation(TOP, RANDOM)
    assert unscaled.rsquared == pytest.approx(2 / 3)
    assert unscaled.absolute_dev_explained == pytest.approx(0.5)


def test_secondary_metrics_with_negative_activations():
    # r = [-2, 2, 4], p = [0, 1, 2] with value_scale 2 -> p' = [0, 2, 4]
    # mean (r-p')^2 = 4/3; mean r^2 = 24/3 = 8 -> 1 - (4/3)/8 = 5/6
    # mean |r-p'| = 2/3; mean |r| = 8/3 -> 1 - 1/4 = 3/4
    result = score_simulation([seq([-2, 2, 4], [0, 1, 2])], [], value_scale=2.0)
    assert result.rsquared == pytest.approx(5 / 6)
    assert result.absolute_dev_explained == pytest.approx(3 / 4)


def test_perfect_simulation_scores_one_everywhere():
    real = [0.0, 0.3, 1.0, 0.0, 0.7]
    result = score_simulation([seq(real, [10 * x for x in real])], [], value_scale=0.1)
    assert result.score == pytest.approx(1.0)
    assert result.rsquared == pytest.approx(1.0)
    assert result.absolute_dev_explained == pytest.approx(1.0)


def test_predicting_zero_explains_nothing():
    result = score_simulation([seq([1, 2, 3], [0, 0, 0])], [])
    assert result.rsquared == pytest.approx(0.0)
    assert result.absolute_dev_explained == pytest.approx(0.0)


def test_null_when_real_activations_are_constant():
    result = score_simulation([seq([1, 1, 1], [0, 1, 2])], [seq([1, 1], [3, 4])])
    assert result.score is None
    assert result.null_reason == "real activations are constant"
    assert result.n_tokens == 5
    assert result.rsquared is not None  # still defined: mean r^2 = 1


def test_null_when_simulation_is_constant():
    result = score_simulation([seq([0, 1, 2], [3, 3, 3])], [seq([5, 1], [3, 3])])
    assert result.score is None
    assert result.score_top is None and result.score_random is None
    assert result.null_reason == "simulated activations are constant"
    # 1 - mean((r - 3)^2) / mean(r^2): r = [0,1,2,5,1] -> (9+4+1+4+4)/5 / (0+1+4+25+1)/5 = 1 - 22/31
    assert result.rsquared == pytest.approx(1 - 22 / 31)


@pytest.mark.parametrize(
    ("top", "rand"),
    [([], []), ([seq([1.0], [2.0])], []), ([], [seq([3.0], [0.0])]), ([seq([], [])], [seq([4.0], [1.0])])],
)
def test_null_when_too_few_tokens(top, rand):
    result = score_simulation(top, rand)
    assert result.score is None
    assert result.null_reason == "fewer than two scored tokens"
    assert result.n_tokens == sum(len(s.true_activations) for s in [*top, *rand])


def test_empty_scoring_has_all_metrics_null():
    result = score_simulation([], [])
    assert result == Score(None, None, None, None, None, 0, "fewer than two scored tokens")


def test_all_zero_real_activations():
    result = score_simulation([seq([0, 0, 0], [0, 1, 2])], [])
    assert result.score is None and result.null_reason == "real activations are constant"
    assert result.rsquared is None and result.absolute_dev_explained is None


def test_split_score_can_be_null_while_pooled_score_is_not():
    # Random excerpts of a sparse neuron are often all zero: pooled score still defined.
    result = score_simulation([seq([0, 5, 1], [0, 9, 2])], [seq([0, 0, 0], [0, 0, 0])])
    assert result.score is not None
    assert result.score_random is None
    assert result.score == pytest.approx(pearson([0, 5, 1, 0, 0, 0], [0, 9, 2, 0, 0, 0]))


def test_length_mismatch_raises():
    with pytest.raises(ValueError) as excinfo:
        ScoredSequence([1.0, 2.0, 3.0], [1.0, 2.0])
    assert "2 values for 3 tokens" in str(excinfo.value)


def test_accepts_numpy_arrays_and_tuples():
    top = [ScoredSequence(np.array([0.0, 1.0, 2.0]), (0, 1, 3))]
    rand = [ScoredSequence((0, 0, 1), np.array([1, 0, 1]))]
    assert score_simulation(top, rand).score == pytest.approx(2 / math.sqrt(5))


def test_metric_helpers_directly():
    r = np.array([1.0, -1.0, 2.0])
    p = np.array([1.0, 0.0, 0.0])
    assert correlation(r, r) == pytest.approx(1.0)
    assert correlation(r, -r) == pytest.approx(-1.0)
    assert correlation(np.array([1.0]), np.array([1.0])) is None
    # mean (r-p)^2 = (0 + 1 + 4)/3; mean r^2 = 6/3 -> 1 - 5/6
    assert rsquared(r, p) == pytest.approx(1 / 6)
    # mean |r-p| = 3/3; mean |r| = 4/3 -> 1 - 3/4
    assert absolute_dev_explained(r, p) == pytest.approx(1 / 4)
    assert rsquared(np.zeros(3), p) is None
    assert absolute_dev_explained(np.zeros(0), np.zeros(0)) is None
