"""Checks crepe.search.space: the unit-cube map (round trips, corners, kernel choices), the
RIA point and the bound validation errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crepe.errors import CrepeError
from crepe.search.space import KERNEL_CHOICES, RIA_POINT, SearchSpace

FAST = settings(deadline=None, max_examples=60)
unit = st.floats(0.0, 1.0, allow_nan=False)


def test_default_space():
    space = SearchSpace()
    assert space.dim == 3
    assert space.names == ("alpha", "beta", "log10_gamma")
    assert (space.alpha, space.beta, space.log10_gamma) == ((0.0, 2.0), (0.0, 2.0), (-5.0, 0.0))
    assert space.kernel_size == 9
    assert SearchSpace(kernel_choices=KERNEL_CHOICES).dim == 4


def test_from_unit_corners_and_centre():
    space = SearchSpace()
    assert space.from_unit(np.zeros(3)) == {"alpha": 0.0, "beta": 0.0, "gamma": 1e-5, "kernel_size": 9}
    assert space.from_unit(np.ones(3)) == {"alpha": 2.0, "beta": 2.0, "gamma": 1.0, "kernel_size": 9}
    mid = space.from_unit(np.full(3, 0.5))
    assert mid["alpha"] == 1.0 and mid["beta"] == 1.0
    assert mid["gamma"] == pytest.approx(10**-2.5, rel=1e-14)


def test_to_unit_of_ria_like_point():
    # alpha = beta = 1 is the middle of [0, 2]; log10(1e-3) = -3 is 2/5 into [-5, 0]
    u = SearchSpace().to_unit({"alpha": 1.0, "beta": 1.0, "gamma": 1e-3})
    np.testing.assert_allclose(u, [0.5, 0.5, 0.4], rtol=0, atol=1e-15)


@FAST
@given(a=unit, b=unit, g=unit)
def test_unit_round_trip(a, b, g):
    space = SearchSpace(alpha=(0.1, 1.7), beta=(0.0, 3.0), log10_gamma=(-4.0, -0.5))
    u = np.array([a, b, g])
    params = space.from_unit(u)
    back = space.to_unit(params)
    np.testing.assert_allclose(back, u, rtol=0, atol=1e-12)
    again = space.from_unit(back)
    for key in ("alpha", "beta"):
        assert again[key] == pytest.approx(params[key], rel=1e-12, abs=1e-12)
    assert again["gamma"] == pytest.approx(params["gamma"], rel=1e-12)


@FAST
@given(
    alpha=st.floats(0.0, 2.0),
    beta=st.floats(0.0, 2.0),
    log_gamma=st.floats(-5.0, 0.0),
    kernel=st.sampled_from(KERNEL_CHOICES),
)
def test_params_round_trip_with_kernel(alpha, beta, log_gamma, kernel):
    space = SearchSpace(kernel_choices=KERNEL_CHOICES)
    params = {"alpha": alpha, "beta": beta, "gamma": 10.0**log_gamma, "kernel_size": kernel}
    u = space.to_unit(params)
    assert u.shape == (4,) and (u >= 0).all() and (u <= 1).all()
    back = space.from_unit(u)
    assert back["kernel_size"] == kernel
    assert back["alpha"] == pytest.approx(alpha, abs=1e-12)
    assert back["beta"] == pytest.approx(beta, abs=1e-12)
    assert back["gamma"] == pytest.approx(params["gamma"], rel=1e-12)


def test_kernel_coordinate_bins():
    space = SearchSpace(kernel_choices=(3, 5, 7))
    picks = [
        space.from_unit(np.array([0.5, 0.5, 0.5, k]))["kernel_size"] for k in (0, 0.33, 0.34, 0.66, 0.67, 1)
    ]
    assert picks == [3, 3, 5, 5, 7, 7]


def test_to_unit_rejects_gamma_zero_and_out_of_bounds():
    space = SearchSpace()
    with pytest.raises(CrepeError, match="gamma 0.0 .*stage 2"):
        space.to_unit(RIA_POINT)
    with pytest.raises(CrepeError, match="alpha 2.5 is outside"):
        space.to_unit({"alpha": 2.5, "beta": 1.0, "gamma": 0.01})
    with pytest.raises(CrepeError, match="log10_gamma"):
        space.to_unit({"alpha": 1.0, "beta": 1.0, "gamma": 10.0})
    with pytest.raises(CrepeError, match="lack 'beta'"):
        space.to_unit({"alpha": 1.0, "gamma": 0.01})
    with pytest.raises(CrepeError, match="kernel_size 9 is not one of"):
        SearchSpace(kernel_choices=(3, 5)).to_unit({"alpha": 1.0, "beta": 1.0, "gamma": 0.01})


def test_from_unit_rejects_bad_points():
    space = SearchSpace()
    with pytest.raises(CrepeError, match="shape"):
        space.from_unit(np.zeros(4))
    with pytest.raises(CrepeError, match="outside the unit cube"):
        space.from_unit(np.array([0.5, 1.2, 0.5]))
    with pytest.raises(CrepeError, match="outside the unit cube"):
        space.from_unit(np.array([0.5, math.nan, 0.5]))


def test_ria_point():
    assert RIA_POINT == {"alpha": 1.0, "beta": 1.0, "gamma": 0.0}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": (2.0, 1.0)}, "alpha bounds .* inverted or empty"),
        ({"beta": (1.0, 1.0)}, "beta bounds .* inverted or empty"),
        ({"log10_gamma": (0.0, -5.0)}, "log10_gamma bounds .* inverted"),
        ({"log10_gamma": (-math.inf, 0.0)}, "log10_gamma bounds .* not finite"),
        ({"alpha": (0.0, math.nan)}, "alpha bounds .* not finite"),
        ({"alpha": (-0.5, 1.0)}, "alpha lower bound -0.5 is negative"),
        ({"beta": (-1.0, 1.0)}, "beta lower bound -1 is negative"),
        ({"alpha": (1.0,)}, "alpha bounds .* not a .*pair"),
        ({"beta": "ab"}, "beta bounds .* not a .*pair"),
        ({"kernel_size": 4}, "kernel_size 4 is not an odd integer"),
        ({"kernel_size": 1}, "kernel_size 1 is not an odd integer"),
        ({"kernel_choices": (3, 4, 5)}, "kernel_choices entry 4"),
        ({"kernel_choices": (3, 2.5)}, "kernel_choices entry 2.5"),
        ({"kernel_choices": (9,)}, "at least two distinct"),
        ({"kernel_choices": (3, 3)}, "at least two distinct"),
    ],
)
def test_bad_bounds_raise(kwargs, message):
    with pytest.raises(CrepeError, match=message):
        SearchSpace(**kwargs)


def test_bounds_are_configurable_and_normalised():
    space = SearchSpace(alpha=[0, 4], log10_gamma=(-3, -1), kernel_choices=[5, 9])
    assert space.alpha == (0.0, 4.0) and space.kernel_choices == (5, 9)
    assert space.from_unit(np.array([0.25, 0.0, 1.0, 0.9]))["alpha"] == 1.0
    assert space.as_dict()["kernel_choices"] == [5, 9]
