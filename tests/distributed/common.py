"""Shared by the distributed tests and the worker scripts they run under torchrun.

Workers are started as real processes (`torchrun --nproc_per_node=2`, gloo on CPU); each writes what
it observed (reference tensors, losses) into its output directory for the test to check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=f"{REPO / 'src'}{os.pathsep}{REPO}",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONWARNINGS="ignore",
        TORCH_CPP_LOG_LEVEL="ERROR",
        **extra,
    )
    return env


def torchrun(
    script: str, *args: str, nproc: int = 2, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run `tests/distributed/<script>` under `torchrun --standalone --nproc_per_node=<nproc>`."""
    cmd = [
        TORCHRUN,
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(REPO / "tests" / "distributed" / script),
        *args,
    ]
    proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"
        )
    return proc


def token_data(n: int = 64, seq: int = 16, vocab: int = 512) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1234)
    return torch.utils.data.TensorDataset(torch.randint(3, vocab, (n, seq), generator=g))


def flat_reference(model_state: dict[str, torch.Tensor], optim_state: dict) -> dict[str, torch.Tensor]:
    """Full weights and optimizer moments as one flat dict: `model/<name>`, `optim/<param>/<key>`."""
    out = {f"model/{k}": v.detach().clone().contiguous() for k, v in model_state.items()}
    for fqn, entry in optim_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                out[f"optim/{fqn}/{key}"] = value.detach().clone().reshape(value.shape).contiguous()
    return out


def plain_reference(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The same flat dict from a plain (unsharded) model and optimizer, keyed by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    optim = {"state": {names[id(p)]: s for p, s in optimizer.state.items()}}
    return flat_reference(model.state_dict(), optim)


def assert_same(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], *, where: str) -> None:
    missing = sorted(expected.keys() - actual.keys())
    assert not missing, f"{where}: missing {missing[:5]}"
    for key, value in expected.items():
        assert torch.equal(value, actual[key].to(value.dtype)), f"{where}: {key} differs"


def write_json(path: str | os.PathLike[str], doc: object) -> None:
    Path(path).write_text(json.dumps(doc))


def gather_results(out: str, mine: object) -> None:
    """Every rank's `mine`, gathered into OUT/result.json by rank 0 (for the test to read); then a barrier."""
    import torch.distributed as dist

    results: list = [None] * dist.get_world_size()
    dist.all_gather_object(results, mine)
    if dist.get_rank() == 0:
        write_json(f"{out}/result.json", results)
    dist.barrier()
