"""`savepoint inspect`: manifest, files, tensor headers, training state, adapters, and trust."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tests.cli.cli_helpers import flip_byte, step_dir, table_row

import savepoint
from savepoint.cli import inspect_report as inspect_cli


def test_checkpoint_tensors_and_manifest(cli, llama_run: Path) -> None:
    result = cli("inspect", step_dir(llama_run, 20))
    assert result.code == 0, result.err
    out = result.out
    assert "savepoint checkpoint" in out
    assert "model" in table_row(out, "kind") and "20" in table_row(out, "step")
    assert "eval_loss=1.5" in table_row(out, "metrics") and "step-00000010" in table_row(out, "parent")
    assert "torch" in table_row(out, "versions")
    q_proj = table_row(out, "model.layers.0.self_attn.q_proj.weight")
    assert "F32" in q_proj and "(32, 32)" in q_proj and "4 KiB" in q_proj
    assert "(16, 32)" in table_row(out, "model.layers.1.self_attn.k_proj.weight")  # 2 KV heads of 8
    assert "model.safetensors: 21 tensors" in out
    assert "ok" in table_row(out, "model.safetensors")  # the files table: checksum verified


def test_checkpoint_training_state(cli, llama_run: Path) -> None:
    out = cli("inspect", step_dir(llama_run, 30)).out
    assert "1 group(s), 21 parameters" in table_row(out, "optimizer")
    assert "lr=0.001" in table_row(out, "group 0") and "betas=[0.9, 0.999]" in table_row(out, "group 0")
    assert "last_epoch=3" in table_row(out, "scheduler")
    assert table_row(out, "rng ranks").split("│")[2].strip() == "0"
    assert "python" in table_row(out, "rng generators") and "torch" in table_row(out, "rng generators")


def test_module_checkpoint_stateful_and_extra(cli, module_run: Path) -> None:
    out = cli("inspect", step_dir(module_run, 10)).out
    assert "module" in table_row(out, "kind")
    assert "loader" in table_row(out, "stateful") and "note" in table_row(out, "extra")
    assert "momentum=0.9" in table_row(out, "group 0")
    assert "(8, 4)" in table_row(out, "fc1.weight") and "(2,)" in table_row(out, "fc2.bias")


def test_long_tensor_lists_are_truncated_unless_all(cli, llama_run: Path) -> None:
    ckpt = step_dir(llama_run, 10)
    short = cli("inspect", ckpt).out
    assert "train_state/optimizer.safetensors: 63 tensors" in short
    assert "... and 38 more (--all shows every tensor)" in short
    full = cli("inspect", ckpt, "--all").out
    assert "more (--all" not in full
    assert "F32" in table_row(full, "62")  # natural order: 0, 1, 2, ..., 62
    optimizer_table = full.split("train_state/optimizer.safetensors:")[1]
    assert optimizer_table.index("│ 2 ") < optimizer_table.index("│ 10 ")
    with pytest.raises(AssertionError):
        table_row(short, "62")


def test_json_output(cli, llama_run: Path) -> None:
    result = cli("inspect", step_dir(llama_run, 20), "--json")
    assert result.code == 0
    doc = json.loads(result.out)
    assert doc["manifest"]["step"] == 20 and doc["manifest"]["metrics"]["eval_loss"] == 1.5
    tensors = {t["name"]: t for t in doc["tensors"]["model.safetensors"]}
    assert tensors["lm_head.weight"] == {"name": "lm_head.weight", "dtype": "F32", "shape": [128, 32],
                                         "numel": 4096, "bytes": 16384}  # fmt: skip
    assert len(doc["tensors"]["train_state/optimizer.safetensors"]) == 63  # JSON is never truncated
    assert all(f["status"] == "ok" and len(f["checksum"]) == 32 for f in doc["files"])
    assert doc["train_state"]["optimizer"]["params"] == 21 and doc["problems"] == []


def test_damaged_files_are_listed_but_never_parsed(cli, llama_run: Path, run_copy, monkeypatch) -> None:
    ckpt = step_dir(run_copy(llama_run), 20)
    flip_byte(ckpt / "model.safetensors", offset=20)  # inside the header: parsing it would be unsafe
    flip_byte(ckpt / "train_state" / "optimizer.json", offset=5)
    opened: list[str] = []
    real_read_header = inspect_cli.read_header
    monkeypatch.setattr(
        inspect_cli,
        "read_header",
        lambda path, **kw: opened.append(kw["relpath"]) or real_read_header(path, **kw),
    )
    result = cli("inspect", ckpt)
    assert result.code == 1
    assert "checksum mismatch" in table_row(result.out, "model.safetensors")
    assert "model.safetensors: checksum mismatch" in result.out
    assert "model.safetensors" not in opened and "train_state/optimizer.safetensors" in opened
    assert "optimizer" not in [
        line.split("│")[1].strip() for line in result.out.splitlines() if line.count("│") == 3
    ]
    doc = json.loads(cli("inspect", ckpt, "--json").out)
    assert "model.safetensors" not in doc["tensors"] and doc["train_state"]["optimizer"] is None
    assert {p["path"] for p in doc["problems"]} == {"model.safetensors", "train_state/optimizer.json"}


@pytest.mark.parametrize("manifest", [None, b"{not json", b'{"format": "savepoint"}'])
def test_checkpoint_without_a_valid_manifest_is_not_parsed(
    cli, module_run: Path, run_copy, monkeypatch, manifest: bytes | None
) -> None:
    ckpt = step_dir(run_copy(module_run), 10)
    if manifest is None:
        (ckpt / "savepoint.json").unlink()
    else:
        (ckpt / "savepoint.json").write_bytes(manifest)
    monkeypatch.setattr(inspect_cli, "read_header", lambda *a, **k: pytest.fail("parsed an unverified file"))
    result = cli("inspect", ckpt)
    assert result.code == 1
    assert "unverifiable" in result.out and "savepoint.json:" in result.out
    assert "unverified" in table_row(result.out, "model.safetensors")


def test_unlisted_file_is_reported(cli, module_run: Path, run_copy) -> None:
    ckpt = step_dir(run_copy(module_run), 5)
    (ckpt / "evil.safetensors").write_bytes(b"junk")
    result = cli("inspect", ckpt)
    assert result.code == 1
    assert "not listed" in table_row(result.out, "evil.safetensors")
    assert "not a readable safetensors" not in result.out  # it was never opened


def test_plain_hf_directory(cli, tmp_path: Path) -> None:
    from tests.cli.conftest import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    result = cli("inspect", tmp_path / "hf")
    assert result.code == 0, result.err
    assert "no savepoint manifest" in result.out and "llama" in table_row(result.out, "model_type")
    assert "model.safetensors.index.json" in result.out
    assert "F32" in table_row(result.out, "model.norm.weight")
    assert "-" in table_row(result.out, "config.json")  # no checksum to show


def test_plain_directory_with_a_dangling_symlink(cli, tmp_path: Path) -> None:
    from tests.cli.conftest import TinyNet

    out_dir = Path(savepoint.save_pretrained(TinyNet(), tmp_path / "export"))
    (out_dir / "savepoint.json").unlink()  # now a plain directory, as a copied HF cache would be
    (out_dir / "model-00002-of-00002.safetensors").symlink_to(tmp_path / "gone")
    result = cli("inspect", out_dir)
    assert result.code == 1
    assert "unreadable" in table_row(result.out, "model-00002-of-00002.safetensors")
    assert "(8, 4)" in table_row(result.out, "fc1.weight")


def test_savepoint_export_and_single_file(cli, tmp_path: Path) -> None:
    from tests.cli.conftest import TinyNet

    out_dir = savepoint.save_pretrained(TinyNet(), tmp_path / "export", dtype="bf16")
    assert "module" in table_row(cli("inspect", out_dir).out, "kind")
    result = cli("inspect", Path(out_dir) / "model.safetensors")
    assert result.code == 0
    assert "BF16" in table_row(result.out, "fc1.weight") and "64 B" in table_row(result.out, "fc1.weight")


def _peft_adapter(path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from tests.cli.conftest import tiny_llama

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    get_peft_model(tiny_llama(), config).save_pretrained(path)


def test_adapter_directory(cli, tmp_path: Path) -> None:
    _peft_adapter(tmp_path / "adapter")
    result = cli("inspect", tmp_path / "adapter")
    assert result.code == 0, result.err
    out = result.out
    assert table_row(out, "r").split("│")[2].strip() == "4" and "8" in table_row(out, "lora_alpha")
    assert "q_proj" in table_row(out, "target_modules") and "v_proj" in table_row(out, "target_modules")
    assert "true" in table_row(out, "use_dora")
    assert "(4, 32)" in table_row(out, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")


def test_adapter_without_lora_module_falls_back_to_config(cli, tmp_path: Path, monkeypatch) -> None:
    _peft_adapter(tmp_path / "adapter")
    monkeypatch.setitem(sys.modules, "savepoint.lora.adapter", None)  # import now raises ImportError
    doc = json.loads(cli("inspect", tmp_path / "adapter", "--json").out)
    assert doc["adapter"]["r"] == 4 and doc["adapter"]["lora_alpha"] == 8 and doc["adapter"]["use_dora"]
    assert sorted(doc["adapter"]["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "nope", "does not exist"),
        (lambda p: p, "not a checkpoint or model directory"),
        (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "is a file"),
    ],
)
def test_bad_paths_exit_2(cli, tmp_path: Path, make, message: str) -> None:
    result = cli("inspect", make(tmp_path))
    assert result.code == 2
    assert message in result.err


def test_root_points_to_a_checkpoint(cli, module_run: Path) -> None:
    result = cli("inspect", module_run)
    assert result.code == 2
    assert "run root holding 3 checkpoint(s)" in result.err and "step-00000015" in result.err


def test_manifest_from_the_future_is_refused(cli, module_run: Path, run_copy) -> None:
    ckpt = step_dir(run_copy(module_run), 5)
    doc = json.loads((ckpt / "savepoint.json").read_text())
    (ckpt / "savepoint.json").write_text(json.dumps({**doc, "format_version": 99}))
    result = cli("inspect", ckpt)
    assert result.code == 2 and "upgrade savepoint" in " ".join(result.err.split())


def test_tensor_bytes_for_every_dtype_savepoint_writes() -> None:
    for dtype in savepoint.formats.safetensors_io.DTYPE_NAMES:
        name = savepoint.formats.safetensors_io.DTYPE_NAMES[dtype]
        [row] = inspect_cli._tensor_rows({"t": (name, [3, 2])})
        assert row["bytes"] == 6 * torch.empty((), dtype=dtype).element_size()
