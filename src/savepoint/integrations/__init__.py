"""Drop-in integrations with the training loops people already run.

- `savepoint.integrations.transformers.SavepointCallback`: the HF `Trainer` saves through savepoint.
- `savepoint.integrations.trl`: the state TRL trainers keep outside the Trainer (used by the callback).
- `savepoint.integrations.accelerate.AcceleratorCheckpointer`: objects prepared by `Accelerator`.
- `savepoint.integrations.deepspeed`: DeepSpeed ZeRO engines, used by `CheckpointManager(model=engine)`.

Each module imports its framework lazily, so importing this package needs neither.
"""
