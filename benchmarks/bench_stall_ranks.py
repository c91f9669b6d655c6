"""How long `save()` blocks the training loop at 1 and 2 ranks, against DCP's `async_save`.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m benchmarks.bench_stall_ranks OUT [--quick] [--reps N]
        [--kinds ddp,fsdp2,fsdp1,deepspeed]

For a replicated model (DDP) and a sharded one (FSDP2, `fully_shard` per layer), each with AdamW state,
every method saves once to warm up (writer threads and processes, host buffers, DCP's staging cache),
then `--reps` times. The stall is the time until the call returns, taken on every rank; the slowest
rank's stall counts for each save (a collective save holds every rank that long) and the median over
the timed saves is reported. Between saves each method finishes its save in flight and the ranks meet
at a barrier, so the write of one save never overlaps the next stall. Methods, interleaved per repetition:

    savepoint sync                      CheckpointManager(...).save()
    savepoint async                     async_save=True (FSDP2: shards copied, gathered to rank 0 in the background write)
    savepoint async sharded_model       FSDP2 only: async_save=True, sharded_model=True (no gather)
                                        (FSDP1, `--kinds fsdp1`: both, plus `savepoint sync sharded_model`)
    DCP async_save thread / process     dcp.async_save(get_state_dict(model, opt)), torch's recommended call
                                        (not for FSDP1: torch 2.13's stager cannot copy its ShardedTensors)

`--kinds deepspeed` (not in the default set: DeepSpeed is an optional extra) times a DeepSpeed ZeRO-2
engine (fp32, AdamW, DS_ACCELERATOR=cpu) with savepoint sync and async (`model=engine`) against the
engine's own synchronous `engine.save_checkpoint`; DCP does not save an engine.
Rank 0 prints one JSON line per (model, method).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import savepoint
from benchmarks.common import remove
from savepoint.demo import tiny

# ~25M parameters: fp32 weights + AdamW moments ~ 0.3 GB of state (replicated: on every rank).
FULL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=6)
QUICK = dict(vocab_size=1024, hidden_size=64, intermediate_size=176, num_hidden_layers=2)


def build(
    kind: str, size: dict[str, int]
) -> tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[], None]]:
    inner = tiny.tiny_llama(seed=0, num_attention_heads=8, num_key_value_heads=4, **size).train()
    if kind == "deepspeed":
        return build_engine(inner, size["vocab_size"])
    if kind == "fsdp2":
        for layer in inner.model.layers:
            fully_shard(layer)
        fully_shard(inner)
        model: torch.nn.Module = inner
    elif kind == "fsdp1":
        model = fsdp1_wrap(inner)
    else:
        model = DistributedDataParallel(inner)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        ids = torch.randint(0, size["vocab_size"], (1, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    train_step()  # AdamW state exists
    return model, opt, train_step


def fsdp1_wrap(inner: torch.nn.Module) -> torch.nn.Module:
    """FSDP1 (`FullyShardedDataParallel`), one unit per decoder layer, on the CPU."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    layer_class = type(inner.model.layers[0])
    policy = ModuleWrapPolicy({layer_class})
    return FullyShardedDataParallel(
        inner, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu")
    )


def build_engine(inner: torch.nn.Module, vocab: int) -> tuple[Any, Any, Callable[[], None]]:
    """A DeepSpeed ZeRO-2 engine over `inner`: (engine, its optimizer, one training step)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=inner, model_parameters=inner.parameters(), config=config)

    def train_step() -> None:
        ids = torch.randint(0, vocab, (1, 16))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

    train_step()  # AdamW state exists
    return engine, engine.optimizer, train_step


def state_bytes(model: torch.nn.Module, opt: Any) -> int:
    """This rank's bytes of weights and AdamW moments (its shards under FSDP2; a DeepSpeed engine's
    weights and its optimizer partition, fp32 master weights included)."""
    from torch.distributed.tensor import DTensor

    if hasattr(model, "save_checkpoint"):  # a DeepSpeed engine
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        return weights + sum(t.numel() * t.element_size() for t in tensors_in(opt.state_dict()))

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    tensors = [local(p) for p in model.parameters()]
    tensors += [local(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    return [t for item in items for t in tensors_in(item)]


class Method:
    """One way to save: `save(step)` is what is timed; `finish()` completes it (not timed)."""

    def __init__(self, save: Callable[[int], None], finish: Callable[[], None], close: Callable[[], None]):
        self.save, self.finish, self.close = save, finish, close


def savepoint_method(root: str, model: torch.nn.Module, opt: Any, **options: Any) -> Method:
    mgr = savepoint.CheckpointManager(root, keep_last=1, dist_timeout=600, **options)
    if hasattr(model, "save_checkpoint"):  # a DeepSpeed engine saves its own optimizer
        return Method(lambda step: mgr.save(step, model=model), mgr.wait, mgr.close)
    return Method(lambda step: mgr.save(step, model=model, optimizer=opt), mgr.wait, mgr.close)


def engine_method(root: str, engine: Any) -> Method:
    """DeepSpeed's own synchronous `save_checkpoint`, keeping one checkpoint as the others do."""

    def finish() -> None:
        dist.barrier()
        if dist.get_rank() == 0:
            for name in sorted(n for n in os.listdir(root) if n.startswith("step-"))[:-1]:
                remove(os.path.join(root, name))

    def save(step: int) -> None:
        engine.save_checkpoint(root, tag=f"step-{step:08d}", save_latest=False)

    return Method(save, finish, lambda: None)


