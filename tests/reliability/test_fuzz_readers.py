"""Property-based fuzzing of every parser savepoint runs on bytes it did not just write.

Each parser gets arbitrary bytes, arbitrary JSON, and valid documents with one field replaced by
arbitrary JSON (the inputs that get past the first checks). For every input it must return or raise
a `SavepointError`: never another exception type, never a hang (each input gets `SLOW_SECONDS`),
and never open a file outside the directory it was given (every `open`, `os.open` and
`safe_open` is audited while it runs).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.reliability.harness import FULL, Tally

from savepoint.errors import SavepointError
from savepoint.manifest import Manifest, parse_manifest, read_manifest

EXAMPLES = 2500 if FULL else 120
SLOW_SECONDS = 5.0
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Strings an attacker would try for a path or a key, mixed into the generated JSON.
NASTY_TEXT = st.sampled_from(
    [
        "..",
        "../outside/secret.bin",
        "/etc/passwd",
        "a/../../x",
        "",
        "\x00",
        "model.safetensors",
        "C:\\x",
        "__tensor__",
        "__items__",
        "__tuple__",
        "__float__",
        "__ndarray__",
        "nan",
        "1" * 5000,
        "step-00000001",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | NASTY_TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8) | NASTY_TEXT, kids, max_size=4)
    ),
    max_leaves=20,
)


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()  # NaN and Infinity included, as a hostile writer would


def mutated(valid: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """`valid` with one field (possibly nested one level) replaced by arbitrary JSON, or removed."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        doc = json.loads(json.dumps(valid))
        key = draw(st.sampled_from(sorted(doc)))
        target = doc
        if isinstance(doc[key], dict) and doc[key] and draw(st.booleans()):
            target, key = doc[key], draw(st.sampled_from(sorted(doc[key])))
        if draw(st.booleans()):
            target[key] = draw(JSON)
        else:
            del target[key]
        return _dumps(doc)

    return build()


def inputs(valid: dict[str, Any]) -> st.SearchStrategy[bytes]:
    huge_int = st.just(b'{"format": "savepoint", "format_version": 1' + b"0" * 5000 + b"}")
    deep = st.integers(1, 100_000).map(lambda n: b"[" * n + b"]" * n)
    return st.binary(max_size=300) | JSON.map(_dumps) | mutated(valid) | huge_int | deep


@contextmanager
def audit_opens(allowed: str, outside: list[str]) -> Iterator[list[str]]:
    """Record every path opened below the test's directory that is not inside `allowed`."""
    allowed = os.path.realpath(allowed)
    bad: list[str] = []
    real_open, real_os_open = builtins.open, os.open
    import safetensors

    real_safe_open = safetensors.safe_open

    def note(path: Any, dir_fd: int | None = None) -> None:
        if isinstance(path, int):
            return
        name = os.fsdecode(os.fspath(path))
        if dir_fd is not None and not os.path.isabs(name):  # openat: relative to that directory
            name = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), name)
        full = os.path.realpath(name)
        inside = full == allowed or full.startswith(allowed + os.sep)  # the directory itself may be opened
        if any(full == o or full.startswith(o + os.sep) for o in outside) and not inside:
            bad.append(full)

    def fake_open(file: Any, *a: Any, **k: Any) -> Any:
        note(file)
        return real_open(file, *a, **k)

    def fake_os_open(path: Any, *a: Any, **k: Any) -> Any:
        note(path, k.get("dir_fd"))
        return real_os_open(path, *a, **k)

    def fake_safe_open(path: Any, *a: Any, **k: Any) -> Any:
        note(path)
        return real_safe_open(path, *a, **k)

    modules = [m for name, m in list(__import__("sys").modules.items()) if name.startswith("savepoint") and m]
    patched = [(m, "safe_open") for m in modules if getattr(m, "safe_open", None) is real_safe_open]
    builtins.open = io.open = fake_open  # type: ignore[assignment]
    os.open = fake_os_open  # type: ignore[assignment]
    for m, attr in patched:
        setattr(m, attr, fake_safe_open)
    try:
        yield bad
    finally:
        builtins.open = io.open = real_open  # type: ignore[assignment]
        os.open = real_os_open  # type: ignore[assignment]
        for m, attr in patched:
            setattr(m, attr, real_safe_open)


