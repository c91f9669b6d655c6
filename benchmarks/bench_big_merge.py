"""Benchmark: `merge-lora` on a base bigger than RAM, stored as ONE `model.safetensors` file.

The base is a 13B-class bf16 Llama (hidden 5120, MLP 13824, 40 layers, vocabulary 32000: ~26 GB),
generated on the fly tensor by tensor with savepoint's streaming writer, plus an r=16 LoRA adapter on
every linear layer. The layer count shrinks when the disk cannot hold the base twice (the base plus
either the `cp` copy or the merged output; the copy is deleted before the merge). Reported: the
merge's wall time and extra peak RSS (VmHWM minus the RSS after imports, in a fresh process), and its
throughput against `cp` of the same file, in pairs (cp then merge, merge then cp, ...) run back to back
in the same run, both timed until durable, each started with the base dropped from the page cache:
the medians of the pairs are reported, with each pair's ratio. A few merged tensors are checked
against W + scale * B @ A computed here, read back through `safetensors.safe_open`.

    python -m benchmarks.bench_big_merge /tmp/big            # full size, ~60 GB of disk, ~10 minutes
    python -m benchmarks.bench_big_merge /tmp/big --layers 4 --repeats 5   # a 3.2 GB base
    python -m benchmarks.bench_big_merge /tmp/big --quick    # tiny smoke run
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from typing import Any

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_SRC = os.path.join(os.path.dirname(_HERE), "src")
LLAMA_13B = {"hidden": 5120, "intermediate": 13824, "layers": 40, "heads": 40, "vocab": 32000}
QUICK = {"hidden": 256, "intermediate": 688, "layers": 2, "heads": 4, "vocab": 1000}
RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MARGIN = 4 * 10**9  # disk left free for everyone else
_CP_CPU: list[float] = []  # CPU seconds of each timed cp
Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def layer_shapes(d: dict[str, int]) -> dict[str, tuple[int, ...]]:
    h, m = d["hidden"], d["intermediate"]
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (h, h),
        "self_attn.v_proj.weight": (h, h),
        "self_attn.o_proj.weight": (h, h),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (m, h),
        "mlp.up_proj.weight": (m, h),
        "mlp.down_proj.weight": (h, m),
    }


def base_layout(d: dict[str, int]) -> Layout:
    layout: Layout = {"model.embed_tokens.weight": (torch.bfloat16, (d["vocab"], d["hidden"]))}
    for i in range(d["layers"]):
        for name, shape in layer_shapes(d).items():
            layout[f"model.layers.{i}.{name}"] = (torch.bfloat16, shape)
    layout["model.norm.weight"] = (torch.bfloat16, (d["hidden"],))
    layout["lm_head.weight"] = (torch.bfloat16, (d["vocab"], d["hidden"]))
    return layout


def layout_bytes(layout: Layout) -> int:
    return sum(int(torch.Size(s).numel()) * dt.itemsize for dt, s in layout.values())


def layers_that_fit(d: dict[str, int], free: int) -> int:
    """The most layers (at most d["layers"]) for which the base fits the disk twice, with a margin."""
    one = layout_bytes(base_layout({**d, "layers": 1})) - layout_bytes(base_layout({**d, "layers": 0}))
    fixed = layout_bytes(base_layout({**d, "layers": 0}))
    return max(1, min(d["layers"], int(((free - _MARGIN) / 2.2 - fixed) // one)))


def write_base(base_dir: str, d: dict[str, int]) -> int:
    """config.json and one model.safetensors, each tensor made, written and dropped in turn."""
    from transformers import LlamaConfig

    from savepoint.formats.safetensors_io import write_streamed

    os.makedirs(base_dir, exist_ok=True)
    config = LlamaConfig(
        vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["intermediate"],
        num_hidden_layers=d["layers"], num_attention_heads=d["heads"], num_key_value_heads=d["heads"],
        tie_word_embeddings=False, dtype="bfloat16",
    )  # fmt: skip
    config.save_pretrained(base_dir)
    # Random values are slow to make on 2 cores: tile a 64 MB random pool at a per-tensor offset.
    pool = (torch.randn(32 << 20, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)

    def produce(name: str) -> torch.Tensor:
        dtype, shape = layout[name]
        flat = torch.empty(int(torch.Size(shape).numel()), dtype=dtype)
        offset = zlib.crc32(name.encode()) % (pool.numel() // 2)
        for start in range(0, flat.numel(), pool.numel() - offset):
            n = min(pool.numel() - offset, flat.numel() - start)
            flat[start : start + n].copy_(pool[offset : offset + n])
        return flat.view(shape)

    layout = base_layout(d)
    path = os.path.join(base_dir, "model.safetensors")
    with open(path, "wb") as f:
        written = write_streamed(f, layout, produce, {"format": "pt"})
        f.flush()
        os.fsync(f.fileno())
    return written


def write_adapter(adapter_dir: str, base_dir: str, d: dict[str, int]) -> None:
    """An r=16 LoRA adapter on every linear layer, as peft saves it (fp32, B non-zero)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    os.makedirs(adapter_dir, exist_ok=True)
    config = LoraConfig(
        r=RANK, lora_alpha=2 * RANK, target_modules=list(TARGETS), task_type="CAUSAL_LM",
        base_model_name_or_path=base_dir,
    )  # fmt: skip
    with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
        json.dump(config.to_dict(), f, default=sorted, indent=2)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(d["layers"]):
        for name, (out_f, in_f) in ((n, s) for n, s in layer_shapes(d).items() if len(s) == 2):
            prefix = f"base_model.model.model.layers.{i}.{name.removesuffix('.weight')}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, in_f, generator=g) / in_f**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, RANK, generator=g) * 0.01
    save_file(tensors, os.path.join(adapter_dir, "adapter_model.safetensors"), metadata={"format": "pt"})


