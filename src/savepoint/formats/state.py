"""Training state as safetensors + JSON: no pickle in, no code run out.

A state tree (what `state_dict()` returns: dicts, lists, tuples, numbers, strings, tensors, numpy
arrays) is split into a JSON document and a flat dict of tensors. Tensors and arrays are replaced by
`{"__tensor__": key}` / `{"__ndarray__": key}`; tuples and dicts with non-string keys are tagged so
they come back as they went in. Anything else is refused with a message naming where it sits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from savepoint.errors import CorruptCheckpointError, Problem, UnsupportedStateError

_TENSOR, _NDARRAY, _TUPLE, _ITEMS, _FLOAT = "__tensor__", "__ndarray__", "__tuple__", "__items__", "__float__"
_TAGS = {_TENSOR, _NDARRAY, _TUPLE, _ITEMS, _FLOAT}
MAX_DEPTH = 64
_NP_SCALARS = (np.integer, np.floating, np.bool_)


def encode(obj: Any, tensors: dict[str, torch.Tensor], where: str = "state", depth: int = 0) -> Any:
    """JSON-ready form of `obj`; its tensors are moved into `tensors` under unique keys."""
    if depth > MAX_DEPTH:
        raise UnsupportedStateError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        # JSON has no NaN/Inf; keep them exactly instead of failing a save over a diverged metric.
        return obj if math.isfinite(obj) else {_FLOAT: repr(obj)}
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach()
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise UnsupportedStateError(f"{where}: numpy array of Python objects (would need pickle)")
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
        return {_NDARRAY: key, "dtype": obj.dtype.str}
    if isinstance(obj, _NP_SCALARS):
        return encode(obj.item(), tensors, where, depth)
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not (_TAGS & set(obj)):
            return {k: encode(v, tensors, f"{where}.{k}", depth + 1) for k, v in obj.items()}
        return {
            _ITEMS: [
                [
                    encode(k, tensors, f"{where}[key]", depth + 1),
                    encode(v, tensors, f"{where}[{k!r}]", depth + 1),
                ]
                for k, v in obj.items()
            ]
        }
    if isinstance(obj, tuple):
        return {_TUPLE: [encode(v, tensors, f"{where}[{i}]", depth + 1) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{where}[{i}]", depth + 1) for i, v in enumerate(obj)]
    raise UnsupportedStateError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; savepoint stores tensors, numpy arrays "
        "and JSON types only (it never pickles). Return a plain form of it from state_dict()."
    )


def decode(doc: Any, tensors: Mapping[str, torch.Tensor], *, ckpt: str, relpath: str, depth: int = 0) -> Any:
    """Inverse of `encode`. Malformed documents raise CorruptCheckpointError naming `relpath`."""
    if depth > MAX_DEPTH:
        raise CorruptCheckpointError(ckpt, [Problem(relpath, "state nested too deeply")])
    if doc is None or isinstance(doc, bool | int | float | str):
        return doc
    if isinstance(doc, list):
        return [decode(v, tensors, ckpt=ckpt, relpath=relpath, depth=depth + 1) for v in doc]
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(ckpt, [Problem(relpath, f"unexpected JSON value {doc!r:.60}")])
    if _TENSOR in doc or _NDARRAY in doc:
        key = doc.get(_TENSOR, doc.get(_NDARRAY))
        if not isinstance(key, str) or key not in tensors:
            raise CorruptCheckpointError(
                ckpt, [Problem(relpath, f"refers to a tensor {key!r:.40} that is not stored")]
            )
        if _TENSOR in doc:
            return tensors[key]
        return _to_numpy(tensors[key], doc.get("dtype"), ckpt, relpath)
    if _TUPLE in doc:
        if not isinstance(doc[_TUPLE], list):
            raise CorruptCheckpointError(ckpt, [Problem(relpath, "a tuple must be stored as a JSON list")])
        return tuple(decode(doc[_TUPLE], tensors, ckpt=ckpt, relpath=relpath, depth=depth + 1))
    if _FLOAT in doc:
        if doc[_FLOAT] not in ("nan", "inf", "-inf"):
            raise CorruptCheckpointError(ckpt, [Problem(relpath, f"bad float tag {doc[_FLOAT]!r:.40}")])
        return float(doc[_FLOAT])
    if _ITEMS in doc:
        if not isinstance(doc[_ITEMS], list):
            raise CorruptCheckpointError(
                ckpt, [Problem(relpath, "a mapping must be stored as a list of pairs")]
            )
        items = decode(doc[_ITEMS], tensors, ckpt=ckpt, relpath=relpath, depth=depth + 1)
        try:
            return {k: v for k, v in items}
        except (TypeError, ValueError) as exc:
            raise CorruptCheckpointError(
                ckpt, [Problem(relpath, f"malformed key/value pairs ({exc})")]
            ) from exc
    return {k: decode(v, tensors, ckpt=ckpt, relpath=relpath, depth=depth + 1) for k, v in doc.items()}


def _to_numpy(t: torch.Tensor, dtype: Any, ckpt: str, relpath: str) -> np.ndarray:
    try:
        want = np.dtype(dtype)
    except TypeError as exc:
        raise CorruptCheckpointError(ckpt, [Problem(relpath, f"bad numpy dtype {dtype!r:.40}")]) from exc
    if want.kind not in "biuf" or want.itemsize != t.element_size():
        raise CorruptCheckpointError(
            ckpt, [Problem(relpath, f"numpy dtype {want} does not match tensor {t.dtype}")]
        )
    return t.numpy().view(want).copy()


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def loads(raw: bytes, *, ckpt: str, relpath: str) -> Any:
    try:
        return json.loads(raw)
    # ValueError also covers what json raises besides JSONDecodeError: an integer literal longer than
    # Python's 4300-digit limit (found by tests/reliability/test_fuzz_readers.py).
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(ckpt, [Problem(relpath, f"not valid JSON ({exc})")]) from exc
