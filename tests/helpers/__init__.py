"""Test helpers: tiny real models, a locally trained tokenizer, small batches of real text."""
