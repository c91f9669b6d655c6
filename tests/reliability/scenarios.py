"""The saves the torture harness breaks, and the checks a fresh process runs on what they left.

Every value a checkpoint holds is a pure function of its step (`Scenario.build(step)`), so a
checker that never saw the writer can say what each listed checkpoint must restore to.

A scenario has a `setup` (the checkpoints committed before, written without faults), an `act` (the
operation under test: a save, a retention pass, a sweep) and the steps it may add or delete. New
kinds of save plug in by adding a `Scenario` to `SCENARIOS`, with `requires` naming the module it
needs (`savepoint.formats.peft`, `savepoint.snapshot`) so it is skipped, not failed, where that
module is absent.
"""

from __future__ import annotations

import importlib.util
import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from savepoint import CheckpointManager, verify
from savepoint.discovery import STEP_DIR, list_checkpoints

# ---------------------------------------------------------------- deterministic state


def fill_(module: torch.nn.Module, seed: int, *, only_trainable: bool = False) -> None:
    """Overwrite every floating tensor of `module` with values drawn from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in sorted(module.state_dict(keep_vars=True).items()):
            if not t.is_floating_point() or (only_trainable and not t.requires_grad):
                continue
            del name
            t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))


class Position:
    """A stateful object (a data-loader position), with a tensor, a tuple and a nested dict."""

    def __init__(self, step: int = 0) -> None:
        self.step = step

    def state_dict(self) -> dict[str, Any]:
        s = self.step
        return {
            "pos": s * 13,
            "epoch": (s // 3, "train"),
            "order": torch.arange(s + 2),
            "meta": {"seen": [s, s + 1]},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.loaded = sd


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


@lru_cache(maxsize=1)
def tokenizer() -> Any:
    """A small tokenizer, trained once per process (the zygote trains it before forking)."""
    from savepoint.demo.tiny import load_corpus, train_tokenizer

    return train_tokenizer(load_corpus()[:20_000], vocab_size=300)


@dataclass
class State:
    """What one save passes to the manager, and what a restore must give back."""

    model: torch.nn.Module
    kwargs: dict[str, Any] = field(default_factory=dict)


def model_state(step: int, *, fresh: bool = False) -> State:
    model = tiny_llama()
    fill_(model, 7 if fresh else 1000 + step)
    return State(model, {"tokenizer": None if fresh else tokenizer(), "metrics": {"loss": 1.0 / (step + 1)}})


def train_state(step: int, *, fresh: bool = False) -> State:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    fill_(model, 7 if fresh else 2000 + step)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    if not fresh:
        gen = torch.Generator().manual_seed(3000 + step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        for _ in range(step):
            sched.step()
    stateful = {"loader": Position(0 if fresh else step), "extra_rng": Position(0 if fresh else step * 2)}
    kwargs = {
        "optimizer": opt,
        "scheduler": sched,
        "stateful": stateful,
        "metrics": {"loss": 1.0 / (step + 1)},
    }
    return State(model, kwargs)


def lora_state(step: int, *, fresh: bool = False) -> State:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    fill_(model, 7 if fresh else 4000 + step, only_trainable=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return State(model, {"optimizer": opt, "metrics": {"loss": 1.0 / (step + 1)}})


# ---------------------------------------------------------------- comparing


def same(a: Any, b: Any, where: str = "") -> list[str]:
    """Differences between two state trees (tensors compared exactly)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and torch.equal(a, b)
        )
        return [] if ok else [f"{where}: tensors differ"]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [d for k in a for d in same(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b) or type(a) is not type(b):
            return [f"{where}: {a!r:.60} != {b!r:.60}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in same(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r:.60} != {b!r:.60}"]


def compare(restored: State, expected: State) -> list[str]:
    diffs = same(restored.model.state_dict(), expected.model.state_dict(), "model")
    for key in ("optimizer", "scheduler"):
        if key in expected.kwargs:
            diffs += same(restored.kwargs[key].state_dict(), expected.kwargs[key].state_dict(), key)
    for name, obj in expected.kwargs.get("stateful", {}).items():
        got = getattr(restored.kwargs["stateful"][name], "loaded", None)
        diffs += same(got, obj.state_dict(), f"stateful[{name}]")
    return diffs


# ---------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """One save-like operation to break, and the checkpoints around it.

    before: steps committed (without faults) before the act.
    new: the step the act saves, or None.
    deletable: steps the act may delete (retention), all others must survive.
    """

    name: str
    build: Callable[..., State]
    before: tuple[int, ...]
    new: int | None
    manager: dict[str, Any] = field(default_factory=dict)
    deletable: tuple[int, ...] = ()
    requires: str | None = None
    setup_extra: Callable[[str], None] | None = None
    # Steps the act may bring back into the listing (a sweep putting back an interrupted replace).
    restorable: tuple[int, ...] = ()

    @property
    def available(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    @property
    def final(self) -> set[int]:
        """The steps listed once the act has finished without a fault."""
        return (set(self.before) - set(self.deletable)) | set(self.restorable) | ({self.new} - {None})

    def save(self, root: str, step: int, **manager: Any) -> None:
        state = self.build(step)
        _seed_rngs(step)  # the RNG state saved is a function of the step too, so restores can check it
        with CheckpointManager(root, **{**self.manager, **manager}) as mgr:
            mgr.save(step, model=state.model, **state.kwargs)

    def setup(self, root: str) -> None:
        for step in self.before:
            self.save(root, step, keep_last=None, keep_best=None, best_metric=None, keep_every=None)
        if self.setup_extra is not None:
            self.setup_extra(root)

    def act(self, root: str) -> None:
        if self.new is not None:
            self.save(root, self.new)
        else:
            # No save: open the root for writing (which sweeps) the way a resumed run does.
            with CheckpointManager(root, **self.manager) as mgr:
                mgr._open_for_writing()


def _leftovers(root: str) -> None:
    """What interrupted saves, deletions and replacements leave: a sweep must clear or repair them."""
    step5 = os.path.join(root, "step-00000005")
    os.rename(step5, os.path.join(root, ".old-step-00000005-cafe"))  # a replace cut between its renames
    staged = os.path.join(root, ".tmp-step-00000009-beef")
    os.makedirs(os.path.join(staged, "train_state"))
    with open(os.path.join(staged, "model.safetensors"), "wb") as f:
        f.write(b"\x00" * 100)
    os.rename(os.path.join(root, "step-00000001"), os.path.join(root, ".del-step-00000001-f00d"))


SCENARIOS = {
    s.name: s
    for s in [
        Scenario("full-model", model_state, before=(1, 2), new=3),
        Scenario("train-state", train_state, before=(1,), new=2),
        Scenario("resave-same-step", train_state, before=(1, 2), new=2),
        Scenario(
            "retention",
            train_state,
            before=(1, 2, 3, 4),
            new=5,
            manager={"keep_last": 2, "best_metric": "loss", "best_mode": "max", "keep_best": 1},
            deletable=(2, 3),
        ),
        Scenario(
            "sweep",
            train_state,
            before=(1, 2, 5),
            new=None,
            setup_extra=_leftovers,
            deletable=(1, 5),
            restorable=(5,),
        ),
        Scenario("lora", lora_state, before=(1,), new=2, requires="savepoint.formats.peft"),
        Scenario(
            "async",
            train_state,
            before=(1,),
            new=2,
            manager={"async_save": True},
            requires="savepoint.snapshot",
        ),
    ]
}


# ---------------------------------------------------------------- checking


def restore_problems(scenario: Scenario, root: str, step: int | str, expect_step: int) -> list[str]:
    """Restore `step` into fresh objects with a reader (no lock) and compare to what was saved."""
    fresh = scenario.build(expect_step, fresh=True)
    mgr = CheckpointManager(root)
    kwargs = {k: v for k, v in fresh.kwargs.items() if k in ("optimizer", "scheduler", "stateful")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = mgr.restore(model=fresh.model, step=step, **kwargs)
    if result.step != expect_step:
        return [f"restore({step!r}) gave step {result.step}, expected {expect_step}"]
    # The RNG state saved with the checkpoint is back: the next draws are the ones it would have made.
    # Checked first, since building the expected state below draws from the global RNG.
    problems = _rng_problems(expect_step)
    return problems + [f"step {expect_step}: {d}" for d in compare(fresh, scenario.build(expect_step))]


def _rng_problems(step: int) -> list[str]:
    got = (random.random(), float(np.random.rand()), torch.rand(2))
    _seed_rngs(step)
    want = (random.random(), float(np.random.rand()), torch.rand(2))
    return same(list(got), list(want), f"rng@{step}")


def _seed_rngs(step: int) -> None:
    random.seed(step)
    np.random.seed(step)
    torch.manual_seed(step)


def check_root(scenario: Scenario, root: str, expected: set[int], *, next_step: int) -> list[str]:
    """Everything a fresh process must find after a crash; returns the failures (empty: survived)."""
    problems = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        listed = {i.step for i in list_checkpoints(root, warn=False)}
    if listed != expected:
        problems.append(f"listed steps {sorted(listed)}, expected exactly {sorted(expected)}")
    orphans = sorted(n for n in os.listdir(root) if STEP_DIR.match(n) and int(n[5:]) not in listed)
    if orphans:
        problems.append(f"step directories that do not list (half-deleted or half-written?): {orphans}")
    for step in sorted(listed):
        try:
            verify(os.path.join(root, f"step-{step:08d}"))
            problems += restore_problems(scenario, root, step, step)
        except Exception as exc:  # any error here is a lost checkpoint
            problems.append(f"step {step}: {type(exc).__name__}: {exc}")
    if listed:
        try:
            problems += restore_problems(scenario, root, "latest", max(listed))
        except Exception as exc:
            problems.append(f"restore(latest): {type(exc).__name__}: {exc}")
    problems += next_save_problems(scenario, root, next_step)
    return problems


def next_save_problems(scenario: Scenario, root: str, step: int) -> list[str]:
    """The run goes on: a save succeeds, leaves no debris, and restores."""
    try:
        scenario.save(root, step)
        left = sorted(n for n in os.listdir(root) if n.startswith((".tmp-", ".del-", ".old-")))
        if left:
            return [f"after the next save, debris remains: {left}"]
        verify(root)
        return restore_problems(scenario, root, step, step)
    except Exception as exc:
        return [f"next save of step {step}: {type(exc).__name__}: {exc}"]
