"""A trlx-style PPO loop on a tiny model, checkpointed through savepoint and resumable exactly.

What trlx keeps between steps, and where it goes in a savepoint checkpoint:

    policy (a causal LM)                 model=            an HF model directory, loadable as is
    value head + its optimizer           stateful=         safetensors + JSON
    policy optimizer, LR schedule        optimizer=, scheduler=
    adaptive KL controller               stateful=         (its coefficient moves every step)
    running reward statistics            stateful=         (mean/std/count used to scale rewards)
    prompt loader position, RNG          stateful=, and the RNG savepoint always saves
    frozen reference model               nothing: it is the initial policy, rebuilt from its source

Checkpoints are saved every `checkpoint_interval` steps with the mean reward as a metric; the best
by reward is never deleted (`best_metric="reward", best_mode="max", keep_best=1`).

    python examples/ppo_trlx_style.py --root runs/ppo --steps 12
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchdata.stateful_dataloader import StatefulDataLoader

import savepoint
from savepoint.demo import tiny

GOOD_TOKEN = 42  # the toy reward: how often the policy says this token


@dataclass(kw_only=True)
class Config:
    steps: int = 12
    checkpoint_interval: int = 3
    seed: int = 0
    prompts: int = 16
    batch_size: int = 4
    prompt_len: int = 4
    gen_len: int = 6
    lr: float = 3e-3
    init_kl_coef: float = 0.1
    kl_target: float = 0.05
    kl_horizon: int = 100
    cliprange: float = 0.2
    vf_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95


class AdaptiveKLController:
    """trlx's adaptive KL coefficient (Ziegler et al. 2019): state that changes every step."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


