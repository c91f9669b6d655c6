"""Run every benchmark side by side in one process and write BENCHMARKS.md (`make bench`).

python -m benchmarks.run                  # full size (~0.6 GB model, ~1.3 GB training state)
python -m benchmarks.run --quick --out /tmp/B.md --plot /tmp/B.png   # tiny smoke run
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from benchmarks import bench_memory_tier, bench_restore, bench_save, bench_train, models
from benchmarks.common import Table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    sizes = models.QUICK if args.quick else models.FULL
    reps = args.reps or (1 if args.quick else 6)
    os.makedirs(args.workdir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="savepoint-bench-", dir=args.workdir)
    started, load_before = time.time(), os.getloadavg()
    tables, stats = run_all(sizes, workdir, reps=reps, quick=args.quick)
    loop_table, stats["loop"] = _async_loop(workdir, reps=args.reps, quick=args.quick)
    tables.append(loop_table)
    tables.append(_writer_cpu(workdir, quick=args.quick))
    tables += _optional_merge(workdir, quick=args.quick)
    if not args.quick:  # torchrun jobs of a minute or more each: not in the --quick smoke of `make test`
        tables.append(_distributed(workdir))
        tables.append(_stall_ranks(workdir, quick=args.quick))
    tables.append(_commit_scale(quick=args.quick))
    tables.append(_commit_read_bytes(workdir))
    tables.append(_restore_read_bytes(workdir))
    tables.append(_big_merge(args.workdir, quick=args.quick))
    header = _environment(argv, started, load_before, reps)
    _plot(tables[:2], args.plot)
    targets = _targets(stats)
    with open(args.out, "w") as f:
        f.write(header + "\n" + targets.markdown() + "\n" + "\n".join(t.markdown() for t in tables))
        f.write(
            f"\n![save throughput]({os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.out)))})\n"
        )
    bench_save.remove(workdir)
    print(f"wrote {args.out} and {args.plot} in {time.time() - started:.0f} s")
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (a smoke test)")
    parser.add_argument("--reps", type=int, default=0, help="repetitions per method (default 6, quick 1)")
    parser.add_argument("--out", default=os.path.join(REPO, "BENCHMARKS.md"))
    parser.add_argument("--plot", default=os.path.join(REPO, "benchmarks", "save_throughput.png"))
    parser.add_argument(
        "--workdir", default=tempfile.gettempdir(), help="scratch space on the disk to measure"
    )
    return parser.parse_args(argv)


def run_all(
    sizes: dict[str, models.Sizes], workdir: str, *, reps: int, quick: bool
) -> tuple[list[Table], dict[str, Any]]:
    stats: dict[str, Any] = {}
    bf16 = models.noise_model(sizes["bf16_model"], torch.bfloat16)
    model_table, stats["model"] = bench_save.save_model(bf16, workdir, reps)
    dedupe_table, stats["dedupe"] = bench_save.dedupe(bf16, workdir, shard="64KB" if quick else "100MB")
    del bf16
    gc.collect()
    model, opt = models.train_state(sizes["train_state"])
    state_table, stats["state"] = bench_save.save_train_state(model, opt, workdir, reps)
    sync = stats["state"]["savepoint CheckpointManager.save"]
    async_table, stats["async"] = bench_save.async_stall(model, opt, workdir, reps, sync)
    restore_table, stats["restore"] = bench_restore.restore(model, opt, workdir, reps)
    tier_table, stats["tier"] = bench_memory_tier.restart(model, opt, workdir, reps)
    loop = models.trainable(sizes["train_loop"])
    train_table, stats["train"] = bench_train.slowdown(loop, model, opt, workdir, max(1, min(reps, 3)))
    return [
        model_table,
        state_table,
        async_table,
        restore_table,
        tier_table,
        dedupe_table,
        train_table,
    ], stats


def _optional_merge(workdir: str, *, quick: bool) -> list[Table]:
    """benchmarks/bench_merge.py (another module's benchmark), included when present."""
    try:
        bench_merge = importlib.import_module("benchmarks.bench_merge")
    except ModuleNotFoundError:
        return []
    kwargs = {"quick": quick} if "quick" in inspect.signature(bench_merge.run).parameters else {}
    if quick and not kwargs:
        return [Table("LoRA merge", notes=["skipped in --quick (bench_merge.run takes no `quick` flag)"])]
    merge_dir = os.path.join(workdir, "merge")
    os.makedirs(merge_dir, exist_ok=True)
    return [Table("LoRA merge", bench_merge.run(merge_dir, **kwargs))]


def _big_merge(scratch: str, *, quick: bool) -> Table:
    """benchmarks/bench_big_merge.py: merge-lora on a one-file base bigger than RAM (~26 GB, ~15 min)."""
    from benchmarks import bench_big_merge

    title = "Bigger than RAM: merge-lora on a one-file 13B-class bf16 base"
    workdir = tempfile.mkdtemp(prefix="savepoint-bench-big-", dir=scratch)
    try:
        return Table(title, bench_big_merge.run(workdir, quick=quick), bench_big_merge.NOTES)
    except (RuntimeError, OSError) as exc:
        return Table(title, notes=[f"failed: {str(exc)[-300:]}"])
    finally:
        bench_save.remove(workdir)


def _distributed(workdir: str) -> Table:
    """benchmarks/bench_distributed.py under torchrun (2 ranks, FSDP2, gloo): rank 0's export peak."""
    out = os.path.join(workdir, "distributed")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "benchmarks.bench_distributed", out]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    lines = [li for li in done.stdout.splitlines() if li.startswith("{")]
    title = "Distributed: FSDP2 export and saves (2 ranks, CPU, gloo)"
    if done.returncode or not lines:
        return Table(title, notes=[f"failed (exit {done.returncode}): {done.stderr.strip()[-300:]}"])
    row = json.loads(lines[-1])
    notes = [
        "rank 0 gathers one tensor at a time and writes; its extra peak is the model once plus about one tensor",
        "command: MALLOC_MMAP_THRESHOLD_=65536 torchrun --standalone --nproc_per_node=2 -m benchmarks.bench_distributed OUT",
    ]
    return Table(title, [row], notes)


