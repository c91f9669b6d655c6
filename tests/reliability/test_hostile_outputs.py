"""Hostile sources for outputs: nothing unverified or outside the source is published, nothing stalls.

The attacker made the checkpoint, the adapter or the base model a merge, export or consolidate
reads, controls every byte (manifest included) and recomputes every checksum (`relist`). Each class
asserts that the user gets a `SavepointError` naming the file, that no output appears, that no byte
from outside the source reaches one, that sizes and patterns cannot stall the run, and that the CLI
prints what a checkpoint says as inert text.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from pathlib import Path

import pytest
from tests.reliability.hostile_helpers import (
    SECRET,
    cli_ok,
    lora_ckpt,
    outputs_hold,
)
from tests.reliability.scenarios import model_state
from tests.reliability.test_hostile_inputs import ckpt_of, relist, run  # noqa: F401 (run: a fixture)

import savepoint
from savepoint.errors import (
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    MergeError,
    SavepointError,
)
from savepoint.lora.export import export_checkpoint

# ---------------------------------------------------------------- files copied into outputs


@pytest.mark.parametrize("route", ["export", "merge-lora", "merge-lora-base"])
def test_side_file_symlinked_out_is_never_published(tmp_path: Path, secret: Path, route: str) -> None:
    ckpt, base = lora_ckpt(tmp_path)
    source = base if route == "merge-lora-base" else ckpt
    name = "generation_config.json" if route == "merge-lora-base" else "tokenizer_config.json"
    if os.path.lexists(os.path.join(source, name)):
        os.remove(os.path.join(source, name))
    os.symlink(secret, os.path.join(source, name))
    if source == ckpt:
        relist(ckpt)  # the attacker lists the secret's checksum under the link's name
    out = tmp_path / "out"
    with pytest.raises(CorruptCheckpointError, match=name):
        if route == "export":
            export_checkpoint(ckpt, str(out))
        else:
            savepoint.merge_lora(ckpt, base=base, out=str(out))
    assert not out.exists() and not outputs_hold(tmp_path / "run", SECRET)
    assert secret.read_bytes() == SECRET


@pytest.mark.parametrize("tamper", ["unlisted", "changed"])
@pytest.mark.parametrize("route", ["export", "merge-lora"])
def test_side_file_the_manifest_does_not_vouch_for(tmp_path: Path, route: str, tamper: str) -> None:
    ckpt, base = lora_ckpt(tmp_path)
    tok = Path(ckpt, "tokenizer_config.json")
    tok.write_text('{"chat_template": "honest"}')
    if tamper == "unlisted":
        relist(ckpt, drop=("tokenizer_config.json",))  # planted after the save, never listed
    else:
        relist(ckpt)
        tok.write_text('{"chat_template": "evil!!"}')  # same size, other bytes: checksum mismatch
    out = tmp_path / "out"
    with pytest.raises(CorruptCheckpointError, match=r"tokenizer_config\.json"):
        if route == "export":
            export_checkpoint(ckpt, str(out))
        else:
            savepoint.merge_lora(ckpt, base=base, out=str(out))
    assert not out.exists()


def test_consolidate_side_files_come_only_from_the_manifest(tmp_path: Path, secret: Path) -> None:
    """consolidate's side-file copy (shared with DeepSpeed consolidation) on a checkpoint directory."""
    from savepoint.side_files import copy_checkpoint_side_files
    from savepoint.storage.local import StagedDir

    out = model_state(1)
    root = str(tmp_path / "run")
    with savepoint.CheckpointManager(root) as mgr:
        mgr.save(1, model=out.model, **out.kwargs)
    ckpt = ckpt_of(root)
    for plant in ("planted", "symlink"):
        staged = StagedDir(str(tmp_path), f"out-{plant}")
        path = os.path.join(ckpt, "generation_config.json")
        if os.path.lexists(path):
            os.remove(path)
        if plant == "planted":
            Path(path).write_text("{}")
        else:
            os.symlink(secret, path)
            relist(ckpt)
        with pytest.raises(CorruptCheckpointError, match=r"generation_config\.json"):
            copy_checkpoint_side_files(ckpt, staged)
        staged.abort()
    assert secret.read_bytes() == SECRET


# ---------------------------------------------------------------- export verifies every route


@pytest.mark.parametrize("damage", ["flipped-byte", "planted-shard"])
def test_export_with_dtype_verifies_like_export(tmp_path: Path, damage: str) -> None:
    root = str(tmp_path / "run")
    state = model_state(1)
    with savepoint.CheckpointManager(root) as mgr:
        mgr.save(1, model=state.model)
    ckpt = ckpt_of(root)
    if damage == "flipped-byte":
        path = Path(ckpt, "model.safetensors")
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        shutil.copy(
            os.path.join(ckpt, "model.safetensors"), os.path.join(ckpt, "model-00002-of-00002.safetensors")
        )
    for dtype in (None, "bf16"):
        out = tmp_path / f"out-{dtype}"
        with pytest.raises(CorruptCheckpointError, match="model"):
            export_checkpoint(ckpt, str(out), dtype=dtype)
        assert not out.exists()


