"""LoRA adapters: PEFT-layout I/O, base fingerprints, and the streaming merge into a plain model."""

from savepoint.lora.adapter import describe_adapter
from savepoint.lora.base import fingerprint_dir
from savepoint.lora.export import export_checkpoint
from savepoint.lora.fingerprint import fingerprint_model
from savepoint.lora.merge import merge_into_staged, merge_lora

__all__ = [
    "describe_adapter",
    "export_checkpoint",
    "fingerprint_dir",
    "fingerprint_model",
    "merge_into_staged",
    "merge_lora",
]
