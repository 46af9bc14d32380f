"""``python -m pointvl.cli ...``: the same as the ``pointvl`` command."""

from pointvl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
