"""Read a base model's weights one tensor at a time, from a transformers directory or from memory.

`BaseWeights.open(dir)` checks the directory first (no quantized bases, no pickles, no index paths
leaving the directory) and then serves tensors lazily through savepoint's own safetensors reader, which
reads each tensor with positional reads and never maps a file (a base larger than RAM opens fine),
keeping at most one file open: peak memory is one tensor, never a shard, never the model.

    >>> with BaseWeights.open("models/llama-1b") as w:  # doctest: +SKIP
    ...     w.shape("model.embed_tokens.weight")
    (32000, 2048)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

from savepoint._json import read_json_inside
from savepoint.errors import MergeError
from savepoint.io.memory import Allocate, empty_buffer
from savepoint.io.safetensors import SafetensorsFile, open_safetensors
from savepoint.lora.fingerprint import Fingerprinter, base_state_items, unwrap_peft
from savepoint.manifest import resolve_inside

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


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
        self, infos: dict[str, TensorInfo], root: str, tensors: Mapping[str, torch.Tensor] | None = None
    ):
        self.infos = infos
        self.root = root
        self._tensors = tensors
        self._handle: SafetensorsFile | None = None
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
        """The base weights of an in-memory (peft-wrapped) model, tied copies counted once, under the
        names and shapes transformers saves them with (MoE experts one tensor per expert)."""
        from savepoint.formats.hf import hub_state
        from savepoint.formats.hub_layout import HubTensors

        tensors = hub_state(unwrap_peft(module), {k: t.detach() for k, t in base_state_items(module)})
        # A Hub layout converts a group when a tensor is asked for: read shapes from its plan instead.
        shapes = tensors.layout.meta if isinstance(tensors, HubTensors) else tensors
        infos = {k: TensorInfo("", t.dtype, tuple(t.shape)) for k, t in shapes.items()}
        return cls(infos, "<memory>", tensors)

    def keys(self) -> list[str]:
        return list(self.infos)

    def get(self, key: str, allocate: Allocate = empty_buffer) -> torch.Tensor:
        """One tensor, read from disk now into `allocate(shape, dtype)`'s buffer (or from memory, as
        is). Opening another file closes the last one."""
        if self._tensors is not None:
            return self._tensors[key].cpu()
        info = self.infos[key]
        if self._handle is None or self._handle_file != info.file:
            self.close()
            self._handle = _open_weight_file(self.root, info.file)
            self._handle_file = info.file
        return self._handle.read(key, allocate)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle, self._handle_file = None, None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _open_weight_file(base_dir: str, rel: str) -> SafetensorsFile:
    """Open a weight file of the base; symlinks inside the base directory are followed (resolve_inside
    refuses those leaving it), the file itself is opened without following one and must be regular."""
    path = resolve_inside(base_dir, rel)
    try:
        # One pass over weights that may not fit the page cache: read around it (savepoint.io.direct).
        return open_safetensors(os.path.dirname(path), os.path.basename(path), direct=True)
    except FileNotFoundError as exc:
        raise MergeError(f"{base_dir}/{rel} is listed in the index but missing") from exc
    except OSError as exc:
        raise MergeError(f"{base_dir}/{rel} cannot be read: {exc}") from exc


def _file_infos(base_dir: str, rel: str) -> dict[str, TensorInfo]:
    with _open_weight_file(base_dir, rel) as f:
        # In offset order, so one pass over the keys reads each file front to back.
        entries = sorted(f.entries.values(), key=lambda e: e.start)
        return {e.name: TensorInfo(rel, e.dtype, e.shape) for e in entries}


def iter_in_file_order(weights: BaseWeights) -> Iterator[str]:
    """Keys grouped by file, so a pass over them opens each file once."""
    by_file: dict[str, list[str]] = {}
    for key, info in weights.infos.items():
        by_file.setdefault(info.file, []).append(key)
    for keys in by_file.values():
        yield from keys


def fingerprint_dir(base_dir: str) -> dict[str, Any]:
    """Fingerprint of a transformers model directory's safetensors weights, read one tensor at a time
    (equal to `fingerprint_model` of the same weights in memory)."""
    fp = Fingerprinter()
    with BaseWeights.open(base_dir) as weights:
        for key in iter_in_file_order(weights):
            fp.add(weights.get(key))
    return fp.result()