def drop_from_cache(path: str) -> None:
    """Evict one file's clean pages, so the next read of it comes from the disk (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed_cp(src: str, dst: str) -> float:
    """Seconds for `cp` plus an fsync of the copy (the merge fsyncs its output too)."""
    drop_from_cache(src)
    cpu = _cpu_seconds(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(["cp", src, dst], check=True)
    subprocess.run(["sync", dst], check=True)
    seconds = time.perf_counter() - start
    _CP_CPU.append(_cpu_seconds(resource.RUSAGE_CHILDREN) - cpu)
    os.unlink(dst)
    os.sync()
    return seconds


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), 0)


def _child(base_dir: str, adapter_dir: str, out: str) -> dict[str, Any]:
    from savepoint.lora import merge_lora

    idle = _status_kib("VmRSS")
    cpu = _cpu_seconds(resource.RUSAGE_SELF)
    start = time.perf_counter()
    merge_lora(adapter_dir, base=base_dir, out=out)
    return {
        "wall_s": time.perf_counter() - start,
        "cpu_s": _cpu_seconds(resource.RUSAGE_SELF) - cpu,
        "extra_peak_rss_kib": _status_kib("VmHWM") - idle,
    }


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _python(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([_SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, check=False)


_SAFE_OPEN = (
    "import sys, safetensors\n"
    "with safetensors.safe_open(sys.argv[1], framework='pt') as f:\n"
    "    f.get_tensor('model.norm.weight')\n"
    "print('opened')\n"
)


def safe_open_outcome(path: str) -> str:
    """What `safetensors.safe_open` (transformers' and peft's reader) does with the base file."""
    done = _python(["-c", _SAFE_OPEN, path])
    if done.returncode == 0:
        return "opened"
    return (done.stderr.strip().splitlines() or ["failed"])[-1][:200]


def spot_check(base_dir: str, adapter_dir: str, out: str, d: dict[str, int]) -> float:
    """Max |difference| between a few merged tensors and W + scale * B @ A computed independently."""
    from safetensors import safe_open

    from savepoint.io.safetensors import open_safetensors

    index = os.path.join(out, "model.safetensors.index.json")
    weight_map = None
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    worst = 0.0
    last = d["layers"] - 1
    with (
        open_safetensors(base_dir, "model.safetensors") as base,
        open_safetensors(adapter_dir, "adapter_model.safetensors") as adapter,
    ):
        for key in ("model.layers.0.self_attn.q_proj.weight", f"model.layers.{last}.mlp.down_proj.weight"):
            prefix = "base_model.model." + key.removesuffix(".weight")
            a, b = adapter.read(prefix + ".lora_A.weight"), adapter.read(prefix + ".lora_B.weight")
            expected = (base.read(key).float() + 2.0 * (b @ a)).to(torch.bfloat16)
            shard = weight_map[key] if weight_map else "model.safetensors"
            with safe_open(os.path.join(out, shard), framework="pt") as f:
                got = f.get_tensor(key)
            worst = max(worst, float((got.float() - expected.float()).abs().max()))
    return worst


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} bench_big_merge: {message}", file=sys.stderr, flush=True)


def _merge_once(base_dir: str, adapter_dir: str, out: str) -> dict[str, Any]:
    """One merge in a fresh process, the base dropped from the page cache first."""
    drop_from_cache(os.path.join(base_dir, "model.safetensors"))
    child = _python([os.path.abspath(__file__), "--child", base_dir, adapter_dir, out])
    if child.returncode != 0:
        raise RuntimeError(f"merge failed:\n{child.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    return result


def run(
    workdir: str, *, quick: bool = False, repeats: int = 3, layers: int | None = None
) -> list[dict[str, Any]]:
    """Generate the inputs, then `repeats` pairs of (cp, merge), the order alternating from pair to pair
    so that neither always runs first on a freshly emptied page cache; one row of results (medians of
    the pairs; the inputs are deleted afterwards). `layers` caps the size (default: what fits the disk)."""
    dims = dict(QUICK if quick else LLAMA_13B)
    os.makedirs(workdir, exist_ok=True)
    dims["layers"] = min(layers or dims["layers"], layers_that_fit(dims, shutil.disk_usage(workdir).free))
    base_dir, adapter_dir = os.path.join(workdir, "base"), os.path.join(workdir, "adapter")
    out, copy = os.path.join(workdir, "merged"), os.path.join(workdir, "copy.safetensors")
    base_file = os.path.join(base_dir, "model.safetensors")
    load = os.getloadavg()[0]
    pairs: list[tuple[float, dict[str, Any]]] = []
    error = None
    try:
        _log(f"generating the base: {dims}")
        start = time.perf_counter()
        size = write_base(base_dir, dims)
        generate_s = time.perf_counter() - start
        _log(f"base written: {size / 1e9:.2f} GB in {generate_s:.0f} s; writing the adapter")
        write_adapter(adapter_dir, base_dir, dims)
        opened = safe_open_outcome(base_file)
        _log(f"safe_open: {opened}")
        for i in range(repeats):
            if i % 2 == 0:
                cp_s = timed_cp(base_file, copy)
                merged = _merge_once(base_dir, adapter_dir, out)
            else:
                merged = _merge_once(base_dir, adapter_dir, out)
            if error is None:
                error = spot_check(base_dir, adapter_dir, out, dims)
            shutil.rmtree(out)
            os.sync()
            if i % 2 == 1:
                cp_s = timed_cp(base_file, copy)
            pairs.append((cp_s, merged))
            _log(f"pair {i + 1}: cp {cp_s:.1f} s, merge {merged}")
    finally:
        for path in (base_dir, adapter_dir, out, copy):
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else None
        if os.path.exists(copy):
            os.unlink(copy)
    merge_s = [m["wall_s"] for _, m in pairs]
    ratios = [cp / m["wall_s"] for cp, m in pairs]
    rss = max(m["extra_peak_rss_kib"] for _, m in pairs) * 1024
    return [
        {
            "base": f"{dims['layers']} layers, hidden {dims['hidden']}, one file",
            "base_GB": round(size / 1e9, 2),
            "safe_open": opened,
            "generate_s": round(generate_s, 1),
            "pairs": len(pairs),
            "merge_s (median; each)": f"{statistics.median(merge_s):.1f}; "
            + ", ".join(f"{s:.1f}" for s in merge_s),
            "cp_s (each)": ", ".join(f"{cp:.1f}" for cp, _ in pairs),
            "merge_GB/s (median)": round(size / statistics.median(merge_s) / 1e9, 3),
            "throughput_vs_cp (median; each pair)": f"{statistics.median(ratios):.2f}; "
            + ", ".join(f"{r:.2f}" for r in ratios),
            "cpu_s merge, cp (median)": f"{statistics.median(m['cpu_s'] for _, m in pairs):.0f}, "
            f"{statistics.median(_CP_CPU[-len(pairs) :]):.0f}",
            "extra_peak_rss_GB (max)": round(rss / 1e9, 2),
            "rss_vs_base": round(rss / size, 3),
            "max_abs_err": error,
            "load_avg_start": round(load, 1),
        }
    ]


NOTES = [
    "target: extra peak RSS ≤ 0.1× the base; merge throughput ≥ 0.8× `cp` of the same file (both until durable)",
    "pairs: cp then merge, merge then cp, ... back to back in one run, each started with the base dropped from "
    "the page cache; medians of the pairs, with each pair's ratio",
    'safe_open column: what `safetensors.safe_open(..., framework="pt")` (the reader transformers and peft use) '
    "does with this file. Its torch binding maps the whole file a second time through torch's "
    "`UntypedStorage.from_file(shared=False)`: a private, writable (copy-on-write) mapping, which the kernel "
    "charges against its commit limit. With vm.overcommit_memory=0 the heuristic refuses a single mapping larger "
    "than RAM + swap, so on this 24 GiB machine without swap a 26 GB file cannot be opened at all (the error is "
    "torch's). savepoint's reader parses the header itself and reads each tensor with positional reads into its "
    "own buffer: it never maps the file",
    "cpu_s: CPU seconds (user + system) of the merge process and of one cp",
    "max_abs_err: merged tensors read back with safe_open against W + 2·B@A computed in fp32 here (bf16 rounding)",
    "command: python -m benchmarks.bench_big_merge /tmp/big --repeats 3   (or `make bench`, which runs it last)",
]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_child(*sys.argv[2:5])))
    else:
        import argparse

        parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_big_merge")
        parser.add_argument("workdir", nargs="?", default="/tmp/savepoint-bench-big")
        parser.add_argument("--quick", action="store_true")
        parser.add_argument("--repeats", type=int, default=3, help="pairs of (cp, merge)")
        parser.add_argument("--layers", type=int, default=None, help="fewer layers: a smaller base")
        args = parser.parse_args()
        rows = run(args.workdir, quick=args.quick, repeats=args.repeats, layers=args.layers)
        for row in rows:
            print(json.dumps(row))
