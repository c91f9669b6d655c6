"""Hostile checkpoints against the readers of other projects' formats, and restores that must be whole.

Each class is built as an attacker builds it: the hazard is planted in a real checkpoint and the
manifest rewritten so that every checksum matches (`relist`). Classes: DCP's pickled `.metadata`
(a pickle bomb, byte items, storage entries that point elsewhere, chunks that claim more than the
files hold), DCP data records, unlisted files for `consolidate`, bare DCP directories, DeepSpeed's own
files on every route, the pickles a Trainer would read on resume, and each kind of damage that a
restore must refuse before it changes any live object.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from tests.reliability.scenarios import State, same, train_state
from tests.reliability.test_hostile_inputs import SENTINEL, Bomb, ckpt_of, relist

import savepoint
from savepoint.consolidate import consolidate
from savepoint.errors import CorruptCheckpointError, SavepointError, UnsafeCheckpointError
from savepoint.formats import sharded
from savepoint.formats import train_state as train_state_format

DCP = "train_state/dcp"
METADATA = f"{DCP}/.metadata"


def make_sharded(root: str, extra: dict[str, Any] | None = None) -> str:
    """Turn step 1 of `root` into a "sharded" checkpoint, laid out as savepoint lays out one written by
    FSDP ranks: model weights and optimizer moments in a DCP directory, the rest as JSON."""
    state = train_state(1)
    ckpt = ckpt_of(root)
    tensors, rest = sharded.split_optimizer_state(
        sharded.optimizer_state(state.model, state.kwargs["optimizer"])
    )
    tensors.update(sharded.model_tensors(state.model))
    items: dict[str, Any] = {k: v.detach().clone() for k, v in tensors.items()}
    items.update(extra or {})
    shutil.rmtree(os.path.join(ckpt, DCP), ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(items, storage_writer=dcp.FileSystemWriter(os.path.join(ckpt, DCP)), no_dist=True)
    doc, blob_tensors = train_state_format.encode_blob(rest, "optimizer")
    assert not blob_tensors
    Path(ckpt, f"{sharded.GROUPS_BLOB}.json").write_bytes(doc)
    for name in ("model.safetensors", "train_state/optimizer.json", "train_state/optimizer.safetensors"):
        os.remove(os.path.join(ckpt, name))
    relist(ckpt, kind="sharded")
    return ckpt


@pytest.fixture
def sharded_run(run: str) -> str:
    make_sharded(run)
    return run


def rewrite_metadata(ckpt: str, change: Callable[[Any], None]) -> None:
    """Change DCP's metadata object and write it back (the test reads its own file with pickle)."""
    path = os.path.join(ckpt, METADATA)
    with open(path, "rb") as f:
        metadata = pickle.load(f)
    change(metadata)
    with open(path, "wb") as f:
        pickle.dump(metadata, f)
    relist(ckpt)


# ---------------------------------------------------------------- restoring: everything or nothing


def snapshot(state: State) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in state.model.state_dict().items()},
        "optimizer": copy.deepcopy(state.kwargs["optimizer"].state_dict()),
        "scheduler": copy.deepcopy(state.kwargs["scheduler"].state_dict()),
        "rng": (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()),
        "stateful": {n: hasattr(o, "loaded") for n, o in state.kwargs["stateful"].items()},
    }


def attempt_restore(root: str) -> tuple[SavepointError, list[str]]:
    """Restore step 1 into fresh objects; return the error and every live object that changed."""
    fresh = train_state(1, fresh=True)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    before = snapshot(fresh)
    kwargs = {k: fresh.kwargs[k] for k in ("optimizer", "scheduler", "stateful")}
    with pytest.raises(SavepointError) as err:
        savepoint.CheckpointManager(root).restore(model=fresh.model, step=1, **kwargs)
    after = snapshot(fresh)
    changed = same(before["model"], after["model"], "model")
    changed += same(before["optimizer"], after["optimizer"], "optimizer")
    changed += same(before["scheduler"], after["scheduler"], "scheduler")
    rng_same = before["rng"][0] == after["rng"][0] and np.array_equal(before["rng"][1], after["rng"][1])
    changed += [] if rng_same and torch.equal(before["rng"][2], after["rng"][2]) else ["rng"]
    changed += [f"stateful[{n}]" for n, loaded in after["stateful"].items() if loaded]
    return err.value, changed


