"""Retention and save-schedule policies: tables of cases plus properties that must hold for any history."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from savepoint.policy import (
    CheckpointInfo,
    RetentionPolicy,
    best_step,
    should_save,
    steps_to_delete,
    steps_to_keep,
)


def infos(losses: dict[int, float]) -> list[CheckpointInfo]:
    return [CheckpointInfo(step=s, metrics={"loss": v}) for s, v in losses.items()]


@pytest.mark.parametrize(
    ("policy", "losses", "kept"),
    [
        (RetentionPolicy(keep_last=2), {1: 5, 2: 4, 3: 3}, {2, 3}),
        (
            RetentionPolicy(keep_last=2, best_metric="loss", keep_best=1),
            {1: 0.1, 2: 4, 3: 3, 4: 2},
            {1, 3, 4},
        ),
        (
            RetentionPolicy(keep_last=1, best_metric="loss", best_mode="max", keep_best=2),
            {1: 9, 2: 8, 3: 1},
            {1, 2, 3},
        ),
        (RetentionPolicy(keep_last=1, keep_every=10), {5: 1, 10: 1, 15: 1, 20: 1, 25: 1}, {10, 20, 25}),
        # best_metric without keep_best still protects the single best checkpoint
        (RetentionPolicy(keep_last=1, best_metric="loss"), {1: 0.5, 2: 0.9, 3: 0.8}, {1, 3}),
        (RetentionPolicy(), {1: 1, 2: 2}, {1, 2}),
        # ties go to the newer checkpoint
        (RetentionPolicy(keep_last=1, best_metric="loss", keep_best=1), {1: 0.5, 2: 0.5, 3: 0.9}, {2, 3}),
    ],
)
def test_steps_to_keep_table(policy: RetentionPolicy, losses: dict[int, float], kept: set[int]) -> None:
    assert steps_to_keep(infos(losses), policy) == kept
    assert set(steps_to_delete(infos(losses), policy)) == set(losses) - kept


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_last": 0}, "keep_last"),
        ({"keep_every": -3}, "keep_every"),
        ({"keep_best": 2}, "best_metric"),
        ({"best_metric": "x", "best_mode": "lowest"}, "best_mode"),
    ],
)
def test_invalid_policies_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetentionPolicy(**kwargs)


def test_should_save_schedule() -> None:
    assert [s for s in range(0, 11) if should_save(s, 5)] == [5, 10]
    assert not any(should_save(s, None) for s in range(10))


histories = st.dictionaries(
    st.integers(min_value=0, max_value=10_000),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    min_size=1,
    max_size=40,
)
policies = st.builds(
    RetentionPolicy,
    keep_last=st.none() | st.integers(1, 10),
    keep_best=st.none() | st.integers(1, 5),
    best_metric=st.just("loss"),
    best_mode=st.sampled_from(["min", "max"]),
    keep_every=st.none() | st.integers(1, 50),
)


@given(histories, policies)
def test_latest_and_best_are_never_deleted(losses: dict[int, float], policy: RetentionPolicy) -> None:
    history = infos(losses)
    keep = steps_to_keep(history, policy)
    assert max(losses) in keep
    assert best_step(history, "loss", policy.best_mode) in keep
    assert keep <= set(losses)


@given(histories, policies)
def test_each_rule_keeps_what_it_promises(losses: dict[int, float], policy: RetentionPolicy) -> None:
    history = infos(losses)
    keep = steps_to_keep(history, policy)
    steps = sorted(losses)
    if policy.keep_last:
        assert set(steps[-policy.keep_last :]) <= keep
    if policy.keep_every:
        assert {s for s in steps if s % policy.keep_every == 0} <= keep
    if policy.keep_best:
        sign = 1 if policy.best_mode == "min" else -1
        ranked = sorted(steps, key=lambda s: (sign * losses[s], -s))
        assert set(ranked[: policy.keep_best]) <= keep


@given(histories, policies)
def test_retention_is_idempotent(losses: dict[int, float], policy: RetentionPolicy) -> None:
    """Applying the policy to what it kept deletes nothing more (no cascade across saves)."""
    history = infos(losses)
    kept = steps_to_keep(history, policy)
    survivors = [i for i in history if i.step in kept]
    # keep_last may legitimately reach further back once others are gone; everything kept stays kept.
    assert kept <= steps_to_keep(survivors, policy) | set()