def _async_loop(workdir: str, *, reps: int, quick: bool) -> tuple[Table, dict[str, Any]]:
    """benchmarks/bench_async_loop.py: added wall time of saving every N steps in an AdamW loop."""
    from benchmarks import bench_async_loop

    loop_dir = os.path.join(workdir, "loop")
    os.makedirs(loop_dir, exist_ok=True)
    rows, notes = bench_async_loop.run(loop_dir, quick=quick, reps=reps)
    return Table(bench_async_loop.TITLE, rows, notes), {str(r["method"]): r for r in rows}


STALL_METHODS = (
    "savepoint sync",
    "savepoint async",
    "savepoint async sharded_model",
    "DCP async_save process",
)


def _stall_ranks(workdir: str, *, quick: bool) -> Table:
    """benchmarks/bench_stall_ranks.py under torchrun at 1 and 2 ranks: how long save() blocks, against
    DCP's async_save (thread mode), for DDP and FSDP2."""
    title = "Stall of save() at 1 and 2 ranks against DCP async_save (CPU, gloo)"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    rows: list[dict[str, object]] = []
    for ranks in (1, 2):
        out = os.path.join(workdir, f"stall-{ranks}")
        cmd = [
            torchrun,
            "--standalone",
            f"--nproc_per_node={ranks}",
            "-m",
            "benchmarks.bench_stall_ranks",
            out,
        ]
        cmd += ["--quick", "--reps", "1"] if quick else []
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        measured = [json.loads(li) for li in done.stdout.splitlines() if li.startswith("{")]
        if done.returncode or not measured:
            return Table(
                title,
                notes=[f"failed at {ranks} rank(s) (exit {done.returncode}): {done.stderr.strip()[-300:]}"],
            )
        for model in dict.fromkeys(m["model"] for m in measured):
            stall = {m["method"]: m["stall_s"] for m in measured if m["model"] == model}
            anchor = stall["DCP async_save thread"]
            row: dict[str, object] = {"ranks": ranks, "model": model}
            row["state MB (all ranks)"] = next(m["state_MB"] for m in measured if m["model"] == model)
            row["DCP async_save thread (s)"] = round(anchor, 3)
            for method in STALL_METHODS:  # one column order for every row; "-" where a method does not apply
                seconds = stall.get(method)
                row[f"{method} / DCP thread"] = "-" if seconds is None else round(seconds / anchor, 2)
            rows.append(row)
    notes = [
        "the stall is the time until the call returns (savepoint: `save()`; DCP: `get_state_dict` + "
        "`async_save`), the slowest rank's per save, median of 3 saves after one warm-up save per method; "
        "one AdamW step between saves, every save finished before the next; methods interleaved",
        "a ~25M-parameter Llama (fp32 weights + AdamW moments); DDP replicates that state on every rank, "
        "FSDP2 (`fully_shard` per layer) splits it. `savepoint async` on FSDP2 copies each rank's shards "
        "and gathers the weights to rank 0 in the background write (an HF directory); `sharded_model` "
        "keeps them as DCP shards, as DCP does; `savepoint sync` gathers and writes inside save()",
        "command: OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=N -m benchmarks.bench_stall_ranks OUT",
    ]
    return Table(title, rows, notes)


