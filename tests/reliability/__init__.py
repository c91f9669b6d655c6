"""Reliability torture suite: crash points, injected I/O errors, fuzzed readers, hostile inputs."""
