"""``python -m cl_tokens``: the ``cl-tokens`` command line."""

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