def _writer_cpu(workdir: str, *, quick: bool) -> Table:
    """benchmarks/bench_writer_cpu.py: the async writers' CPU per save, by phase, against a memcpy."""
    from benchmarks import bench_writer_cpu

    size = {"width": 256, "layers": 2, "reps": 1} if quick else {"width": 1536, "layers": 4, "reps": 5}
    rows, notes = bench_writer_cpu.run(os.path.join(workdir, "writer-cpu"), **size)
    return Table(bench_writer_cpu.TITLE, rows, notes)


def _commit_scale(*, quick: bool) -> Table:
    """benchmarks/bench_commit_scale.py: rank 0's commit from W synthetic reports, no processes."""
    from benchmarks import bench_commit_scale

    worlds = (1_000,) if quick else (1_000, 10_000)
    title = "Distributed commit at scale (synthetic reports, rank 0 alone)"
    rows = bench_commit_scale.run(worlds)
    return Table(title, rows, bench_commit_scale.notes(rows))


def _commit_read_bytes(workdir: str) -> Table:
    """benchmarks/commit_read_bytes.py under torchrun (4 ranks, FSDP2, gloo): rank 0's reads during save()."""
    out = os.path.join(workdir, "read-bytes")
    os.makedirs(out, exist_ok=True)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=4", "-m", "benchmarks.commit_read_bytes", out]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    title = "Distributed commit: rank 0's reads during a real 4-rank save()"
    path = os.path.join(out, "read_bytes.json")
    if done.returncode or not os.path.exists(path):
        return Table(title, notes=[f"failed (exit {done.returncode}): {done.stderr.strip()[-300:]}"])
    with open(path) as f:
        got = json.load(f)
    row = {
        "ranks": got["world"],
        "rank 0 read (B)": f"{got['rank0_read']:,}",
        "rank 0's own files (B)": f"{got['rank0_own_bytes']:,}",
        "other ranks' files (B)": f"{got['others_bytes']:,}",
        "read / (own + others)": round(got["rank0_read"] / (got["rank0_own_bytes"] + got["others_bytes"]), 3),
    }
    notes = [
        "tiny Llama under FSDP2 + AdamW, optimizer state as per-rank DCP files; `rchar` of /proc/self/io "
        "(bytes read through syscalls, page cache included) around the second save() on rank 0",
        "rank 0 hashes its own files while writing them and only stats the other ranks' files (each rank "
        "reports path, size and checksum through a gather), so what it reads is config, manifest and library "
        "reads that do not grow with the other ranks' state. With the code before commit eae6854, rank 0 "
        "hashed every file it had not written: 802,930 B read against 437,782 B of its own and 581,119 B of "
        "the others' files in the same set-up",
        "command: OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=4 -m benchmarks.commit_read_bytes OUT",
    ]
    return Table(title, [row], notes)


