"""Names of a run's output files, so that no command overwrites another's work.

Meshes and turntables are named by the checkpoint step they come from and by the settings that differ from
the run's defaults: ``mesh/mesh-step0001500.glb`` (what `train` wrote at its end), ``mesh/mesh-step0001500-res128
.glb`` (`export --resolution 128` later), ``video/turntable-step0001500-12f-64px.mp4`` (`video --frames 12
--resolution 64`). The same command with the same settings on the same checkpoint would write the same name: it
stops instead, unless given --force (common/targets.py); `--out PATH` writes exactly PATH, on the same terms.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

STEP_DIGITS = 7


def output_name(kind: str, step: int, tags: Sequence[str] = (), suffix: str = "") -> str:
    """'<kind>-step<step>[-<tag>...]<suffix>', e.g. output_name('turntable', 1500, ['12f', '64px'], '.mp4') ->
    'turntable-step0001500-12f-64px.mp4'. Tags are made file-name safe (letters, digits, '.', '_')."""
    safe = [re.sub(r"[^A-Za-z0-9._]+", "_", str(tag)).strip("_") for tag in tags if str(tag)]
    return "-".join([f"{kind}-step{step:0{STEP_DIGITS}d}", *[t for t in safe if t]]) + suffix


_NAME = re.compile(r"^(?P<kind>[a-z]+)-step(?P<step>\d+)(?P<tags>(-[^.]+)*)\.(?P<suffix>\w+)$")


def newest_output(folder: Path, kind: str, suffix: str) -> Optional[Path]:
    """The ``kind`` file with ``suffix`` (e.g. 'glb') in ``folder`` from the latest step, the untagged one
    (default settings) before tagged ones of that step; None if there is none."""
    candidates = []
    for path in Path(folder).glob(f"{kind}-step*.{suffix}") if Path(folder).is_dir() else []:
        match = _NAME.match(path.name)
        if match and match["kind"] == kind:
            candidates.append((-int(match["step"]), bool(match["tags"]), path.name, path))
    return min(candidates)[3] if candidates else None
