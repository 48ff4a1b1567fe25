"""The command line's frame: the typer app, logging, and `handled`, which turns domain errors into one-line
messages and exit codes."""
from __future__ import annotations

import errno
import functools
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import typer

from ..errors import NeardupError
from ..progress import Progress

# rich_markup_mode=None: Rich markup would swallow every "[default: ...]" written in a help text.
app = typer.Typer(
    name="neardup", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    help="Find near-duplicate product photos: index a catalogue, query new photos, list duplicate groups.")

log = logging.getLogger("neardup")

# Options shared by several commands; each mirrors a field of config.DEFAULTS.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _show(text: object) -> str:
    """A file name as one printable line: control characters (a newline in a name) written as escapes."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(text))
def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="neardup: %(message)s", stream=sys.stderr, force=True)
    if verbose < 2:
        logging.getLogger("faiss").setLevel(logging.WARNING)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"neardup: error: {_show(message)}", err=True)  # one line, whatever a file name holds
    return typer.Exit(code)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that no later flush fails on a pipe whose reader has gone."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def handled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn domain errors into one-line messages and exit codes instead of tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _setup_logging(kwargs.get("verbose", 0) or 0)
        try:
            return fn(*args, **kwargs)
        except NeardupError as exc:
            raise _fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            raise _fail("interrupted; an index run resumes from its last checkpoint", 130) from None
        except MemoryError:
            raise _fail("out of memory; try a smaller --batch-size") from None
        except BrokenPipeError:  # `neardup ... | head`: stop quietly, with the status of a process ended by SIGPIPE
            _quiet_stdout()  # (as other Unix tools; not 1, which `query` uses for "no match")
            raise typer.Exit(128 + 13) from None
        except OSError as exc:  # permissions, full disk, a folder where a file was expected...
            where = f"{exc.filename}: " if exc.filename else ""
            hint = ("; free some space and run it again: the store is as it was, and an index run resumes from "
                    "the embeddings it saved") if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            raise _fail(f"{where}{exc.strerror or exc}{hint}") from None

    return wrapper


def _progress(quiet: bool) -> Progress:
    """The progress of a long command (see neardup.progress): a bar on a terminal, lines in a log, or none."""
    return Progress.auto(quiet)
