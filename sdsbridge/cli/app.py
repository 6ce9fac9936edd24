"""The typer app every command registers on, its root options, and ``main``: UserErrors and signals to one
line and an exit code."""

from __future__ import annotations

import errno
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

from sdsbridge.common.checks import shorten
from sdsbridge.common.errors import EXIT_INTERRUPTED, EXIT_WRITE_FAILED, Interrupted, UserError
from sdsbridge.common.quiet import configure_logging


def _flags_without_type(option_class) -> None:
    """Show boolean flags in help as `--flag/--no-flag` alone, not followed by typer's `<bool>` type column (the
    flag takes no value). A presentation detail of typer's help; skipped if typer changes that method."""
    shown_type = getattr(option_class, "display_type_rich", None)
    if shown_type is None:
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else shown_type(self, ctx)

    option_class.display_type_rich = display_type_rich


try:
    from typer.core import TyperOption

    _flags_without_type(TyperOption)
except ImportError:  # another typer layout: its default help stays
    pass

app = typer.Typer(
    help="Text-to-3D by calibrated score distillation (SDS-Bridge) from a diffusion prior.\n\n"
    "Start with `sdsbridge train configs/demo.yaml` (CPU demo, minutes) or write a prompt.yaml with one line, "
    "`prompt: a DSLR photo of a pineapple`, and run `sdsbridge train prompt.yaml`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show or check a resolved configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

OVERRIDES_HELP = "key=value overrides, e.g. train.steps=2000 guidance.guidance_scale=50 (applied last)."
IMAGE_OVERRIDES_HELP = "key=value overrides, e.g. image.steps=500 image.guidance_scale=30 method=sds (applied last)."


def _print_version(value: bool) -> None:
    if value:
        from sdsbridge import __version__

        typer.echo(f"sdsbridge {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
         version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Text-to-3D by calibrated score distillation."""
    configure_logging(debug)  # ours at INFO; other libraries' chatter off the terminal (quiet.py)


def split_file_and_overrides(file: Optional[str], overrides: Optional[List[str]]) -> tuple[Optional[Path], list[str]]:
    """`train --resume RUN key=value` puts the first override where FILE would be: move it back."""
    overrides = list(overrides or [])
    if file is not None and "=" in file and not Path(file).exists():
        return None, [file, *overrides]
    return (Path(file) if file is not None else None), overrides


WRITE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EDQUOT, errno.EFBIG)
"""OS errors that mean 'this machine refused a write' (exit code 3) where no writer translated them."""


MAX_MESSAGE_CHARS = 2000
"""Longest error line printed; the messages cut the values they quote (``checks.shown``) long before this."""


def optional_port(args: list[str], option: str, default: int) -> list[str]:
    """``--view`` takes an optional port (``train FILE --view``, ``--view 9000``): click options cannot leave out
    their value, so a bare ``--view`` (last, or before anything that is not a number) becomes ``--view=<default>``."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg == option and (i + 1 == len(out) or not out[i + 1].isdigit()):
            out[i] = f"{option}={default}"
    return out


def _raise_interrupted(signum, _frame) -> None:
    raise Interrupted(signum)


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: runs the typer app; a UserError becomes one line and its exit code, SIGINT /
    SIGTERM one line and exit code 130 (errors.py lists the codes)."""
    from sdsbridge.view import DEFAULT_PORT

    args = optional_port(list(sys.argv[1:] if argv is None else argv), "--view", DEFAULT_PORT)
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        app(args=args, prog_name="sdsbridge", standalone_mode=True)
    except UserError as exc:
        if "--debug" in args:
            raise
        typer.echo(f"error: {shorten(str(exc), MAX_MESSAGE_CHARS)}", err=True)  # always one line, and a bounded one
        for hint in getattr(exc, "hints", ()):
            typer.echo(f"  - {shorten(hint, MAX_MESSAGE_CHARS)}", err=True)
        sys.exit(exc.exit_code)
    except Interrupted as exc:
        typer.echo(f"interrupted ({signal.Signals(exc.signum).name}): stopped; no partially written file was kept",
                   err=True)
        sys.exit(EXIT_INTERRUPTED)
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS or "--debug" in args:
            raise
        from sdsbridge.common.atomic import describe_os_error

        typer.echo(f"error: {describe_os_error(exc)}: {exc.filename or 'a file'}", err=True)
        sys.exit(EXIT_WRITE_FAILED)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

