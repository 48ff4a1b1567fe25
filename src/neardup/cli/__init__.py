"""Top layer, the `neardup` command: parse options, call one library function, print the result.

Library modules are imported inside the commands, so `neardup --help` loads neither numpy, h5py, FAISS nor
TensorFlow. The commands live in `indexing`, `searching` and `serving`; importing them registers them on `app`.
"""
from __future__ import annotations

import sys

from . import indexing, review, searching, serving  # noqa: F401 - importing a command module registers its commands
from .base import _quiet_stdout, app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # outside a command (see handled): the same quiet stop
        _quiet_stdout()
        sys.exit(128 + 13)


if __name__ == "__main__":
    main()