@pytest.mark.parametrize("recorded", ["path-only", "wrong-fingerprint"])
def test_merge_without_base_never_trusts_a_recorded_path(tmp_path: Path, recorded: str) -> None:
    from tests.reliability.scenarios import fill_, tiny_llama

    ckpt, _ = lora_ckpt(tmp_path)
    decoy = str(tmp_path / "decoy")  # another model the attacker wants merged and published
    model = tiny_llama(seed=9)
    fill_(model, 5)
    model.save_pretrained(decoy)
    doc = json.loads(Path(ckpt, "savepoint.json").read_bytes())
    base_model = dict(doc["base_model"], name_or_path=decoy)
    if recorded == "path-only":
        base_model.pop("fingerprint", None)
    relist(ckpt, base_model=base_model)
    out = tmp_path / "out"
    expected = MergeError if recorded == "path-only" else IncompatibleCheckpointError
    with pytest.raises(expected, match="base"):
        export_checkpoint(ckpt, str(out), merge_lora=True)
    assert not out.exists()


# ---------------------------------------------------------------- sizes, depths and patterns


@pytest.mark.parametrize("what", ["manifest", "adapter_config", "base_config"])
def test_huge_json_files_are_refused_unread(tmp_path: Path, what: str) -> None:
    ckpt, base = lora_ckpt(tmp_path)
    target = {
        "manifest": os.path.join(ckpt, "savepoint.json"),
        "adapter_config": os.path.join(ckpt, "adapter_config.json"),
        "base_config": os.path.join(base, "config.json"),
    }[what]
    with open(target, "r+b") as f:
        f.truncate(5 * 2**30)  # sparse: 5 GiB claimed, no disk used; refused before any checksum
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(SavepointError, match=r"savepoint.json|adapter_config.json|config.json"):
        savepoint.merge_lora(ckpt, base=base, out=str(tmp_path / "out"))
    if what == "manifest":
        with pytest.raises(CorruptCheckpointError, match="bytes"):
            savepoint.verify(ckpt)
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    assert grew_mib < 256 and time.monotonic() - start < 20, "memory or time followed the claimed size"


@pytest.mark.timeout(60)
def test_rank_and_alpha_patterns_cannot_stall_a_merge(tmp_path: Path) -> None:
    ckpt, base = lora_ckpt(tmp_path)
    # Against Python's backtracking `re` this pattern takes time exponential in the module name.
    evil = "(a|a)*b"
    name = "model.layers.0.self_attn." + "a" * 40 + "c"
    from safetensors.torch import load_file, save_file

    weights = os.path.join(ckpt, "adapter_model.safetensors")
    tensors = load_file(weights)
    a_key = next(k for k in tensors if "lora_A" in k)
    prefix = a_key.rsplit(".", 3)[0]  # base_model.model.model.layers.0.self_attn
    tensors[f"{prefix}.{'a' * 40}c.lora_A.weight"] = tensors[a_key].clone()
    tensors[f"{prefix}.{'a' * 40}c.lora_B.weight"] = tensors[a_key.replace("lora_A", "lora_B")].clone()
    save_file(tensors, weights, metadata={"format": "pt"})
    config_path = Path(ckpt, "adapter_config.json")
    config = json.loads(config_path.read_bytes())
    config["alpha_pattern"] = {evil: 8}
    config_path.write_text(json.dumps(config))
    relist(ckpt)
    start = time.monotonic()
    with pytest.raises(SavepointError, match=name.rsplit(".", 1)[-1][:20]):
        savepoint.merge_lora(ckpt, base=base, out=str(tmp_path / "out"))
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("pattern", ["(?=q)proj", r"(\w)\1_proj"])
def test_patterns_a_linear_matcher_cannot_run_are_refused(tmp_path: Path, pattern: str) -> None:
    ckpt, base = lora_ckpt(tmp_path)
    config_path = Path(ckpt, "adapter_config.json")
    config = json.loads(config_path.read_bytes())
    config["rank_pattern"] = {}
    config["alpha_pattern"] = {pattern: 8}
    config_path.write_text(json.dumps(config))
    relist(ckpt)
    with pytest.raises(MergeError, match=r"adapter_config\.json"):
        savepoint.merge_lora(ckpt, base=base, out=str(tmp_path / "out"))


# ---------------------------------------------------------------- what the CLI prints


NASTY_METRIC = "[bold red]loss\x1b[2J\x1b]0;owned\x07"
NASTY_FILE = "notes[red]\x1b[31m\u202egnp.exe"


def test_cli_prints_what_a_checkpoint_says_as_inert_text(
    run: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ckpt = ckpt_of(run)
    Path(ckpt, NASTY_FILE).write_text("planted")
    doc = json.loads(Path(ckpt, "savepoint.json").read_bytes())
    relist(ckpt, metrics={**doc["metrics"], NASTY_METRIC: 1.0}, kind="module")
    outputs = [
        cli_ok(capsys, monkeypatch, "ls", run, "--wide"),  # the metric as a column, not wrapped
        cli_ok(capsys, monkeypatch, "inspect", ckpt),
        cli_ok(capsys, monkeypatch, "verify", run),
        cli_ok(
            capsys, monkeypatch, "plot", run, "--metric", "nope", "--out", str(Path(run).parent / "p.png")
        ),
    ]
    Path(ckpt, NASTY_FILE).unlink()
    Path(ckpt, "x" + NASTY_FILE).write_text("unlisted now")
    outputs.append(cli_ok(capsys, monkeypatch, "verify", run))
    for _code, out in outputs:
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out, out
    ls_out, inspect_out = outputs[0][1], outputs[1][1]
    assert "[bold red]loss" in ls_out, "a metric name was taken as markup"
    assert "\\x1b" in inspect_out and "notes[red]" in inspect_out
    assert "\\u202e" in outputs[4][1]
