import pytest

from dpfp_jax.validation import check_choice, check_positive_int


@pytest.mark.parametrize("value", [1, 7])
def test_check_positive_int_returns_the_value(value):
    assert check_positive_int("n", value) == value


@pytest.mark.parametrize("value", [True, 2.0, "3", None])
def test_check_positive_int_refuses_non_ints_with_a_type_error(value):
    with pytest.raises(TypeError, match=f"num_heads must be a positive int; got {value!r} of type"):
        check_positive_int("num_heads", value)


@pytest.mark.parametrize("value", [0, -3])
def test_check_positive_int_refuses_ints_below_one(value):
    with pytest.raises(ValueError, match=f"nu must be a positive int; got {value}"):
        check_positive_int("nu", value)


def test_check_choice():
    assert check_choice("rule", "sum", ("delta", "sum")) == "sum"
    with pytest.raises(ValueError, match=r"rule must be one of \('delta', 'sum'\); got 'hebbian'"):
        check_choice("rule", "hebbian", ("delta", "sum"))

