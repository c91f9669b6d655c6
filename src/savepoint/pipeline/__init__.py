"""The save pipeline, at every world size: open the shared temp dir, capture, gather, write (each rank its
own files, hashed while written), report to rank 0, commit. See save.py for the flow."""
