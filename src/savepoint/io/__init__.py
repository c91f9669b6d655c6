"""The only place savepoint opens files it did not just write: see `files.py`."""
