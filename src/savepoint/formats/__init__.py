"""Turning objects into checkpoint files and back: HF model directories, training state, safetensors."""