def judge(call: Callable[[], Any], allowed: str, tmp: str, tally: Tally) -> None:
    """Run one parser call: a return or a SavepointError passes; anything else fails the property."""
    start = time.monotonic()
    with audit_opens(allowed, [tmp]) as bad:
        try:
            call()
        except SavepointError as exc:
            assert str(exc).strip(), "a SavepointError with no message"
        except Exception as exc:
            tally.case("input", [f"{type(exc).__name__}: {exc}"[:200]])
            raise
    problems = [f"read outside the checkpoint: {bad}"] if bad else []
    if time.monotonic() - start > SLOW_SECONDS:
        problems.append("parsing one small input took too long")
    tally.case("input", problems)
    assert not problems, problems


@pytest.fixture
def fuzzed(request: pytest.FixtureRequest, tally) -> Tally:  # type: ignore[no-untyped-def]
    """One Tally per fuzz test (fixtures run once per test, not per hypothesis example)."""
    xfail = request.node.get_closest_marker("xfail") is not None
    return tally(f"fuzz: {request.node.name.removeprefix('test_fuzz_')}", xfail=xfail)


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def ckpt(tmp_path) -> str:
    """A checkpoint directory with a secret file planted outside it (which must never be read)."""
    _write(str(tmp_path / "outside" / "secret.bin"), b"secret")
    os.symlink(str(tmp_path / "outside" / "secret.bin"), str(tmp_path / "link-out"))
    path = str(tmp_path / "ckpt")
    os.makedirs(path)
    return path


def _valid_manifest() -> dict[str, Any]:
    m = Manifest(kind="model", files={}, step=3, metrics={"loss": 0.5}, parent="step-00000002")
    doc = json.loads(m.to_json())
    doc["files"] = {"model.safetensors": {"size": 10, "checksum": "0" * 32}}
    return doc


# ---------------------------------------------------------------- the parsers


@FUZZ
@given(raw=inputs(_valid_manifest()))
def test_fuzz_manifest(raw: bytes, ckpt: str, tmp_path, fuzzed: Tally) -> None:
    _write(os.path.join(ckpt, "savepoint.json"), raw)
    judge(lambda: parse_manifest(raw, ckpt), ckpt, str(tmp_path), fuzzed)
    judge(lambda: read_manifest(ckpt), ckpt, str(tmp_path), fuzzed)


@FUZZ
@given(metrics=JSON)
def test_fuzz_manifest_metrics(metrics: Any, ckpt: str, tmp_path, fuzzed: Tally) -> None:
    doc = _valid_manifest()
    doc["metrics"] = metrics
    judge(lambda: parse_manifest(_dumps(doc), ckpt), ckpt, str(tmp_path), fuzzed)


def _listed(ckpt: str, files: dict[str, bytes], kind: str = "model") -> Manifest:
    """Write `files` and a manifest that vouches for them (as a consistent attacker would)."""
    from savepoint.manifest import hash_entry

    for rel, data in files.items():
        _write(os.path.join(ckpt, rel), data)
    return Manifest(kind=kind, files={rel: hash_entry(os.path.join(ckpt, rel)) for rel in files}, step=1)


_VALID_STATE = {
    "state": {
        "a": 1,
        "t": {"__tensor__": "0"},
        "tup": {"__tuple__": [1, 2]},
        "m": {"__items__": [[1, 2]]},
        "f": {"__float__": "nan"},
        "n": {"__ndarray__": "0", "dtype": "<f4"},
    }
}


