"""The declarative parameter checks: every constraint kind accepts what it says and refuses the rest, and the
error names the function, the parameter, the value and what is allowed."""

import math
import warnings

import numpy as np
import pytest

from lensbench.errors import InputError
from lensbench.validation import (
    Check,
    Interval,
    Options,
    SequenceOf,
    check_params,
    renamed_params,
    validate_params,
)


@validate_params({
    "k": [Interval(int, 1, None)],
    "ratio": [Interval(float, 0, 1, closed="neither")],
    "per": [Options({"prompt", "pooled"})],
    "seed": [None, int],
    "batch_size": [Options({"auto"}), Interval(int, 1, None)],
    "fn": [None, "callable"],
    "levels": [SequenceOf(Interval(int, 0, None))],
    "even": [Check(lambda v: v % 2 == 0, "an even int")],
    "flag": [bool],
})
def probe(m, *, k=10, ratio=0.5, per="prompt", seed=None, batch_size="auto", fn=None, levels=(0,), even=0,
          flag=False):
    return k, ratio, per, seed, batch_size


@pytest.mark.parametrize("kw", [
    {"k": 1}, {"k": np.int64(3)}, {"ratio": 0.3}, {"ratio": 1e-9}, {"per": "pooled"}, {"seed": None}, {"seed": 7},
    {"batch_size": "auto"}, {"batch_size": 4}, {"fn": len}, {"levels": [0, 3]}, {"levels": (2,)}, {"even": 4},
    {"flag": True},
])
def test_allowed_values_pass(kw):
    out = probe(None, **kw)
    assert out[0] == kw.get("k", 10)


@pytest.mark.parametrize("kw, words", [
    ({"k": 0}, "k=0 is not allowed; k must be an int >= 1"),
    ({"k": True}, "k=True"),                 # bool is not an int here
    ({"k": 2.0}, "an int >= 1"),
    ({"ratio": 1.0}, "a number in (0, 1)"),
    ({"ratio": 0}, "a number in (0, 1)"),
    ({"ratio": math.nan}, "ratio=nan"),
    ({"per": "tokens"}, "one of 'pooled', 'prompt'"),
    ({"seed": "0"}, "None or an int"),
    ({"batch_size": 0}, "one of 'auto' or an int >= 1"),
    ({"fn": 3}, "None or a callable"),
    ({"levels": []}, "a non-empty list/tuple"),
    ({"levels": "012"}, "levels='012'"),
    ({"levels": [0, -1]}, "an int >= 0"),
    ({"even": 3}, "an even int"),
    ({"even": "x"}, "an even int"),          # a predicate that raises refuses the value
    ({"flag": 1}, "True or False"),
])
def test_refused_values_name_parameter_value_and_rule(kw, words):
    with pytest.raises(InputError) as e:
        probe(None, **kw)
    msg = str(e.value)
    assert msg.startswith("probe: ") and words in msg, msg


def test_defaults_are_not_rechecked_and_table_is_kept():
    assert probe(None) == (10, 0.5, "prompt", None, "auto")
    assert set(probe.parameter_constraints) >= {"k", "ratio", "per"}


def test_wrong_call_gets_pythons_own_error():
    with pytest.raises(TypeError):
        probe(None, nope=1)


def test_constraint_for_unknown_parameter_is_a_programming_error():
    with pytest.raises(TypeError, match="unknown parameters"):
        validate_params({"x": [int]})(lambda m, y=0: None)


def test_check_params_direct():
    check_params({"a": [Interval(int, 0, 3)]}, {"a": 3}, caller="f")
    with pytest.raises(InputError, match=r"f: a=4 is not allowed; a must be an int in \[0, 3\]"):
        check_params({"a": [Interval(int, 0, 3)]}, {"a": 4}, caller="f")


def test_renamed_params_alias_warns_and_forwards():
    @renamed_params({"steps": "n_steps"})
    @validate_params({"n_steps": [Interval(int, 1, None)]})
    def f(*, n_steps=5):
        return n_steps

    with pytest.warns(FutureWarning, match="steps= is renamed n_steps="):
        assert f(steps=7) == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f(n_steps=3) == 3
    with pytest.raises(InputError, match="pass n_steps= only"):
        f(steps=1, n_steps=2)
    with pytest.raises(InputError, match="n_steps=0"), pytest.warns(FutureWarning):
        f(steps=0)
