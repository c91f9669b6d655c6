"""Side-by-side benchmarks of savepoint against torch, safetensors, transformers and DCP (`make bench`)."""
