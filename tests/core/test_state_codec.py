"""The state-tree codec: everything a state_dict holds round-trips exactly; everything else is refused."""

from __future__ import annotations

import math
import pickle
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from savepoint.errors import CorruptCheckpointError, UnsupportedStateError
from savepoint.formats import state as codec


def roundtrip(obj: object) -> object:
    tensors: dict[str, torch.Tensor] = {}
    doc = codec.loads(codec.dumps(codec.encode(obj, tensors)), ckpt="c", relpath="r.json")
    return codec.decode(doc, tensors, ckpt="c", relpath="r.json")


def assert_same(a: object, b: object) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)  # type: ignore[union-attr]
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)  # type: ignore[union-attr]
    elif isinstance(a, dict):
        assert list(a) == list(b)  # type: ignore[arg-type]
        for k in a:
            assert_same(a[k], b[k])  # type: ignore[index]
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)  # type: ignore[arg-type]
        for x, y in zip(a, b, strict=True):  # type: ignore[call-overload]
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)  # type: ignore[arg-type]
    else:
        assert a == b


leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
trees = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
        | st.dictionaries(st.integers(-5, 5), children, max_size=4)
    ),
    max_leaves=30,
)


@given(trees)
def test_json_trees_roundtrip_exactly(tree: object) -> None:
    assert_same(roundtrip(tree), tree)


def test_tensors_arrays_and_tags_roundtrip() -> None:
    state = {
        "w": torch.randn(3, 4).bfloat16(),
        "step": torch.tensor(7.0),
        "arr": np.arange(6, dtype=np.uint32).reshape(2, 3),
        "betas": (0.9, 0.999),
        0: {"__tensor__": "not a real tag"},  # user data that looks like a tag stays user data
        "gen": torch.Generator().manual_seed(3).get_state(),
        "np_scalar": np.int64(5),
    }
    back = roundtrip(state)
    assert isinstance(back, dict)
    expected = dict(state, np_scalar=5)
    assert_same(back, expected)


def test_python_and_numpy_rng_state_roundtrip() -> None:
    import random

    py = random.getstate()
    npst = np.random.get_state()
    assert roundtrip(py) == py
    back = roundtrip(npst)
    assert isinstance(back, tuple) and back[0] == "MT19937" and np.array_equal(back[1], npst[1])


@pytest.mark.parametrize(
    ("obj", "where"),
    [
        ({"fn": lambda x: x}, "state.fn"),
        ({"a": [1, {"b": object()}]}, "state.a[1].b"),
        ({"arr": np.array([object()], dtype=object)}, "state.arr"),
        ({"s": {1, 2}}, "state.s"),
    ],
)
def test_unsupported_values_are_refused_with_their_path(obj: object, where: str) -> None:
    with pytest.raises(UnsupportedStateError, match=re.escape(where)):
        codec.encode(obj, {})


@pytest.mark.parametrize(
    "doc",
    [
        {"__tensor__": "9"},  # refers to a tensor that is not stored
        {"__ndarray__": "0", "dtype": "O"},
        {"__items__": [[1]]},
        {"__float__": "1e400"},
        {"__tuple__": 5},
        {"__items__": 3},
    ],
)
def test_malformed_documents_raise_corrupt_checkpoint(doc: object) -> None:
    with pytest.raises(CorruptCheckpointError, match=r"r.json"):
        codec.decode(doc, {"0": torch.zeros(2)}, ckpt="c", relpath="r.json")


def test_pickle_bytes_are_not_json() -> None:
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        codec.loads(pickle.dumps({"a": 1}), ckpt="c", relpath="r.json")