def _restore_read_bytes(workdir: str) -> Table:
    """Bytes read by one restore, in one process and per rank of a 2-rank torchrun job, against what it needs."""
    out = os.path.join(workdir, "restore-reads")
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    title = "Restore: bytes read, each byte once"
    one = subprocess.run(
        [sys.executable, "-m", "benchmarks.restore_read_bytes", os.path.join(out, "one")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    worker = os.path.join("tests", "distributed", "worker_restore_reads.py")
    two = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", worker, os.path.join(out, "two")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [li for li in one.stdout.splitlines() if li.startswith("{")]
    rank_files = [os.path.join(out, "two", f"rank-{r}.json") for r in (0, 1)]
    if one.returncode or two.returncode or not lines or not all(map(os.path.exists, rank_files)):
        failed = one if one.returncode or not lines else two
        return Table(title, notes=[f"failed (exit {failed.returncode}): {failed.stderr.strip()[-300:]}"])
    single = json.loads(lines[-1])
    rows: list[dict[str, object]] = [
        {
            "restore": "1 process: tiny Llama + AdamW + scheduler",
            "needs (B)": f"{single['checkpoint_bytes']:,}",
            "read (B)": f"{single['read_bytes']:,}",
            "read / needs": single["ratio"],
        }
    ]
    for r, path in enumerate(rank_files):
        with open(path) as f:
            got = json.load(f)
        rows.append(
            {
                "restore": f"2 ranks, FSDP2 sharded_model=True, rank {r} (own shard)",
                "needs (B)": f"{got['own_shard']:,}",
                "read (B)": f"{got['read']:,}",
                "read / needs": round(got["read"] / got["own_shard"], 2),
            }
        )
        if r == 0:
            needs = got["full_weights"] + got["full_own_shard"]
            rows.append(
                {
                    "restore": "2 ranks, from full weight files + own AdamW shard, rank 0",
                    "needs (B)": f"{needs:,}",
                    "read (B)": f"{got['full']:,}",
                    "read / needs": round(got["full"] / needs, 2),
                }
            )
            rows.append(
                {
                    "restore": "2 ranks, an older checkpoint without item checksums, rank 0",
                    "needs (B)": f"{got['own_shard']:,}",
                    "read (B)": f"{got['old']:,}",
                    "read / needs": round(got["old"] / got["own_shard"], 2),
                }
            )
    notes = [
        "`rchar` of /proc/self/io (bytes read through syscalls, page cache included) around one restore, after "
        "a warm-up restore; each file is checked in the read that decodes it, DCP items against checksums "
        "recorded per item at save. Before that (commit 3e8b277: verify every file, then read) the same runs "
        "read 62.7 MB (3.0x) in one process and 8.35 MB (5.2x own shard) per rank",
        "not read once yet: FSDP1 from full weight files (torch fills its flat shards as the files stream in, so "
        "they are verified first) and DeepSpeed engine checkpoints (each file verified by one rank, so damage is "
        "voted on before DeepSpeed reads them)",
        "commands: python -m benchmarks.restore_read_bytes OUT; "
        "torchrun --standalone --nproc_per_node=2 tests/distributed/worker_restore_reads.py OUT",
    ]
    return Table(title, rows, notes)


def _targets(stats: dict[str, Any]) -> Table:
    m, s, a, r, d = stats["model"], stats["state"], stats["async"], stats["restore"], stats["dedupe"]
    sp_model, sp_state = m["savepoint.save_pretrained"], s["savepoint CheckpointManager.save"]
    rows = [
        _target(
            "save_pretrained no slower than save_file+fsync", sp_model / m["safetensors save_file+fsync"], 1.0
        ),
        _target("training-state save no slower than DCP", sp_state / s["DCP save"], 1.0),
        _target("training-state save clearly faster than torch.save", sp_state / s["torch.save+fsync"], 0.9),
        _target("restore ≤ 1.1× DCP load (warm)", r.get("warm_ratio", float("nan")), 1.1),
        _target("restore ≤ 1.1× DCP load (cold)", r.get("cold_ratio", float("nan")), 1.1),
        _target("async stall ≤ 0.1 of a sync save", a["stall"] / sp_state, 0.1),
        _target(
            "restore from the memory tier ≥ 5× a cold disk restore",
            stats["tier"]["speedup_vs_cold"],
            5.0,
            low=True,
        ),
        _target(
            "sync save ≥ 0.85 of raw write+fsync bandwidth (model)",
            m["raw write+fsync"] / sp_model,
            0.85,
            low=True,
        ),
        _target(
            "sync save ≥ 0.85 of raw write+fsync bandwidth (train state)",
            s["raw write+fsync"] / sp_state,
            0.85,
            low=True,
        ),
        _target("second save of a half-frozen model writes ~half", d["save2_fraction"], 0.55),
    ]
    loop = stats.get("loop", {}).get("savepoint async process")
    if loop is not None:  # the end-to-end loop (bench_async_loop): the two bounds
        rows.append(
            _target("async loop: added wall ≤ 0.3× a sync save's", float(loop["added / sync's added"]), 0.3)
        )
        rows.append(
            _target(
                "async loop: cost per save ≤ 1.5× a memcpy of the state",
                float(loop["per save / memcpy"]),
                1.5,
            )
        )
    return Table("Targets", rows, ["ratios of medians; see the tables below for spreads"])


def _target(name: str, value: float, bound: float, *, low: bool = False) -> dict[str, object]:
    met = value >= bound if low else value <= bound
    return {
        "target": name,
        "measured": round(value, 3),
        "bound": f"{'≥' if low else '≤'} {bound}",
        "met": "yes" if met else "NO",
    }


def _environment(argv: list[str] | None, started: float, load_before: tuple[float, ...], reps: int) -> str:
    cmd = "python -m benchmarks.run" + (
        "" if not (argv or sys.argv[1:]) else " " + shlex.join(argv or sys.argv[1:])
    )
    commit = subprocess.run(
        ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import transformers

    return "\n".join(
        [
            "# savepoint benchmarks",
            "",
            f"Produced by `{cmd}` (what `make bench` runs) on {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, "
            f"commit {commit or '?'} plus the working tree.",
            "",
            f"- machine: {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.platform()}; no GPU used",
            f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
            f"- {reps} alternating repetitions per method, medians reported; load average at start "
            f"{load_before[0]:.1f}, at end {os.getloadavg()[0]:.1f} (a shared machine: other jobs ran too)",
            "- every save is timed until durable: libraries that do not fsync get an fsync of their files in the timing",
            "",
        ]
    )


def _plot(tables: list[Table], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(7 * len(tables), 4.5))
    for ax, table in zip(axes, tables, strict=True):
        names = [str(r["method"]) for r in table.rows]
        ax.barh(
            names,
            [float(r["GB/s"]) for r in table.rows],  # type: ignore[arg-type]
            color=["C0" if "savepoint" in n else "C7" for n in names],
        )
        ax.invert_yaxis()
        ax.set_xlabel("GB/s until durable (median)")
        ax.set_title(table.title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
