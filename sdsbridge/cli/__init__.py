"""The `sdsbridge` command line (typer). Heavy imports (torch, diffusers) happen inside commands.

Every error a user or the machine causes is a UserError (or a subclass, errors.py): printed as one line on
stderr with its exit code (2 bad input, 1 failed, 3 could not write), no traceback unless --debug.
SIGINT and SIGTERM stop every command the same way: the file being written is abandoned (no temporary
file stays), one line is printed, exit code 130; `train` first finishes its step and checkpoints.

Modules: app.py (the typer app, error handling, ``main``), run_commands.py (config, train), output_commands.py
(export, video, report, eval), view_command.py (view, and the viewer options `train --view` shares),
more_commands.py (image, sweep, doctor). Importing this package registers
every command on ``app``.
"""

from sdsbridge.cli import run_commands, output_commands, view_command, more_commands  # noqa: F401, I001  (register, in help order)
from sdsbridge.cli.app import app, main

__all__ = ["app", "main"]
