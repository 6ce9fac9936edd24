"""`sdsbridge view RUN`, and the checks of the viewer's options that `train --view` shares with it. viser (the
optional `view` extra) is imported only once a viewer is asked for."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import typer

from sdsbridge.cli.app import app
from sdsbridge.common.errors import Interrupted, UserError
from sdsbridge.view import DEFAULT_PORT

VIEW_INSTALL = 'pip install "sdsbridge[view]"'


def view_settings_from_options(port: Optional[int], host: Optional[str], port_option: str):
    """``ViewSettings`` for ``port`` / ``host`` (None: no viewer asked for). UserError, before anything is written,
    naming the option: a port outside 0-65535, a host this machine cannot listen on, --view-host without
    --view, viser not installed."""
    if port is None:
        if host is not None:
            raise UserError(f"--view-host: only with {port_option} (it says where the viewer listens)")
        return None
    if not 0 <= port <= 65535:
        raise UserError(f"{port_option}: {port} is not a port number (0-65535; 0: any free port)")
    if importlib.util.find_spec("viser") is None:
        raise UserError(f"{port_option}: the live viewer needs viser, which is not installed",
                        hints=(f"install it with `{VIEW_INSTALL}`",))
    from sdsbridge.view.viewer import LOCAL_HOST, ViewSettings, check_host

    host = LOCAL_HOST if host is None else host
    check_host(host)
    return ViewSettings(host=host, port=port)


@app.command()
def view(
    run: Path = typer.Argument(..., help="A run directory (its newest checkpoint, followed while it trains) or a "
                                         ".ckpt file."),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="Port of the page (the next free one if taken; 0: any)."),
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on (default 127.0.0.1: this "
                                       "machine only)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
) -> None:
    """Look at a run in the browser: a live 3D viewer of its newest checkpoint (rgb, depth, opacity, normals) on
    localhost:PORT, reloaded when the run writes a newer one. Serves until Ctrl-C."""
    settings = view_settings_from_options(port, host, "--port")
    from sdsbridge.common.devices import resolve_device
    from sdsbridge.view.follow import view_run

    try:
        view_run(run, settings, resolve_device(device))
    except Interrupted:
        typer.echo("viewer stopped")
