"""The live viewer: a viser page on localhost that renders the scene from the browser's camera while a run trains
(``train --view``) or from a run's newest checkpoint (``sdsbridge view RUN``).

Modules: cameras.py (viser's camera <-> ours), frames.py (one viewer frame: rgb | depth | opacity | normal),
pacing.py (the time budget and the frame size that rises when the camera rests), panel.py (the GUI: status,
controls, validation grid, training cameras), viewer.py (the server, its pages and the training hook), follow.py
(``sdsbridge view``: a run's newest checkpoint). Only those commands import the modules: viser is an optional
dependency (``pip install "sdsbridge[view]"``); this file imports nothing, so the command line can read the default.
"""

DEFAULT_PORT = 8080
"""The port ``--view`` and ``sdsbridge view`` use when none is given (viser's default)."""