def edit_blob(ckpt: str, relbase: str, change: Callable[[Any, dict[str, torch.Tensor]], None]) -> None:
    json_path = Path(ckpt, f"{relbase}.json")
    st_path = Path(ckpt, f"{relbase}.safetensors")
    doc = json.loads(json_path.read_bytes())
    tensors = load_file(st_path) if st_path.exists() else {}
    change(doc["state"], tensors)
    json_path.write_text(json.dumps(doc))
    if tensors:
        save_file(tensors, st_path)
    relist(ckpt)


def _moment_shape(doc: Any, tensors: dict[str, torch.Tensor]) -> None:
    tensors[doc["state"]["0.weight"]["exp_avg"]["__tensor__"]] = torch.zeros(3, 3)


def _torch_rng_short(doc: Any, tensors: dict[str, torch.Tensor]) -> None:
    key = doc["torch"]["__tensor__"]
    tensors[key] = tensors[key][:100].clone()


DAMAGE: dict[str, tuple[str, Callable[[Any, dict[str, torch.Tensor]], None]]] = {
    "optimizer-moment-shape": ("train_state/optimizer", _moment_shape),
    "optimizer-unknown-parameter": (
        "train_state/optimizer",
        lambda d, t: d["state"].update(ghost={"step": 1.0}),
    ),
    "scheduler-missing-key": ("train_state/scheduler", lambda d, t: d.pop("base_lrs")),
    "scheduler-extra-key": ("train_state/scheduler", lambda d, t: d.update(lr_lambdas=[None])),
    "scheduler-list-length": ("train_state/scheduler", lambda d, t: d.update(base_lrs=[0.1, 0.2])),
    "rng-torch-size": ("train_state/rng/rank-00000", _torch_rng_short),
    "rng-python": (
        "train_state/rng/rank-00000",
        lambda d, t: d.update(python={"__tuple__": [3, [1, 2], None]}),
    ),
    "rng-numpy": ("train_state/rng/rank-00000", lambda d, t: d["numpy"]["__tuple__"].__setitem__(0, "PCG64")),
    "stateful-missing-tensor": (
        "train_state/stateful/loader",
        lambda d, t: d.update(order={"__tensor__": "999"}),
    ),
    "stateful-bad-float": (
        "train_state/stateful/extra_rng",
        lambda d, t: d.update(pos={"__float__": "1e999"}),
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_restore_is_all_or_nothing(run: str, damage: str) -> None:
    relbase, change = DAMAGE[damage]
    edit_blob(ckpt_of(run), relbase, change)
    error, changed = attempt_restore(run)
    assert changed == [], f"{damage}: a failed restore ({error}) changed {changed}"


def test_sharded_restore_is_all_or_nothing(sharded_run: str) -> None:
    """A DCP record of an optimizer moment that does not decode, read after the model's records."""
    ckpt = ckpt_of(sharded_run)
    with open(os.path.join(ckpt, METADATA), "rb") as f:
        metadata = pickle.load(f)
    # savepoint reads the model's records first, so the model's buffers are full when this one fails.
    entry = next(e for i, e in metadata.storage_data.items() if i.fqn == "optim.0.weight.exp_avg")
    data = Path(ckpt, DCP, entry.relative_path)
    raw = bytearray(data.read_bytes())
    raw[entry.offset : entry.offset + entry.length] = b"\x00" * entry.length
    data.write_bytes(bytes(raw))
    relist(ckpt)
    error, changed = attempt_restore(sharded_run)
    assert isinstance(error, CorruptCheckpointError) and changed == [], f"{error}: changed {changed}"


# ---------------------------------------------------------------- DCP metadata


def _bomb_whole(ckpt: str, sentinel: str) -> None:
    Path(ckpt, METADATA).write_bytes(pickle.dumps(Bomb(sentinel)))
    relist(ckpt)


def _bomb_nested(ckpt: str, sentinel: str) -> None:
    rewrite_metadata(ckpt, lambda md: setattr(md, "version", Bomb(sentinel)))


def _bomb_in_record(ckpt: str, sentinel: str) -> None:
    rewrite_metadata(
        ckpt, lambda md: next(iter(md.storage_data.values())).__dict__.update(offset=Bomb(sentinel))
    )


@pytest.mark.parametrize(
    "plant", [_bomb_whole, _bomb_nested, _bomb_in_record], ids=["whole", "nested", "record"]
)
def test_dcp_metadata_pickle_bomb(
    sharded_run: str, tmp_path: Path, plant: Callable[[str, str], None]
) -> None:
    sentinel = str(tmp_path / SENTINEL)
    plant(ckpt_of(sharded_run), sentinel)
    error, changed = attempt_restore(sharded_run)
    assert isinstance(error, UnsafeCheckpointError) and "names io.open" in str(error), error
    assert changed == []
    with pytest.raises(UnsafeCheckpointError, match=r"names io\.open"):
        consolidate(ckpt_of(sharded_run), tmp_path / "out")
    assert not os.path.exists(sentinel), "DCP metadata was unpickled"
    assert not os.path.exists(tmp_path / "out")


def test_dcp_byte_item(run: str, tmp_path: Path) -> None:
    sentinel = str(tmp_path / SENTINEL)
    make_sharded(run, extra={"optim.payload": Bomb(sentinel)})  # DCP stores it as a pickled byte item
    error, changed = attempt_restore(run)
    assert isinstance(error, UnsafeCheckpointError) and "byte item" in str(error), error
    assert changed == []
    with pytest.raises(UnsafeCheckpointError, match=r"byte item"):
        consolidate(ckpt_of(run), tmp_path / "out")
    assert not os.path.exists(sentinel), "a DCP byte item was unpickled"


def test_dcp_byte_item_declared_only(sharded_run: str, tmp_path: Path) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    rewrite_metadata(
        ckpt_of(sharded_run),
        lambda md: md.state_dict_metadata.update({"model.0.weight": BytesStorageMetadata()}),
    )
    error, changed = attempt_restore(sharded_run)
    assert isinstance(error, UnsafeCheckpointError) and "byte item" in str(error) and changed == []


def _entry(md: Any, index: int = 0) -> Any:
    return sorted(md.storage_data.values(), key=lambda e: e.offset)[index]


def _entry_of(md: Any, fqn: str = "model.0.weight") -> Any:
    return next(e for i, e in md.storage_data.items() if i.fqn == fqn)


ENTRY_ATTACKS: dict[str, Callable[[Any], None]] = {
    "path-climbs-out": lambda md: setattr(_entry(md), "relative_path", "../../model.safetensors"),
    "path-absolute": lambda md: setattr(_entry(md), "relative_path", "/etc/hostname"),
    "path-subdirectory": lambda md: setattr(_entry(md), "relative_path", "sub/__0_0.distcp"),
    "path-metadata-itself": lambda md: setattr(_entry(md), "relative_path", ".metadata"),
    "path-unlisted": lambda md: setattr(_entry(md), "relative_path", "__7_0.distcp"),
    "offset-beyond-file": lambda md: setattr(_entry(md), "offset", 10**9),
    "length-beyond-file": lambda md: setattr(_entry(md), "length", 10**12),
    "negative-offset": lambda md: setattr(_entry(md), "offset", -64),
    "overlapping-entries": lambda md: setattr(_entry(md, 1), "offset", _entry(md).offset),
    "stream-transform": lambda md: setattr(_entry(md), "transform_descriptors", ["zstd"]),
    "entry-without-chunk": lambda md: md.storage_data.update(
        {type(next(iter(md.storage_data)))("model.ghost", [0]): _entry(md)}
    ),
    "chunk-without-entry": lambda md: md.storage_data.pop(next(iter(md.storage_data))),
    "huge-claimed-shape": lambda md: setattr(
        md.state_dict_metadata["model.0.weight"], "size", torch.Size([2**31, 2**31])
    ),
    "chunk-outside-tensor": lambda md: setattr(
        md.state_dict_metadata["model.0.weight"].chunks[0], "offsets", torch.Size([7, 0])
    ),
    "chunk-more-than-its-bytes": lambda md: setattr(_entry_of(md), "length", 8),
}


@pytest.mark.parametrize("attack", sorted(ENTRY_ATTACKS))
def test_dcp_storage_entry_points_elsewhere(sharded_run: str, tmp_path: Path, attack: str) -> None:
    ckpt = ckpt_of(sharded_run)
    rewrite_metadata(ckpt, ENTRY_ATTACKS[attack])
    error, changed = attempt_restore(sharded_run)
    assert isinstance(error, CorruptCheckpointError) and METADATA in str(error), f"{attack}: {error}"
    assert changed == []
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata"):
        consolidate(ckpt, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_dcp_data_record_is_a_pickle_bomb(sharded_run: str, tmp_path: Path) -> None:
    """A tensor record replaced by a torch file whose unpickling runs code: DCP decodes records with
    torch's weights-only unpickler, so it is refused, and the live objects stay as they were."""
    import io

    sentinel = str(tmp_path / SENTINEL)
    ckpt = ckpt_of(sharded_run)
    buf = io.BytesIO()
    torch.save(Bomb(sentinel), buf)
    bomb = buf.getvalue()

    def splice(md: Any) -> None:
        for entry in md.storage_data.values():
            entry.offset += len(bomb)
        first = _entry_of(md)  # a model weight: restore and consolidate both read it
        first.offset, first.length = 0, len(bomb)

    name = _entry_of(pickle.loads(Path(ckpt, METADATA).read_bytes())).relative_path
    data = Path(ckpt, DCP, name)
    data.write_bytes(bomb + data.read_bytes())
    rewrite_metadata(ckpt, splice)
    error, changed = attempt_restore(sharded_run)
    assert isinstance(error, CorruptCheckpointError) and changed == [], error
    with pytest.raises(CorruptCheckpointError):
        consolidate(ckpt, tmp_path / "out")
    assert not os.path.exists(sentinel)


def test_dcp_unlisted_file(sharded_run: str, tmp_path: Path) -> None:
    ckpt = ckpt_of(sharded_run)
    Path(ckpt, DCP, "__1_0.distcp").write_bytes(b"planted")
    with pytest.raises(CorruptCheckpointError, match=r"__1_0\.distcp: present but not listed"):
        consolidate(ckpt, tmp_path / "out")
    # The metadata pointing at a file the manifest does not list (listed everything else again).
    rewrite_metadata(ckpt, lambda md: setattr(_entry(md), "relative_path", "__1_0.distcp"))
    relist(ckpt, drop=(f"{DCP}/__1_0.distcp",))
    error, changed = attempt_restore(sharded_run)
    assert isinstance(error, UnsafeCheckpointError) and "does not list" in str(error) and changed == []


def test_dcp_bare_directory(tmp_path: Path) -> None:
    """A DCP directory with no savepoint manifest: refused unless trusted, and then still read through
    the allow-list (a bomb is refused; a symlinked data file is not followed)."""
    bare = tmp_path / "bare"
    model = train_state(1).model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(dict(model.state_dict()), storage_writer=dcp.FileSystemWriter(str(bare)), no_dist=True)
    with pytest.raises(UnsafeCheckpointError, match=r"trust"):
        consolidate(bare, tmp_path / "out")
    out = consolidate(bare, tmp_path / "out", trust_metadata=True)  # the control: it consolidates
    assert same(load_file(os.path.join(out, "model.safetensors")), dict(model.state_dict())) == []

    data = next(p for p in bare.iterdir() if p.suffix == ".distcp")
    outside = tmp_path / "outside.distcp"
    data.rename(outside)
    data.symlink_to(outside)
    with pytest.raises(UnsafeCheckpointError, match=r"does not list|symbolic"):
        consolidate(bare, tmp_path / "out2", trust_metadata=True)

    sentinel = str(tmp_path / SENTINEL)
    (bare / ".metadata").write_bytes(pickle.dumps(Bomb(sentinel)))
    with pytest.raises(UnsafeCheckpointError, match=r"names io\.open"):
        consolidate(bare, tmp_path / "out3", trust_metadata=True)
    assert not os.path.exists(sentinel)


@pytest.fixture(scope="module")
def distributed_dcp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.distributed.common import torchrun

    out = tmp_path_factory.mktemp("hostile-dcp")
    torchrun("worker_hostile_dcp.py", str(out), nproc=2)
    return out


@pytest.mark.parametrize("case", ["bomb", "rank1-rng", "rank1-record"])
def test_dcp_distributed_restore(distributed_dcp_run: Path, case: str) -> None:
    """A genuine FSDP2 checkpoint (2 ranks, weights in DCP), damaged: every rank raises promptly (the
    ranks vote before any collective read, and after it), nothing is unpickled, no rank's shards
    change. Damage one rank found is damage on every rank (the same error, naming it), so that all
    fall back together."""
    expected = {
        "bomb": ["UnsafeCheckpointError", "UnsafeCheckpointError"],
        "rank1-rng": ["CorruptCheckpointError", "CorruptCheckpointError"],
        "rank1-record": ["CorruptCheckpointError", "CorruptCheckpointError"],
    }[case]
    named = {"bomb": "", "rank1-rng": "rank-00001.json", "rank1-record": "__1_0.distcp"}[case]
    for rank, kind in enumerate(expected):
        got = json.loads((distributed_dcp_run / f"result-{rank}.json").read_text())[case]
        assert got["error"] and got["error"].startswith(kind), f"rank {rank}: {got}"
        assert named in got["error"], got["error"]
        assert not got["sentinel"] and got["unchanged"] and got["seconds"] < 30, f"rank {rank}: {got}"


# ---------------------------------------------------------------- DeepSpeed


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("deepspeed")
    from tests.distributed.common import torchrun

    out = tmp_path_factory.mktemp("hostile-deepspeed")
    torchrun("worker_hostile_deepspeed.py", str(out), nproc=1)
    return out


@pytest.mark.parametrize("route", ["model_states", "optim_states", "load_universal"])
def test_deepspeed_planted_pickles(deepspeed_run: Path, route: str) -> None:
    """Restore through the engine's checkpoint engine (module and ZeRO optimizer files) and with
    `checkpoint.load_universal` (DeepSpeed's own torch.load): refused, nothing unpickled or changed."""
    got = json.loads((deepspeed_run / "result.json").read_text())[route]
    assert got["error"] and got["error"].startswith("UnsafeCheckpointError"), got
    expected = r"checkpoint\.load_universal" if route == "load_universal" else r"Unsupported global.*open"
    assert re.search(expected, got["error"]), got["error"]
    assert not got["sentinel"] and got["unchanged"], got


@pytest.mark.parametrize("victim", ["model_states.pt", "optim_states.pt"])
@pytest.mark.parametrize("inside", [True, False], ids=["in-checkpoint", "bare"])
def test_deepspeed_consolidation_planted_pickles(
    deepspeed_run: Path, tmp_path: Path, victim: str, inside: bool
) -> None:
    """`savepoint consolidate` of a DeepSpeed directory runs DeepSpeed's zero_to_fp32, whose every
    torch.load goes through the weights-only reader, confined to the tag directory."""
    ckpt = tmp_path / "step-00000001"
    shutil.copytree(deepspeed_run / "root" / "step-00000001", ckpt)
    tag = ckpt / "train_state" / "deepspeed" / "global_step1"
    sentinel = str(tmp_path / SENTINEL)
    target = next(p for p in tag.iterdir() if p.name.endswith(victim))
    torch.save({"module": Bomb(sentinel)}, target)
    if inside:
        relist(str(ckpt))
        source = tag
    else:
        source = tmp_path / "bare"
        shutil.copytree(tag, source)
    with pytest.raises(UnsafeCheckpointError, match=r"Unsupported global.*open"):
        consolidate(source, tmp_path / "out")
    assert not os.path.exists(sentinel) and not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("inside", [True, False], ids=["in-checkpoint", "bare"])
def test_deepspeed_consolidation_checks_config_before_transformers(
    deepspeed_run: Path, tmp_path: Path, inside: bool
) -> None:
    """The config.json a DeepSpeed consolidation hands to transformers (to lay weights out as the Hub
    does) claims 1 GiB (sparse): refused unread, before transformers opens it by its path."""
    import resource

    ckpt = tmp_path / "step-00000001"
    shutil.copytree(deepspeed_run / "root" / "step-00000001", ckpt)
    tag = ckpt / "train_state" / "deepspeed" / "global_step1"
    if inside:
        config, source = ckpt / "config.json", tag
    else:
        config, source = tmp_path / "config.json", tmp_path / "bare"
        shutil.copytree(tag, source)
        shutil.copy(ckpt / "config.json", config)
    with open(config, "r+b") as f:
        f.truncate(2**30)
    if inside:
        relist(str(ckpt))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CorruptCheckpointError, match=r"config\.json.*more than"):
        consolidate(source, tmp_path / "out")
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    assert grew_mib < 256, f"memory grew {grew_mib:.0f} MiB: the claimed size was read"
    assert not os.path.exists(tmp_path / "out")


def test_deepspeed_reads_only_listed_files(deepspeed_run: Path, tmp_path: Path) -> None:
    from savepoint.integrations.deepspeed_files import FileLoader

    tag = deepspeed_run / "root" / "step-00000001" / "train_state" / "deepspeed" / "global_step1"
    names = sorted(p.name for p in tag.iterdir())
    loader = FileLoader(str(tag), listed=names[:1])
    for asked in (tag / names[-1], tag / ".." / "x.pt", Path("/etc/hostname")):
        with pytest.raises(UnsafeCheckpointError, match=r"not one of the checkpoint's listed files"):
            loader(asked)
    assert isinstance(loader(tag / names[0]), dict)


# ---------------------------------------------------------------- Trainer resume


@pytest.mark.parametrize(
    "planted",
    ["rng_state.pth", "optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin", "pytorch_model.bin"],
)
@pytest.mark.parametrize("listed", [False, True])
def test_trainer_resume_planted_pickles(tmp_path: Path, planted: str, listed: bool) -> None:
    """The Trainer would torch.load these names from the directory it resumes from; savepoint never
    writes them, so `resume_checkpoint()` refuses the checkpoint (naming the file) and falls back."""
    pytest.importorskip("transformers")
    from savepoint.integrations.transformers import SavepointCallback

    root = str(tmp_path / "run")
    with savepoint.CheckpointManager(root) as mgr:
        for step in (1, 2):
            state = train_state(step)
            mgr.save(step, model=state.model, **state.kwargs)
    newest = os.path.join(root, "step-00000002")
    Path(newest, planted).write_bytes(pickle.dumps(Bomb(str(tmp_path / SENTINEL))))
    if listed:
        relist(newest)
    callback = SavepointCallback(root)
    with pytest.warns(UserWarning, match=planted.replace(".", r"\.")):
        chosen = callback.resume_checkpoint()
    assert chosen == os.path.join(root, "step-00000001")
    assert not os.path.exists(tmp_path / SENTINEL)
