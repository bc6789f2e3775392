"""`python -m fastbackup`: see `fastbackup.cli`."""

from fastbackup.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
