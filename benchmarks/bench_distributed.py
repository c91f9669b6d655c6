"""Rank 0's peak host memory while exporting an FSDP2 model, and save times, under torchrun on CPU.

    MALLOC_MMAP_THRESHOLD_=65536 torchrun --standalone --nproc_per_node=2 -m benchmarks.bench_distributed OUT_DIR

The fixed mmap threshold makes glibc return freed tensors to the OS, so that the peak is not hidden
by (or blamed on) heap reuse.

Peak resident memory is read from /proc/self/status (VmHWM) after resetting it (clear_refs 5), so
the number covers only the gather + write of `save_pretrained`. Prints one JSON line from rank 0.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import savepoint
from savepoint.demo import tiny


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(li for li in f if li.startswith(field))
    return int(line.split()[1]) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = tiny.tiny_llama(
        seed=0, vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4,
    )  # fmt: skip
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 8192, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    dist.barrier()
    _reset_peak()
    before = _rss("VmRSS")
    t0 = time.perf_counter()
    savepoint.save_pretrained(model, f"{out}/export")
    export_s = time.perf_counter() - t0
    peak = _rss("VmHWM") - before
    timings = {}
    for sharded_model in (False, True):
        mgr = savepoint.CheckpointManager(f"{out}/run-{sharded_model}", sharded_model=sharded_model)
        t0 = time.perf_counter()
        mgr.save(1, model=model, optimizer=opt)
        timings[f"save_sharded_model={sharded_model}_s"] = round(time.perf_counter() - t0, 2)
    if rank == 0:
        print(
            json.dumps(
                {
                    "world_size": dist.get_world_size(),
                    "model_MB": round(model_bytes / 2**20, 1),
                    "rank0_peak_extra_MB_during_export": round(peak / 2**20, 1),
                    "export_s": round(export_s, 2),
                    **timings,
                }
            )
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
