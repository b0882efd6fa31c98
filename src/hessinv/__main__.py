"""``python -m hessinv``: the ``hessinv`` command line, the same entry point as the console script."""

from hessinv.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
