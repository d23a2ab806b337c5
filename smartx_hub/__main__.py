"""``python -m smartx_hub``: the same command line as ``smartx-hub``."""

from smartx_hub.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
