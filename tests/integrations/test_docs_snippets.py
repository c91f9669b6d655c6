"""Every snippet of README.md runs, each in a fresh process, with tiny stand-ins for the
objects the snippet assumes (`model`, `tokenizer`, datasets)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    "accelerate": MODEL + LOOP,
    "rl": MODEL,
    "s3": MODEL + S3,
    "plot": MODEL + PLOT_RUN,
}
# What each snippet must have left behind: a check that could fail.
CHECK = {
    "trainer": "import savepoint; assert savepoint.CheckpointManager('runs/exp1').latest_step == 4; savepoint.verify('runs/exp1')",
    "accelerate": "import savepoint; assert savepoint.CheckpointManager('runs/acc').latest_step == 4",
    "rl": "assert (mgr.best_step, mgr.latest_step) == (3, 3) and abs(kl.value - 0.1 * 1.01**3) < 1e-12",
    "s3": "assert [c.step for c in mgr.checkpoints] == [100]",
    "plot": "import os; assert os.path.getsize('eval_loss.png') > 1000",
}


def snippets() -> dict[str, tuple[str, str]]:
    return {name: (lang, code) for name, lang, code in SNIPPET.findall(DOC.read_text())}


def test_every_section_has_a_tested_snippet() -> None:
    assert set(snippets()) == set(SETUP) == set(CHECK)


@pytest.mark.parametrize("name", sorted(SETUP))
def test_snippet_runs(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    lang, code = snippets()[name]
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'src'}{os.pathsep}{REPO}", PYTHONWARNINGS="ignore")
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
