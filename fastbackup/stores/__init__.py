"""Where a backup's bytes go: the `Store` seam and one module per kind.

- `base`: the `Store` seam every caller talks to, and `LocationStore`, the
  store of a location itself, which also holds per-process part files.
- `names`: the names of what a backup location holds.
- `locks`: this process's one registry of the backups it holds locked.
- `local`: a directory on a local or mounted filesystem.
- `object_store`: a prefix in an S3 or GCS bucket.
- `lease`: the lock of a backup in a bucket, and the process identity a
  restarted job checks the holder's against.
- `parts`: one process's part of a multi-process job's checkpoints.
- `location`: `open_store`, which picks the implementation for a location.

Nothing here imports `location`, which imports the implementations, and
the implementations import only `base`, `names`, `locks` and `lease` (`parts` wraps
whichever store it is given). This `__init__` imports nothing, so that a
module of the package is imported without the others.
"""
