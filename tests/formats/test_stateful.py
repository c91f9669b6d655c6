"""torchdata's StatefulDataLoader resumes shuffled data exactly through savepoint, at every cut point."""

from __future__ import annotations

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from savepoint.formats import state as codec
from savepoint.formats import stateful


def make_loader(seed: int | None = 1) -> StatefulDataLoader:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return StatefulDataLoader(list(range(12)), batch_size=4, shuffle=True, generator=gen)


def batches(loader: StatefulDataLoader, n: int, seq: list[list[int]]) -> None:
    """Take batches the way a training loop does: `for` over epochs until n batches in total."""
    target = len(seq) + n
    while len(seq) < target:
        for batch in loader:
            seq.append(batch.tolist())
            if len(seq) == target:
                break


def through_json(state: object) -> object:
    tensors: dict[str, torch.Tensor] = {}
    doc = codec.loads(codec.dumps(codec.encode(state, tensors)), ckpt="c", relpath="r")
    return codec.decode(doc, tensors, ckpt="c", relpath="r")


@pytest.mark.parametrize("cut", range(1, 9))  # 3 batches per epoch: mid-epoch and epoch-end cuts
def test_shuffled_loader_resumes_exactly_across_epochs(cut: int) -> None:
    reference: list[list[int]] = []
    batches(make_loader(), 15, reference)

    seq: list[list[int]] = []
    loader = make_loader()
    batches(loader, cut, seq)
    saved = through_json(stateful.capture(loader))
    torch.manual_seed(1234)  # the resumed process starts from other global RNG states
    resumed = make_loader(seed=99)  # ... and a generator seeded differently: the checkpoint must win
    stateful.restore(resumed, saved)
    batches(resumed, 15 - cut, seq)
    assert seq == reference


def test_plain_objects_use_their_own_state_dict() -> None:
    sched_owner = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(sched_owner, step_size=2)
    sched.step()
    state = stateful.capture(sched)
    assert state == sched.state_dict()
    other = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 2)
    stateful.restore(other, state)
    assert other.last_epoch == sched.last_epoch
