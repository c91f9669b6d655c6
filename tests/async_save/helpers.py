"""Shared pieces of the async-save tests: a tiny model with optimizer state, and a gate on the writer."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from savepoint import async_writer
from savepoint import manager as manager_module
from savepoint.demo import tiny


def trained_llama(steps: int = 2) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A tiny Llama after a few AdamW steps, so every parameter has optimizer moments."""
    model = tiny.tiny_llama(vocab_size=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 8), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def clone_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Deep copies of the weights and the optimizer's tensors, to compare against later."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    moments = {
        (i, k): v.detach().clone()
        for i, s in enumerate(opt.state.values())
        for k, v in s.items()
        if torch.is_tensor(v)
    }
    return {"weights": weights, "moments": moments}


def mutate(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Change every weight and every optimizer tensor in place, as the next training step would."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for s in opt.state.values():
            for v in s.values():
                if torch.is_tensor(v):
                    v.add_(1.0)


class WriterGate:
    """Holds the background write until the test opens the gate (so a race cannot hide)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, fail: BaseException | None = None) -> None:
        self.opened = threading.Event()
        self.started = threading.Event()
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        # What the writer thread runs: the recorded plan (one process, a local root), else the pipeline.
        for owner, name in ((async_writer, "write_plan"), (manager_module, "write_checkpoint")):
            monkeypatch.setattr(owner, name, self._gated(getattr(owner, name), fail))

    def _gated(self, real: Callable[..., str], fail: BaseException | None) -> Callable[..., str]:
        def gated(*args: Any) -> str:
            with self._lock:
                self.active += 1
                self.max_active = max(self.max_active, self.active)
            self.started.set()
            try:
                if not self.opened.wait(timeout=60):
                    raise TimeoutError("the test never opened the writer gate")
                if fail is not None:
                    raise fail
                return real(*args)
            finally:
                with self._lock:
                    self.active -= 1

        return gated

    def open(self) -> None:
        self.opened.set()