class RunningMoments:
    """trlx's running mean/std of rewards, used to scale them."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, xs: torch.Tensor) -> None:
        n, mean, var = xs.numel(), xs.mean().item(), xs.var(unbiased=False).item()
        delta, total = mean - self.mean, self.count + n
        self.var = (self.var * self.count + var * n + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.var * self.count / max(self.count - 1, 1))

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


@dataclass
class Run:
    policy: Any
    value_head: torch.nn.Linear
    reference: Any
    optimizer: torch.optim.Optimizer
    value_optimizer: torch.optim.Optimizer
    scheduler: Any
    kl: AdaptiveKLController
    reward_stats: RunningMoments
    prompts: StatefulDataLoader


def build(cfg: Config) -> Run:
    torch.manual_seed(cfg.seed)
    policy = tiny.tiny_llama(seed=cfg.seed, attention_dropout=0.1).train()
    reference = tiny.tiny_llama(seed=cfg.seed).eval().requires_grad_(False)  # frozen copy of the start
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed + 1)
        value_head = torch.nn.Linear(policy.config.hidden_size, 1)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.1, 1 - s / cfg.steps))
    prompts = torch.randint(
        3, 500, (cfg.prompts, cfg.prompt_len), generator=torch.Generator().manual_seed(cfg.seed)
    )
    loader = StatefulDataLoader(
        prompts,
        batch_size=cfg.batch_size,
        shuffle=True,  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return Run(
        policy,
        value_head,
        reference,
        optimizer,
        torch.optim.AdamW(value_head.parameters(), lr=cfg.lr),
        scheduler,
        AdaptiveKLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon),
        RunningMoments(),
        loader,
    )


def checkpoint_state(run: Run) -> dict[str, Any]:
    """Everything the loop needs to go on exactly; no pickles, only tensors and JSON."""
    return {
        "model": run.policy,
        "optimizer": run.optimizer,
        "scheduler": run.scheduler,
        "stateful": {
            "value_head": run.value_head,
            "value_optimizer": run.value_optimizer,
            "kl_controller": run.kl,
            "reward_stats": run.reward_stats,
            "prompts": run.prompts,
        },
    }


def logprobs_and_values(
    run: Run, model: Any, seq: torch.Tensor, start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(input_ids=seq, output_hidden_states=True)
    logp = (
        torch.log_softmax(out.logits[:, start - 1 : -1], dim=-1).gather(-1, seq[:, start:, None]).squeeze(-1)
    )
    values = run.value_head(out.hidden_states[-1][:, start - 1 : -1]).squeeze(-1)
    return logp, values


@torch.no_grad()
def rollout(run: Run, prompts: torch.Tensor, cfg: Config) -> torch.Tensor:
    seq = prompts
    for _ in range(cfg.gen_len):  # sampling draws from the global RNG: savepoint restores it
        logits = run.policy(input_ids=seq).logits[:, -1]
        seq = torch.cat([seq, torch.multinomial(torch.softmax(logits, -1), 1)], dim=1)
    return seq


def ppo_step(run: Run, prompts: torch.Tensor, cfg: Config) -> dict[str, float]:
    seq = rollout(run, prompts, cfg)
    start = prompts.shape[1]
    score = (seq[:, start:] == GOOD_TOKEN).float().sum(-1) + seq[:, start:].float().mean(-1) / 500
    run.reward_stats.update(score)
    scaled = score / run.reward_stats.std
    with torch.no_grad():
        old_logp, old_values = logprobs_and_values(run, run.policy, seq, start)
        ref_logp = torch.log_softmax(run.reference(input_ids=seq).logits[:, start - 1 : -1], -1)
        ref_logp = ref_logp.gather(-1, seq[:, start:, None]).squeeze(-1)
        kl = old_logp - ref_logp
        rewards = -run.kl.value * kl
        rewards[:, -1] += scaled
        advantages, last = torch.zeros_like(rewards), torch.zeros(len(seq))
        for t in reversed(range(rewards.shape[1])):  # GAE
            next_value = old_values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros(len(seq))
            delta = rewards[:, t] + cfg.gamma * next_value - old_values[:, t]
            last = delta + cfg.gamma * cfg.lam * last
            advantages[:, t] = last
        returns = advantages + old_values
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    logp, values = logprobs_and_values(run, run.policy, seq, start)
    ratio = torch.exp(logp - old_logp)
    pg_loss = torch.max(
        -advantages * ratio, -advantages * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange)
    ).mean()
    loss = pg_loss + cfg.vf_coef * F.mse_loss(values, returns)
    loss.backward()
    for opt in (run.optimizer, run.value_optimizer):
        opt.step()
        opt.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.kl.update(kl.sum(-1).mean().item(), n_steps=len(seq))
    return {
        "reward": score.mean().item(),
        "loss": loss.item(),
        "kl": kl.sum(-1).mean().item(),
        "kl_coef": run.kl.value,
    }


def train(root: str, cfg: Config, *, stop_at: int | None = None, log: Any = print) -> Run:
    """Train to `cfg.steps`, resuming from `root`; `stop_at` raises after that step (a crash, for tests)."""
    torch.set_num_threads(1)
    run = build(cfg)
    with savepoint.CheckpointManager(
        root, keep_last=2, best_metric="reward", best_mode="max", keep_best=1
    ) as mgr:
        step = mgr.restore(**checkpoint_state(run)).step
        while step < cfg.steps:
            for prompts in run.prompts:
                step += 1
                stats = ppo_step(run, prompts, cfg)
                log(json.dumps({"step": step, **stats}))
                if step % cfg.checkpoint_interval == 0 or step == cfg.steps:
                    mgr.save(step, **checkpoint_state(run), metrics={"reward": stats["reward"]})
                if step == stop_at:
                    raise KeyboardInterrupt(f"stopped at step {step}")
                if step == cfg.steps:
                    break
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--steps", type=int, default=Config.steps)
    parser.add_argument("--checkpoint-interval", type=int, default=Config.checkpoint_interval)
    args = parser.parse_args()
    train(args.root, Config(steps=args.steps, checkpoint_interval=args.checkpoint_interval))


if __name__ == "__main__":
    main()
