"""When to save and what to keep: pure functions of checkpoint infos, no I/O and no clock.

Each retention rule answers "which steps must I keep?"; a checkpoint survives when any rule keeps it.
The latest checkpoint is always kept, so a restart always has something to resume from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

BestMode = Literal["min", "max"]


@dataclass(frozen=True)
class CheckpointInfo:
    """What retention and discovery need to know about one committed checkpoint."""

    step: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    path: str = ""
    created: float = 0.0
    size: int = 0


@dataclass(frozen=True, kw_only=True)
class RetentionPolicy:
    """Which checkpoints to keep. Every field is optional; `None` disables that rule.

    keep_last: keep the N newest checkpoints.
    keep_best: keep the K best checkpoints by `best_metric` (`best_mode` "min" or "max").
    keep_every: keep every checkpoint whose step is a multiple of M (milestones).
    With no rule set, everything is kept.
    """

    keep_last: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: BestMode = "min"
    keep_every: int | None = None

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_best", "keep_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.keep_best is not None and self.best_metric is None:
            raise ValueError("keep_best needs best_metric: name the metric that ranks checkpoints")

    @property
    def keeps_everything(self) -> bool:
        return self.keep_last is None and self.keep_best is None and self.keep_every is None


def should_save(step: int, save_every: int | None) -> bool:
    """The save schedule: every `save_every` steps (never when it is None)."""
    return save_every is not None and step > 0 and step % save_every == 0


def rank_by_metric(infos: Sequence[CheckpointInfo], metric: str, mode: BestMode) -> list[CheckpointInfo]:
    """Checkpoints that report `metric`, best first; ties go to the newer step."""
    scored = [i for i in infos if metric in i.metrics]
    sign = 1.0 if mode == "min" else -1.0
    return sorted(scored, key=lambda i: (sign * i.metrics[metric], -i.step))


def best_step(infos: Sequence[CheckpointInfo], metric: str | None, mode: BestMode) -> int | None:
    if metric is None:
        return None
    ranked = rank_by_metric(infos, metric, mode)
    return ranked[0].step if ranked else None


def steps_to_keep(infos: Sequence[CheckpointInfo], policy: RetentionPolicy) -> set[int]:
    """The steps the policy keeps; always includes the latest and the best."""
    steps = sorted(i.step for i in infos)
    if not steps or policy.keeps_everything:
        return set(steps)
    keep = {steps[-1]}
    if policy.keep_last is not None:
        keep.update(steps[-policy.keep_last :])
    if policy.best_metric is not None:
        ranked = rank_by_metric(infos, policy.best_metric, policy.best_mode)
        keep.update(i.step for i in ranked[: policy.keep_best or 1])
    if policy.keep_every is not None:
        keep.update(s for s in steps if s % policy.keep_every == 0)
    return keep


def steps_to_delete(infos: Sequence[CheckpointInfo], policy: RetentionPolicy) -> list[int]:
    """The complement of `steps_to_keep`, oldest first."""
    keep = steps_to_keep(infos, policy)
    return sorted(i.step for i in infos if i.step not in keep)
