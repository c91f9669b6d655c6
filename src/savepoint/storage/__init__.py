"""Where checkpoint bytes live. `local` commits directories atomically on a POSIX file system."""

from savepoint.storage.local import (
    MANIFEST_NAME,
    StagedDir,
    delete_checkpoint_dir,
    fsync_dir,
    sweep_stale,
)

__all__ = ["MANIFEST_NAME", "StagedDir", "delete_checkpoint_dir", "fsync_dir", "sweep_stale"]
