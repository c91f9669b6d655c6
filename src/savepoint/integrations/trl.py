"""TRL trainers: the training state they keep outside the `Trainer`'s own, as `stateful=` objects.

`SavepointCallback` detects TRL trainers (any subclass of a class from the `trl` package) and saves
this state with every checkpoint, and restores it on resume; there is nothing to add:

    trainer = DPOTrainer(model=model, ref_model=ref, args=DPOConfig(..., sync_ref_model=True),
                         train_dataset=ds, processing_class=tok, callbacks=[SavepointCallback("runs/dpo")])
    trainer.train(resume_from_checkpoint=True)

What it adds, and why (neither is in TRL's own checkpoints):
- `trl_ref_model`: the reference model's weights when `sync_ref_model=True`. TRL mixes the policy
  into the reference every `ref_model_sync_steps`; a resumed run that rebuilt the reference from the
  initial weights would compute different rewards and losses from then on.
- `trl_num_tokens`: the trainer's count of tokens trained on, logged as `num_tokens`; it would
  otherwise restart from 0 after a resume.

`trainer_state(trainer)` returns these objects for a trainer, for use without the callback
(`CheckpointManager.save(..., stateful=trainer_state(trainer))`). This module does not import trl.
"""

from __future__ import annotations

from typing import Any

import torch

from savepoint.errors import IncompatibleCheckpointError, UnsupportedStateError

REF_MODEL = "trl_ref_model"
NUM_TOKENS = "trl_num_tokens"
STATE_NAMES = (REF_MODEL, NUM_TOKENS)
_TOKEN_COUNTER = "_total_train_tokens"  # TRL's attribute behind the logged `num_tokens`


def is_trl_trainer(trainer: Any) -> bool:
    """Whether `trainer` is (a subclass of) a trainer from the `trl` package."""
    return any(cls.__module__.split(".", 1)[0] == "trl" for cls in type(trainer).__mro__)


def trainer_state(trainer: Any) -> dict[str, Any]:
    """The `stateful=` objects a TRL trainer needs to resume exactly; empty for any other trainer."""
    if not is_trl_trainer(trainer):
        return {}
    out: dict[str, Any] = {}
    ref_model = getattr(trainer, "ref_model", None)
    if getattr(trainer.args, "sync_ref_model", False) and ref_model is not None:
        out[REF_MODEL] = ModuleWeights(ref_model)
    if isinstance(getattr(trainer, _TOKEN_COUNTER, None), int):
        out[NUM_TOKENS] = TokenCounter(trainer)
    return out


class ModuleWeights:
    """A module's parameters and buffers as a `stateful=` object (tensors go to safetensors)."""

    def __init__(self, module: Any) -> None:
        if not isinstance(module, torch.nn.Module):
            raise UnsupportedStateError(
                f"the reference model is a {type(module).__name__}, not a torch module (DeepSpeed or FSDP wrapped?): "
                "savepoint saves a synced reference model only in single-process, unsharded runs"
            )
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.module.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state, strict=True)


class TokenCounter:
    """The number of tokens a TRL trainer has trained on (`num_tokens` in its logs)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, int]:
        return {"num_tokens": int(getattr(self.trainer, _TOKEN_COUNTER))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        value = state.get("num_tokens")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise IncompatibleCheckpointError(
                f"stateful {NUM_TOKENS!r}: expected a non-negative integer, got {value!r}"
            )
        setattr(self.trainer, _TOKEN_COUNTER, value)