@FUZZ
@given(raw=inputs(_VALID_STATE))
def test_fuzz_train_state_json(raw: bytes, ckpt: str, tmp_path, fuzzed: Tally) -> None:
    import torch

    from savepoint.formats.safetensors_io import write_safetensors
    from savepoint.formats.train_state import read_blob

    buf = io.BytesIO()
    write_safetensors(buf, {"0": torch.arange(4, dtype=torch.float32)})
    manifest = _listed(ckpt, {"train_state/x.json": raw, "train_state/x.safetensors": buf.getvalue()})
    judge(lambda: read_blob(ckpt, manifest, "train_state/x"), ckpt, str(tmp_path), fuzzed)


def _header(doc: Any, data: bytes = b"\0" * 16, claimed: int | None = None) -> bytes:
    raw = _dumps(doc)
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data


_VALID_HEADER = {
    "__metadata__": {"format": "pt"},
    "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
}


@FUZZ
@given(
    raw=inputs(_VALID_HEADER).map(lambda b: struct.pack("<Q", len(b)) + b + b"\0" * 16)
    | st.builds(_header, JSON, st.binary(max_size=64), st.none() | st.integers(0, 2**64 - 1))
    | st.binary(max_size=64)
)
def test_fuzz_safetensors_header(raw: bytes, ckpt: str, tmp_path, fuzzed: Tally) -> None:
    from savepoint.formats.safetensors_io import read_header, read_safetensors

    path = os.path.join(ckpt, "model.safetensors")
    _write(path, raw)
    judge(
        lambda: read_header(path, checkpoint=ckpt, relpath="model.safetensors"), ckpt, str(tmp_path), fuzzed
    )
    judge(
        lambda: read_safetensors(path, checkpoint=ckpt, relpath="model.safetensors"),
        ckpt,
        str(tmp_path),
        fuzzed,
    )


_VALID_INDEX = {"metadata": {"total_size": 16}, "weight_map": {"w": "model-00001-of-00002.safetensors"}}
WEIGHT_FILES = st.sampled_from(
    [
        "model-00001-of-00002.safetensors",
        "../outside/secret.bin",
        "/etc/hostname",
        "../link-out",
        "sub/../../outside/secret.bin",
        "link-out",
    ]
)


@FUZZ
@given(
    raw=inputs(_VALID_INDEX)
    | st.dictionaries(st.text(max_size=5), WEIGHT_FILES, max_size=3).map(lambda m: _dumps({"weight_map": m}))
)
def test_fuzz_model_index(raw: bytes, ckpt: str, tmp_path, fuzzed: Tally) -> None:
    from savepoint.formats.hf import read_index, weight_files

    manifest = _listed(ckpt, {"model.safetensors.index.json": raw, "model-00001-of-00002.safetensors": b"x"})
    judge(lambda: read_index(ckpt), ckpt, str(tmp_path), fuzzed)
    judge(lambda: weight_files(ckpt, manifest), ckpt, str(tmp_path), fuzzed)


@FUZZ
@given(raw=inputs({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
def test_fuzz_adapter_config(raw: bytes, ckpt: str, tmp_path, fuzzed: Tally) -> None:
    adapter = pytest.importorskip("savepoint.lora.adapter")
    _write(os.path.join(ckpt, adapter.CONFIG_NAME), raw)

    def parse() -> None:
        config = adapter.read_adapter_config(ckpt)
        adapter.unsupported_reasons(config)

    judge(parse, ckpt, str(tmp_path), fuzzed)


@FUZZ
@given(raw=inputs(_VALID_INDEX), config=inputs({"model_type": "llama", "hidden_size": 16}))
def test_fuzz_base_model_index_and_config(
    raw: bytes, config: bytes, ckpt: str, tmp_path, fuzzed: Tally
) -> None:
    base = pytest.importorskip("savepoint.lora.base")
    _write(os.path.join(ckpt, "model.safetensors.index.json"), raw)
    _write(os.path.join(ckpt, "config.json"), config)
    judge(lambda: base.weight_files(ckpt), ckpt, str(tmp_path), fuzzed)
    judge(lambda: base.read_model_config(ckpt), ckpt, str(tmp_path), fuzzed)
