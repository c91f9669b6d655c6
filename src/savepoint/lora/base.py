"""Read a base model's weights one tensor at a time, from a transformers directory or from memory.

`BaseWeights.open(dir)` checks the directory first (no quantized bases, no pickles, no index paths
leaving the directory) and then serves tensors lazily through `safe_open`, keeping at most one file
open: peak memory is one tensor, never a shard, never the model.

    >>> with BaseWeights.open("models/llama-1b") as w:  # doctest: +SKIP
    ...     w.shape("model.embed_tokens.weight")
    (32000, 2048)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from savepoint._json import read_json_inside
from savepoint.errors import MergeError
from savepoint.manifest import resolve_inside

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_SAFE_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    file: str  # relative path inside the base directory ("" for in-memory sources)
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.dtype.itemsize


def read_model_config(base_dir: str) -> dict[str, Any]:
    """The base's config.json ({} when absent); a quantized base is refused."""
    path = os.path.join(base_dir, "config.json")
    if not os.path.exists(path):
        return {}
    config = read_json_inside(base_dir, "config.json", lambda reason: MergeError(f"{path}: {reason}"))
    if not isinstance(config, dict):
        raise MergeError(f"{path} is not a JSON object")
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise MergeError(
            f"the base at {base_dir} is quantized ({method}); merging into quantized weights loses the "
            "adapter's precision. Merge into the unquantized base, then quantize the merged model."
        )
    return config


def weight_files(base_dir: str) -> list[str]:
    """The safetensors files of a model directory, in index order; refusals for anything else."""
    if os.path.exists(os.path.join(base_dir, INDEX)):
        index_path = resolve_inside(base_dir, INDEX)
        index = read_json_inside(base_dir, INDEX, lambda reason: MergeError(f"{index_path}: {reason}"))
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if (
            not isinstance(weight_map, dict)
            or not weight_map
            or not all(isinstance(v, str) for v in weight_map.values())
        ):
            raise MergeError(f"{base_dir}/{INDEX} has no weight_map")
        files = list(dict.fromkeys(weight_map.values()))
        for rel in files:
            resolve_inside(base_dir, rel)  # UnsafeCheckpointError for `..`, absolute paths, symlinks out
        return files
    if os.path.exists(os.path.join(base_dir, SINGLE)):
        resolve_inside(base_dir, SINGLE)
        return [SINGLE]
    if any(os.path.exists(os.path.join(base_dir, p)) for p in _PICKLES):
        raise MergeError(
            f"the base at {base_dir} is stored only as pickled pytorch_model.bin, which savepoint does not "
            "unpickle. Convert it once: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)."
        )
    if not os.path.isdir(base_dir):
        raise MergeError(f"the base {base_dir} is not a directory")
    raise MergeError(f"{base_dir} has no {SINGLE} or {INDEX}: it is not a transformers model directory")


class BaseWeights(AbstractContextManager["BaseWeights"]):
    """Lazy access to every tensor of a base model; use `open(dir)` or `from_module(model)`."""

    def __init__(
        self, infos: dict[str, TensorInfo], root: str, tensors: dict[str, torch.Tensor] | None = None
    ):
        self.infos = infos
        self.root = root
        self._tensors = tensors
        self._handle: Any = None
        self._handle_file: str | None = None

    @classmethod
    def open(cls, base_dir: str) -> BaseWeights:
        read_model_config(base_dir)
        infos: dict[str, TensorInfo] = {}
        for rel in weight_files(base_dir):
            for key, info in _file_infos(base_dir, rel).items():
                if key in infos:
                    raise MergeError(
                        f"tensor {key!r} appears in both {infos[key].file} and {rel} in {base_dir}"
                    )
                infos[key] = info
        return cls(infos, base_dir)

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> BaseWeights:
        """The base weights of an in-memory (peft-wrapped) model, tied copies counted once."""
        from savepoint.lora.fingerprint import base_state_items

        tensors = {k: t.detach() for k, t in base_state_items(module)}
        infos = {k: TensorInfo("", t.dtype, tuple(t.shape)) for k, t in tensors.items()}
        return cls(infos, "<memory>", tensors)

    def keys(self) -> list[str]:
        return list(self.infos)

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read from disk now (or from memory). Opening another file closes the last one."""
        if self._tensors is not None:
            return self._tensors[key].cpu()
        info = self.infos[key]
        if self._handle_file != info.file:
            self.close()
            self._handle = safe_open(os.path.join(self.root, info.file), framework="pt")
            self._handle.__enter__()
            self._handle_file = info.file
        return self._handle.get_tensor(key)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle, self._handle_file = None, None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _file_infos(base_dir: str, rel: str) -> dict[str, TensorInfo]:
    path = resolve_inside(base_dir, rel)
    try:
        with safe_open(path, framework="pt") as f:
            out = {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                sl = f.get_slice(key)
                dtype = _SAFE_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise MergeError(
                        f"tensor {key!r} in {rel} has dtype {sl.get_dtype()}, which savepoint cannot merge"
                    )
                out[key] = TensorInfo(rel, dtype, tuple(sl.get_shape()))
            return out
    except FileNotFoundError as exc:
        raise MergeError(f"{base_dir}/{rel} is listed in the index but missing") from exc
    except (SafetensorError, OSError) as exc:
        raise MergeError(f"{base_dir}/{rel} is not a readable safetensors file: {exc}") from exc


def iter_in_file_order(weights: BaseWeights) -> Iterator[str]:
    """Keys grouped by file, so a pass over them opens each file once."""
    by_file: dict[str, list[str]] = {}
    for key, info in weights.infos.items():
        by_file.setdefault(info.file, []).append(key)
    for keys in by_file.values():
        yield from keys