def dcp_method(root: str, model: torch.nn.Module, opt: Any, kind: AsyncCheckpointerType) -> Method:
    pending: list[Any] = []

    def save(step: int) -> None:
        model_state, optim_state = get_state_dict(model, opt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pending.append(
                dcp.async_save(
                    {"model": model_state, "optim": optim_state},
                    checkpoint_id=os.path.join(root, f"step-{step}"),
                    async_checkpointer_type=kind,
                )
            )

    def finish() -> None:
        while pending:
            future = pending.pop()
            getattr(future, "upload_completion", future).result()
        dist.barrier()
        if dist.get_rank() == 0:  # keep one checkpoint on disk, as the savepoint methods do
            for name in sorted(os.listdir(root))[:-1] if os.path.isdir(root) else []:
                remove(os.path.join(root, name))

    return Method(save, finish, lambda: None)


def methods_for(kind: str, out: str, model: torch.nn.Module, opt: Any, process: bool) -> dict[str, Method]:
    root = os.path.join(out, kind)
    methods = {
        "savepoint sync": savepoint_method(f"{root}/sp-sync", model, opt),
        "savepoint async": savepoint_method(f"{root}/sp-async", model, opt, async_save=True),
    }
    if kind == "deepspeed":
        return methods | {"DeepSpeed save_checkpoint": engine_method(f"{root}/deepspeed", model)}
    if kind == "fsdp1":
        methods["savepoint sync sharded_model"] = savepoint_method(
            f"{root}/sp-sync-sharded", model, opt, sharded_model=True
        )
    if kind in ("fsdp2", "fsdp1"):
        methods["savepoint async sharded_model"] = savepoint_method(
            f"{root}/sp-async-sharded", model, opt, async_save=True, sharded_model=True
        )
    if kind == "fsdp1":  # DCP's stager asks a ShardedTensor for its data_ptr(), which it refuses
        return methods
    methods["DCP async_save thread"] = dcp_method(
        f"{root}/dcp-thread", model, opt, AsyncCheckpointerType.THREAD
    )
    if process:
        methods["DCP async_save process"] = dcp_method(
            f"{root}/dcp-process", model, opt, AsyncCheckpointerType.PROCESS
        )
    return methods


def measure(methods: dict[str, Method], train_step: Callable[[], None], reps: int) -> dict[str, list[float]]:
    """Every rank's stall per timed save and method; repetition 0 is the warm-up. A training step
    before each save changes the state (no save finds its bytes unchanged)."""
    stalls: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for rep in range(reps + 1):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            method = methods[name]
            train_step()
            dist.barrier()
            started = time.perf_counter()
            method.save(rep + 1)
            stall = time.perf_counter() - started
            method.finish()
            dist.barrier()
            if rep:
                stalls[name].append(stall)
            print(
                f"[bench_stall_ranks] rank {dist.get_rank()} rep {rep} {name}: {stall:.3f} s", file=sys.stderr
            )
    for method in methods.values():
        method.close()
    return stalls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-process", action="store_true", help="skip DCP's process mode")
    parser.add_argument(
        "--kinds", default="ddp,fsdp2", help="models, comma-separated: ddp, fsdp2, fsdp1, deepspeed"
    )
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    size = QUICK if args.quick else FULL
    for kind in args.kinds.split(","):
        model, opt, train_step = build(kind, size)
        nbytes = state_bytes(model, opt)
        stalls = measure(methods_for(kind, args.out, model, opt, not args.no_process), train_step, args.reps)
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, (nbytes, stalls))
        if dist.get_rank() == 0:
            total_mb = sum(b for b, _ in everyone) / 1e6
            for name in stalls:
                per_save = [max(s[name][i] for _, s in everyone) for i in range(args.reps)]
                row = {"ranks": world, "model": kind, "state_MB": round(total_mb), "method": name}
                row |= {"stall_s": statistics.median(per_save), "stalls_s": [round(s, 3) for s in per_save]}
                print(json.dumps(row), flush=True)
        del model, opt, train_step
        remove(os.path.join(args.out, kind))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
