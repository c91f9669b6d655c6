"""A HALOs-style online iterative alignment loop (DPO or KTO, with LoRA) checkpointed through savepoint.

Each round trains a fresh LoRA adapter on top of the previous round's policy, against that policy as
the frozen reference, and saves at every evaluation (adapter, tokenizer, optimizer, scheduler, data
position, and `metrics.json`). The round's final save merges the adapter (`final=True` writes
`merged/`, a plain transformers model directory), and the next round loads exactly that:

    ROOT/round-1/step-00000004/merged/     -> base and reference of round 2
    ROOT/round-2/...

A run killed anywhere resumes exactly: inside a round from the round's latest checkpoint, and
across rounds from the previous round's final one. The best checkpoint of each round by reward
margin is never deleted.

    python examples/dpo_halos_style.py --root runs/dpo --rounds 2 --steps-per-round 4 --loss kto
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

import savepoint
from savepoint.demo import tiny


@dataclass(kw_only=True)
class Config:
    rounds: int = 2
    steps_per_round: int = 4
    eval_every: int = 2
    loss: str = "dpo"  # or "kto"
    beta: float = 0.1
    lr: float = 5e-3
    pairs: int = 16
    batch_size: int = 4
    prompt_len: int = 4
    answer_len: int = 6
    seed: int = 0


def preference_pairs(cfg: Config, round_: int) -> torch.Tensor:
    """(pairs, 2, len) token ids: a prompt + a 'chosen' answer (counting up) and a 'rejected' one (random).

    Online alignment would sample these from the current policy; each round here gets fresh data.
    """
    g = torch.Generator().manual_seed(cfg.seed * 100 + round_)
    prompt = torch.randint(3, 500, (cfg.pairs, 1, cfg.prompt_len), generator=g).expand(-1, 2, -1)
    chosen = (prompt[:, :1, -1:] + torch.arange(1, cfg.answer_len + 1)) % 497 + 3
    rejected = torch.randint(3, 500, (cfg.pairs, 1, cfg.answer_len), generator=g)
    return torch.cat([prompt, torch.cat([chosen, rejected], dim=1)], dim=2)


def sequence_logp(model: Any, seqs: torch.Tensor, cfg: Config) -> torch.Tensor:
    logits = model(input_ids=seqs).logits[:, cfg.prompt_len - 1 : -1]
    return torch.log_softmax(logits, -1).gather(-1, seqs[:, cfg.prompt_len :, None]).squeeze(-1).sum(-1)


def halo_loss(
    policy: Any, reference: Any, batch: torch.Tensor, cfg: Config
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and the implicit reward margins (chosen - rejected), for DPO or a simple KTO."""
    seqs = batch.reshape(-1, batch.shape[-1])
    with torch.no_grad():
        ref = sequence_logp(reference, seqs, cfg).view(-1, 2)
    rewards = cfg.beta * (sequence_logp(policy, seqs, cfg).view(-1, 2) - ref)
    margin = rewards[:, 0] - rewards[:, 1]
    if cfg.loss == "dpo":
        return -F.logsigmoid(margin).mean(), margin.detach()
    z_ref = rewards.detach().mean().clamp(min=0)  # KTO's reference point
    loss = (1 - torch.sigmoid(rewards[:, 0] - z_ref)).mean() + (
        1 - torch.sigmoid(z_ref - rewards[:, 1])
    ).mean()
    return loss, margin.detach()


def round_base(root: str, round_: int) -> Any:
    """Round 1 starts from the tiny base model; round r from round r-1's merged final checkpoint."""
    if round_ == 1:
        return tiny.tiny_llama(seed=0, attention_dropout=0.1)
    previous = savepoint.CheckpointManager(os.path.join(root, f"round-{round_ - 1}"))
    final = previous.checkpoints[-1].path  # the final save: the latest is never deleted
    savepoint.verify(final)
    return AutoModelForCausalLM.from_pretrained(os.path.join(final, "merged"))


def run_round(root: str, round_: int, cfg: Config, tokenizer: Any, *, stop_at: int | None, log: Any) -> None:
    torch.manual_seed(cfg.seed + round_)
    base = round_base(root, round_)
    reference = round_base(root, round_).eval().requires_grad_(False)
    policy = get_peft_model(
        base.train(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    )
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, cfg.steps_per_round)
    pairs = preference_pairs(cfg, round_)
    loader = StatefulDataLoader(
        pairs[: -cfg.batch_size],
        batch_size=cfg.batch_size,
        shuffle=True,  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(cfg.seed + round_),
    )
    held_out = pairs[-cfg.batch_size :]
    with savepoint.CheckpointManager(
        os.path.join(root, f"round-{round_}"),
        keep_last=1,
        best_metric="eval_reward_margin",
        best_mode="max",
        keep_best=1,
    ) as mgr:
        state = {
            "model": policy,
            "optimizer": optimizer,
            "scheduler": scheduler,
            "stateful": {"data": loader},
        }
        step = mgr.restore(**state).step
        while step < cfg.steps_per_round:
            for batch in loader:
                step += 1
                loss, margin = halo_loss(policy, reference, batch, cfg)
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                log(
                    json.dumps(
                        {"round": round_, "step": step, "loss": loss.item(), "margin": margin.mean().item()}
                    )
                )
                final = step == cfg.steps_per_round
                if step % cfg.eval_every == 0 or final:
                    policy.eval()
                    with torch.no_grad():
                        eval_loss, eval_margin = halo_loss(policy, reference, held_out, cfg)
                    policy.train()
                    metrics = {
                        "eval_loss": eval_loss.item(),
                        "eval_reward_margin": eval_margin.mean().item(),
                        "eval_reward_accuracy": (eval_margin > 0).float().mean().item(),
                    }
                    mgr.save(
                        step,
                        **state,
                        tokenizer=tokenizer,
                        metrics=metrics,
                        extra={"round": round_},
                        final=final,
                    )
                if (round_, step) == stop_at:
                    raise KeyboardInterrupt(f"stopped at round {round_} step {step}")
                if final:
                    break


def train(root: str, cfg: Config, *, stop_at: tuple[int, int] | None = None, log: Any = print) -> None:
    """All rounds; rounds already finished (their final checkpoint exists) are skipped."""
    torch.set_num_threads(1)
    tokenizer = tiny.train_tokenizer(tiny.load_corpus())
    for round_ in range(1, cfg.rounds + 1):
        done = savepoint.CheckpointManager(os.path.join(root, f"round-{round_}")).latest_step
        if done == cfg.steps_per_round:
            continue
        run_round(root, round_, cfg, tokenizer, stop_at=stop_at, log=log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--rounds", type=int, default=Config.rounds)
    parser.add_argument("--steps-per-round", type=int, default=Config.steps_per_round)
    parser.add_argument("--loss", choices=["dpo", "kto"], default=Config.loss)
    args = parser.parse_args()
    train(args.root, Config(rounds=args.rounds, steps_per_round=args.steps_per_round, loss=args.loss))


if __name__ == "__main__":
    main()
