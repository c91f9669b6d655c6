"""Every snippet of README.md runs, each in a fresh process, with tiny stand-ins for the
objects the snippet assumes (`model`, `tokenizer`, datasets)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import savepoint

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "README.md"
SNIPPET = re.compile(r"<!-- snippet: (\w+) -->\n```(python|bash)\n(.*?)```", re.S)

MODEL = """
import torch
from savepoint.demo import tiny
torch.manual_seed(0)
model = tiny.tiny_llama(seed=0)
rows = torch.randint(3, 500, (8, 16), generator=torch.Generator().manual_seed(1))
"""
DATASETS = """
class Rows(torch.utils.data.Dataset):
    def __len__(self): return len(rows)
    def __getitem__(self, i): return {"input_ids": rows[i], "labels": rows[i]}
train_ds, eval_ds = Rows(), Rows()
"""
DROPOUT = """
model = tiny.tiny_llama(seed=0, attention_dropout=0.2).train()  # resumes exactly only if the RNG does
"""
# Dies by SIGKILL right after the step $SNIPPET_DIE_AT (its save, if any, done): a crash.
DIE_AT = """
import os, signal
from savepoint.integrations.accelerate import AcceleratorCheckpointer
if "SNIPPET_DIE_AT" in os.environ:
    _maybe_save = AcceleratorCheckpointer.maybe_save
    def maybe_save_then_die(self, step, **kwargs):
        saved = _maybe_save(self, step, **kwargs)
        if step == int(os.environ["SNIPPET_DIE_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return saved
    AcceleratorCheckpointer.maybe_save = maybe_save_then_die
"""
LOOP = """
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
loader = torch.utils.data.DataLoader(rows, batch_size=2, shuffle=True)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2)
"""
S3 = """
import fsspec
fsspec.filesystem("s3").mkdir("my-bucket")
"""
PLOT_RUN = """
import savepoint
with savepoint.CheckpointManager("runs/exp1") as mgr:
    for step, loss in [(1, 2.0), (2, 1.0), (3, 1.5)]:
        mgr.save(step, model=model, metrics={"eval_loss": loss})
"""
SETUP = {
    "trainer": MODEL + DATASETS,
    "accelerate": MODEL + DROPOUT + LOOP + DIE_AT,
    "rl": MODEL,
    "s3": MODEL + S3,
    "plot": MODEL + PLOT_RUN,
}
# What each snippet must have left behind: a check that could fail.
CHECK = {
    "trainer": (
        "import savepoint; assert savepoint.CheckpointManager('runs/exp1').latest_step == 4; savepoint.verify('runs/exp1');"
        "assert trainer.state.best_model_checkpoint.endswith(f'step-{callback.manager.best_step:08d}')"
    ),
    "accelerate": "import savepoint; assert savepoint.CheckpointManager('runs/acc').latest_step == 12",
    "rl": "assert (mgr.best_step, mgr.latest_step) == (3, 3) and abs(kl.value - 0.1 * 1.01**3) < 1e-12",
    "s3": "assert [c.step for c in mgr.checkpoints] == [100]",
    "plot": "import os; assert os.path.getsize('eval_loss.png') > 1000",
}


def environment() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=f"{REPO / 'src'}{os.pathsep}{REPO}", PYTHONWARNINGS="ignore")


def snippets() -> dict[str, tuple[str, str]]:
    return {name: (lang, code) for name, lang, code in SNIPPET.findall(DOC.read_text())}


def test_every_section_has_a_tested_snippet() -> None:
    assert set(snippets()) == set(SETUP) == set(CHECK)


@pytest.mark.parametrize("name", sorted(SETUP))
def test_snippet_runs(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    lang, code = snippets()[name]
    env = environment()
    if name == "s3":
        env.update(request.getfixturevalue("s3_env"))
    if lang == "python":
        program = SETUP[name] + "\n" + code + "\n" + CHECK[name] + "\n"
        done = subprocess.run(
            [sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, timeout=600
        )
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        return
    setup = subprocess.run(
        [sys.executable, "-c", SETUP[name]], cwd=tmp_path, env=env, capture_output=True, timeout=600
    )
    assert setup.returncode == 0, setup.stderr.decode()[-3000:]
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(["bash", "-euc", code], cwd=tmp_path, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()[-3000:]
    check = subprocess.run([sys.executable, "-c", CHECK[name]], cwd=tmp_path, env=env, capture_output=True)
    assert check.returncode == 0, check.stderr.decode()[-3000:]


def test_accelerate_snippet_resumes_exactly_after_a_kill(tmp_path: Path) -> None:
    """The README's Accelerate loop, as printed, SIGKILLed after it saved the last batch of an epoch
    (8 rows, batch 2: 4 steps per epoch) and started again, ends with the weights of the run never
    stopped (dropout on, plain shuffled loader). Mid-epoch kills: tests/integrations/test_accelerate.py."""
    _, code = snippets()["accelerate"]
    program = SETUP["accelerate"] + "\n" + code + "\n"
    for run, die_at in [("ref", None), ("run", 5), ("run", None)]:
        (tmp_path / run).mkdir(exist_ok=True)
        env = environment() | ({"SNIPPET_DIE_AT": str(die_at)} if die_at else {})
        done = subprocess.run(
            [sys.executable, "-c", program], cwd=tmp_path / run, env=env, capture_output=True, timeout=600
        )
        assert done.returncode == (-signal.SIGKILL if die_at else 0), done.stderr.decode()[-3000:]
        if die_at:
            assert savepoint.CheckpointManager(tmp_path / run / "runs/acc").latest_step == die_at - 1

    for step in (10, 12):
        ours = load_file(tmp_path / f"run/runs/acc/step-{step:08d}/model.safetensors")
        theirs = load_file(tmp_path / f"ref/runs/acc/step-{step:08d}/model.safetensors")
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), (
            f"step {step} differs from the uninterrupted run"
        )
