"""The `sdsbridge` command line (typer). Heavy imports (torch, diffusers) happen inside commands.

Every user error is a UserError: printed as one line on stderr, exit code 2, no traceback unless --debug.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

from sdsbridge.errors import UserError

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


@app.callback()
def root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs.")) -> None:
    """Text-to-3D by calibrated score distillation."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s")


@config_app.command("show")
def config_show(
    file: Path = typer.Argument(..., help="A prompt YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Print the fully resolved config (defaults <- method preset <- FILE <- overrides) as YAML."""
    from sdsbridge.config import load_config, to_yaml

    typer.echo(to_yaml(load_config(file, overrides or [])), nl=False)


@config_app.command("check")
def config_check(
    file: Path = typer.Argument(..., help="A prompt YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Validate FILE (and overrides); print OK or the first problem."""
    from sdsbridge.config import load_config

    config = load_config(file, overrides or [])
    typer.echo(f"OK: {file} ({config.method}, {config.prior.kind} prior, {config.train.steps} steps)")


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: runs the typer app, turning UserError into one line + exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        app(args=args, prog_name="sdsbridge", standalone_mode=True)
    except UserError as exc:
        if "--debug" in args:
            raise
        message = " ".join(str(exc).split())  # always one line
        typer.echo(f"error: {message}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
