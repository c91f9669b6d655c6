"""Benchmark: savepoint's streaming `merge_lora` against peft's in-memory path.

peft's path is what users do today: `from_pretrained(base)`, `PeftModel.from_pretrained`,
`merge_and_unload()`, `save_pretrained`. Both write bf16 shards of 100 MB from a bf16 base saved in
100 MB shards (about 0.62 GB by default). Each run is a fresh subprocess that reports its wall time
and its peak RSS above the idle interpreter (VmHWM minus VmRSS measured after imports).

    python benchmarks/bench_merge.py /tmp/bench      # prints one JSON line per run
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
_SRC = os.path.join(os.path.dirname(_HERE), "src")
FULL = {"hidden": 1024, "intermediate": 2816, "layers": 22, "vocab": 32000, "rank": 16}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _make_inputs(workdir: str, dims: dict[str, int]) -> tuple[str, str]:
    """Build the bf16 base (100 MB shards) and a non-zero LoRA adapter on all linear layers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir, adapter_dir = os.path.join(workdir, "base"), os.path.join(workdir, "adapter")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=dims["intermediate"],
        num_hidden_layers=dims["layers"], num_attention_heads=16 if dims["hidden"] >= 256 else 4,
        num_key_value_heads=4 if dims["hidden"] >= 256 else 2, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(base_dir, max_shard_size="100MB")
    lora = get_peft_model(
        model, LoraConfig(r=dims["rank"], lora_alpha=2 * dims["rank"], target_modules="all-linear")
    )
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    lora.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def _child(mode: str, base_dir: str, adapter_dir: str, out: str) -> dict[str, Any]:
    import torch

    if mode == "savepoint":
        from savepoint.lora import merge_lora
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    idle = _status_kib("VmRSS")
    start = time.perf_counter()
    if mode == "savepoint":
        merge_lora(adapter_dir, base=base_dir, out=out, max_shard_size="100MB")
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
        model.save_pretrained(out, max_shard_size="100MB")
    wall = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {"mode": mode, "wall_s": round(wall, 3), "peak_rss_mb": round((peak - idle) / 1024, 1)}


def _run_child(mode: str, base_dir: str, adapter_dir: str, out: str) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([_SRC, os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, base_dir, adapter_dir, out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(workdir: str, *, dims: dict[str, int] | None = None, repeats: int = 1) -> list[dict[str, Any]]:
    """Build the inputs under `workdir`, then time each merge in fresh subprocesses; one dict per run."""
    dims = {**FULL, **(dims or {})}
    os.makedirs(workdir, exist_ok=True)
    base_dir, adapter_dir = _make_inputs(workdir, dims)
    base_mb = sum(os.path.getsize(os.path.join(base_dir, f)) for f in os.listdir(base_dir)) / 2**20
    results = []
    for i in range(repeats):
        for mode in ("savepoint", "peft"):
            out = os.path.join(workdir, f"out-{mode}-{i}")
            result = _run_child(mode, base_dir, adapter_dir, out)
            results.append({"benchmark": "merge_lora", "base_mb": round(base_mb, 1), **result})
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_child(*sys.argv[2:6])))
    else:
        for row in run(sys.argv[1] if len(sys.argv) > 1 else "/tmp/savepoint-bench-merge"):
            print(json.dumps(row))
