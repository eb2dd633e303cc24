"""The price rule: per-class means, sigma, cents, determinism, train-only scaling."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from tasks.data.prices import DEFAULT_MEANS, PriceRule, draw_prices, fit_scaling, labels_version


def test_rule_matches_design():
    labels = np.repeat(np.arange(10), 7000)
    prices = draw_prices(labels, PriceRule(), seed=1)
    for c in range(10):
        p = prices[labels == c]
        assert abs(p.mean() - DEFAULT_MEANS[c]) < 0.15
        assert abs(p.std() - 3.0) < 0.1
    assert np.allclose(prices, np.round(prices, 2)), "prices are in cents"


def test_seed_determinism():
    labels = np.arange(1000) % 10
    a = draw_prices(labels, PriceRule(), 7)
    assert (a == draw_prices(labels, PriceRule(), 7)).all()
    assert not (a == draw_prices(labels, PriceRule(), 8)).all()


def test_sigma_zero_gives_the_means():
    labels = np.arange(20) % 10
    prices = draw_prices(labels, PriceRule(sigma=0), 0)
    assert prices.tolist() == [DEFAULT_MEANS[c] for c in labels]


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"means": [1.0] * 9}, "10 class means"),
        ({"sigma": -1.0}, "sigma must be"),
        ({"sigma": math.nan}, "sigma must be"),
        ({"means": [1.0] * 9 + [math.nan]}, "finite"),
    ],
)
def test_bad_rules(fields, match):
    with pytest.raises(ValidationError, match=match):
        PriceRule(**fields)


def test_scaling_fit_on_train_only():
    prices = np.array([10.0, 20.0, 30.0, 1.0, 99.0])
    splits = np.array(["train", "train", "train", "test", "test"])
    s = fit_scaling(prices, splits)
    assert (s["min"], s["max"], s["fit_on"], s["rows"]) == (10.0, 30.0, "train", 3)


def test_labels_version_changes_with_inputs():
    base = labels_version("fm-1", PriceRule(), 0)
    assert base == labels_version("fm-1", PriceRule(), 0)
    assert base != labels_version("fm-1", PriceRule(), 1)
    assert base != labels_version("fm-2", PriceRule(), 0)
    assert base != labels_version("fm-1", PriceRule(sigma=2), 0)
