"""``python -m knhk``: the knhk command (see :mod:`knhk.cli`)."""

from knhk.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
