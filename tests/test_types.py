"""Checks crepe.types: sparsity parsing ("0.5", "50%", "2:4"), NMPattern validation, and that
every bad value raises CrepeError naming the value."""

from __future__ import annotations

import math
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crepe.errors import CrepeError
from crepe.types import NMPattern, SparsitySpec, check_group, check_sparsity, parse_sparsity

FAST = settings(deadline=None, max_examples=50)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.5", 0.5),
        ("50%", 0.5),
        (0.5, 0.5),
        (" 0.25 ", 0.25),
        ("12.5%", 0.125),
        ("0", 0.0),
        (0, 0.0),
        ("0.999", 0.999),
    ],
)
def test_parse_sparsity_unstructured(text, expected):
    spec = parse_sparsity(text)
    assert spec.pattern is None
    assert isinstance(spec.sparsity, float)
    assert spec.sparsity == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("text", "n", "m"),
    [("2:4", 2, 4), (" 4 : 8 ", 4, 8), ("1:4", 1, 4), ("3:4", 3, 4), ("1:2", 1, 2)],
)
def test_parse_sparsity_nm(text, n, m):
    spec = parse_sparsity(text)
    assert spec.pattern == NMPattern(n, m)
    assert spec.sparsity == pytest.approx(n / m)


BAD_VALUES = ["3:2", "0:4", "2:0", "4:4", "a:b", "1.5", "-0.1", "1", "nan", "inf", "", "abc"]


@pytest.mark.parametrize("text", BAD_VALUES)
def test_parse_sparsity_rejects_with_value_in_message(text):
    with pytest.raises(CrepeError) as info:
        parse_sparsity(text)
    message = str(info.value)
    if text:
        assert text.strip() in message
    else:
        assert "''" in message  # the empty string is shown quoted


@pytest.mark.parametrize("value", [1.0, 1, -0.1, float("nan"), float("inf"), True, None, [0.5]])
def test_parse_sparsity_rejects_non_text(value):
    with pytest.raises(CrepeError):
        parse_sparsity(value)


@FAST
@given(st.text(alphabet=string.printable, max_size=12))
def test_parse_sparsity_only_raises_crepe_error(text):
    # any ASCII input either parses into a valid spec or raises CrepeError (nothing else)
    try:
        spec = parse_sparsity(text)
    except CrepeError:
        return
    assert 0.0 <= spec.sparsity < 1.0
    if spec.pattern is not None:
        assert 1 <= spec.pattern.n < spec.pattern.m


@pytest.mark.parametrize("text", ["²:4", "2:⁴"])
def test_parse_sparsity_non_ascii_digits_raise_crepe_error(text):
    # regression: "²".isdigit() is True but int("²") fails, which used to leak a plain ValueError
    with pytest.raises(CrepeError) as info:
        parse_sparsity(text)
    assert text in str(info.value)


@FAST
@given(st.integers(0, 999))
def test_parse_sparsity_percent_equals_fraction(per_mille):
    # "x%" and "x/100" describe the same sparsity
    pct = parse_sparsity(f"{per_mille / 10}%").sparsity
    frac = parse_sparsity(str(per_mille / 1000)).sparsity
    assert math.isclose(pct, frac, rel_tol=1e-12, abs_tol=1e-15)


@FAST
@given(st.integers(1, 64), st.integers(2, 64))
def test_nmpattern_valid_iff_n_below_m(n, m):
    if n < m:
        p = NMPattern(n, m)
        assert p.sparsity == n / m
        assert str(p) == f"{n}:{m}"
        assert parse_sparsity(str(p)).pattern == p
    else:
        with pytest.raises(CrepeError):
            NMPattern(n, m)


@pytest.mark.parametrize(("n", "m"), [(0, 4), (4, 4), (5, 4), (1, 1), (2, 0), (-1, 4), (2.0, 4), (2, "4")])
def test_nmpattern_rejects_invalid(n, m):
    with pytest.raises(CrepeError):
        NMPattern(n, m)


def test_sparsityspec_label_and_str():
    assert SparsitySpec(0.5).label == "50%"
    assert str(SparsitySpec(0.5)) == "0.5"
    assert SparsitySpec(0.5, NMPattern(2, 4)).label == "2:4"
    assert str(parse_sparsity("4:8")) == "4:8"
    assert parse_sparsity("62.5%").label == "62.5%"


@pytest.mark.parametrize("value", [0.0, 0.3, 0.999999])
def test_check_sparsity_accepts_unit_interval(value):
    assert check_sparsity(value) == value


@pytest.mark.parametrize("value", [1.0, -1e-9, 2, float("nan"), float("-inf"), "0.5", True])
def test_check_sparsity_rejects(value):
    with pytest.raises(CrepeError):
        check_sparsity(value)


def test_check_group_accepts_row_layer_rejects_other():
    assert check_group("row") == "row"
    assert check_group("layer") == "layer"
    with pytest.raises(CrepeError, match="column"):
        check_group("column")


def test_crepe_error_is_value_error():
    # front ends catch CrepeError; callers that catch ValueError keep working
    assert issubclass(CrepeError, ValueError)
