"""Run under `torchrun --nproc_per_node=2`: DDP, then an Accelerate-prepared model, with savepoint's usual API.

For each, trains a step or two, saves (and exports), restores into a freshly built wrapped model and
checks the weights and AdamW moments came back exactly. Rank 0 writes `ref-<kind>.safetensors` into
OUT (the state at save time) for the test to compare with a 1-rank restore.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tests.distributed.common import assert_same, plain_reference
from torch.nn.parallel import DistributedDataParallel

import savepoint
from savepoint.demo import tiny


def step(model, opt, backward=lambda loss: loss.backward()) -> None:
    ids = torch.randint(3, 512, (2, 12))
    backward(model(input_ids=ids, labels=ids).loss)
    opt.step()
    opt.zero_grad()


def check_roundtrip(kind: str, out: str, build) -> None:
    model, inner, opt, backward = build(seed=0)
    for _ in range(2):
        step(model, opt, backward)
    mgr = savepoint.CheckpointManager(f"{out}/{kind}", dist_timeout=120)
    mgr.save(2, model=model, optimizer=opt)
    savepoint.save_pretrained(model, f"{out}/{kind}-export")
    ref = plain_reference(inner, opt)
    if dist.get_rank() == 0:
        save_file(ref, f"{out}/ref-{kind}.safetensors")
    model, inner, opt, _ = build(seed=1)
    assert mgr.restore(model=model, optimizer=opt).step == 2
    assert_same(ref, plain_reference(inner, opt), where=f"{kind} restored on rank {dist.get_rank()}")


def build_ddp(seed: int):
    inner = tiny.tiny_gpt2(seed=seed).train()  # GPT-2 ties its head to the embeddings
    model = DistributedDataParallel(inner)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, inner, opt, lambda loss: loss.backward()


def build_accelerate(seed: int):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    inner = tiny.tiny_llama(seed=seed).train()
    model, opt = accelerator.prepare(inner, torch.optim.AdamW(inner.parameters(), lr=1e-2))
    return model, accelerator.unwrap_model(model), opt, accelerator.backward


def build_lora_ddp(seed: int):
    from peft import LoraConfig, get_peft_model

    base = tiny.tiny_llama(seed=0)  # the same frozen base on every rank and in every build
    peft_model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    with torch.no_grad():
        torch.manual_seed(seed)
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_()
    model = DistributedDataParallel(peft_model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, peft_model, opt, lambda loss: loss.backward()


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(dist.get_rank())
    check_roundtrip("ddp", out, build_ddp)
    check_roundtrip("accelerate", out, build_accelerate)
    check_roundtrip("lora", out, build_lora_ddp)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
