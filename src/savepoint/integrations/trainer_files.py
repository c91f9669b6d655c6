"""What a Hugging Face `Trainer` reads from a checkpoint directory, checked before it reads anything.

Given `resume_from_checkpoint=DIR`, the Trainer opens files by name: `optimizer.pt`, `scheduler.pt`,
`scaler.pt`, `rng_state*.pth`, `pytorch_model.bin` (torch pickles), and `trainer_state.json`,
`config.json` and the weights. savepoint writes none of those pickles, so one in a savepoint
checkpoint was planted; listed or not (whoever planted it may have rewritten the manifest), it is
refused, as is any file the manifest does not list, before the directory is handed to the Trainer.
"""

from __future__ import annotations

import os

from savepoint.errors import Problem
from savepoint.manifest import find_problems

# Suffixes of the files the Trainer (and torch.load-based loaders around it) unpickle.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def resume_problems(ckpt_dir: str) -> list[Problem]:
    """Every reason not to hand `ckpt_dir` to `Trainer.train(resume_from_checkpoint=...)` (empty: none)."""
    problems = find_problems(ckpt_dir, check_unlisted=True)
    try:
        names = sorted(os.listdir(ckpt_dir))
    except OSError:
        return problems
    seen = {p.path for p in problems}
    problems += [
        Problem(name, "a pickle the Trainer would torch.load; savepoint never writes one (planted)")
        for name in names
        if name.lower().endswith(PICKLE_SUFFIXES) and name not in seen
    ]
    return problems
