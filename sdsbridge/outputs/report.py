"""The report page: one self-contained HTML file to look at one run, or several side by side.

Per run (a column): the prompt, method and step; an interactive 3D view of the newest ``mesh/mesh-step*.glb`` (Google's
``<model-viewer>``, vendored in ``assets/viewer/``: orbit with the mouse); the turntable videos of ``video/``;
the validation grids of ``validation/`` as a timeline (a slider over the steps); the plots of ``plots/``
(written here from ``metrics.jsonl`` when missing); the resolved config. Everything is embedded (the viewer as
an inline module script, the mesh, videos and images as base64 ``data:`` URIs), so the page fetches nothing.
Only the run's own regular files of the expected type and size are read (report_files.py); any other is named in
a one-line note instead.

Known limit, headless only: under Chromium's ``--virtual-time-budget`` with ``--dump-dom``, a *textured* mesh
stops at 88% of its load (the texture's image decode does not finish in virtual time), so its ``load`` event is
not seen there; screenshots draw it, and the browser test uses the vertex-coloured mesh of ``train``.

The page records what a browser made of it, for the browser test and for anyone debugging: ``<body>`` gets
``data-models-loaded`` (model-viewer ``load`` events), each viewer ``data-rect`` (its page position in CSS
pixels: left,top,width,height) and each video ``data-duration`` once its metadata
loads; errors (uncaught, ``console.error``, model-viewer ``error`` events, media errors) are appended to
``<pre id="page-errors">``.
"""

from __future__ import annotations

import base64
import html
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sdsbridge.common.atomic import atomic_write_bytes
from sdsbridge.common.errors import UserError
from sdsbridge.common.package_files import package_folder
from sdsbridge.outputs.export.video import DEFAULT_MODES, MODES
from sdsbridge.outputs.naming import newest_output
from sdsbridge.outputs.report_files import Embedder, inside, read_run_file, refusal
from sdsbridge.config.loader import config_from_dict
from sdsbridge.config.schema import Config
from sdsbridge.training.plots import PLOTS, TITLES, read_metrics, stage2_step, write_plots
from sdsbridge.common.safe_yaml import load_yaml

logger = logging.getLogger("sdsbridge")

VIEWER_VERSION = "4.4.0"
"""@google/model-viewer version in assets/viewer/ (assets/viewer/README.txt says where it comes from)."""


@dataclass
class RunPage:
    """What the report shows of one run (paths that exist; ``None`` / empty where the run has none)."""

    run_dir: Path
    prompt: str
    method: str
    config_text: str
    step: Optional[int]
    mesh: Optional[Path]
    videos: list[Path] = field(default_factory=list)
    validation: list[Path] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    video_modes: list[str] = field(default_factory=lambda: list(DEFAULT_MODES))
    """The run's ``export.video_modes``: the panels of a turntable whose name does not say otherwise."""
    truth: Optional[bytes] = None
    """PNG of the true shape at the validation views (rgb, one row per view): reference-prior runs only."""
    truth_shape: str = ""
    notes: list[str] = field(default_factory=list)
    """Files of the run left unread (report_files.py), one line each."""


def video_panels(video: Path, default: list[str]) -> list[str]:
    """The panels of a turntable: its name's panel tag ('rgb_depth', written when they differ from the run's
    ``export.video_modes``), else ``default``."""
    for tag in video.stem.split("-")[2:]:
        parts = tag.split("_")
        if parts and all(part in MODES for part in parts):
            return parts
    return list(default)


def viewer_script() -> str:
    """The vendored model-viewer ES module (installed: sdsbridge/assets/viewer, checkout: assets/viewer)."""
    return (package_folder("assets") / "viewer" / "model-viewer.min.js").read_text(encoding="utf-8")


def collect_run(run_dir: Path) -> RunPage:
    """The files of a run directory the report shows; UserError when ``run_dir`` is not a run (no config.yaml).
    Plots are written first when the run has metrics but no plots/."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not (config_path.is_file() or config_path.is_symlink()):
        raise UserError(f"report: {run_dir} is not a run directory (no config.yaml)")
    data, why = read_run_file(config_path, run_dir, "config")
    if data is None:
        raise UserError(f"report: {config_path}: {why}")
    try:
        config_text = data.decode("utf-8")
        config = load_yaml(config_text) or {}  # bounded: a hostile file fails in one line
    except UnicodeDecodeError:
        raise UserError(f"report: {config_path}: not a UTF-8 text file") from None
    except UserError as exc:
        raise UserError(f"report: {config_path}: {exc}") from None
    if not isinstance(config, dict):
        raise UserError(f"report: {config_path}: expected a mapping of settings")
    metrics, notes = run_dir / "metrics.jsonl", []
    why = refusal(metrics, run_dir, "metrics") if metrics.exists() or metrics.is_symlink() else ""
    if why:
        notes.append(f"{metrics}: not read: {why}")
        logger.warning("report: %s", notes[-1])
    rows = read_metrics(metrics) if not why else []
    plots = [run_dir / "plots" / f"{name}.png" for name in PLOTS]
    resolved = _resolved(config)
    if rows and not all(p.is_file() for p in plots) and inside(run_dir / "plots", run_dir):
        write_plots(run_dir, stage2_step(resolved) if resolved is not None else None)
    mesh = newest_output(run_dir / "mesh", "mesh", "glb")
    return RunPage(
        run_dir=run_dir, prompt=str(config.get("prompt", "")), method=str(config.get("method", "")),
        config_text=config_text, step=rows[-1]["step"] if rows else None,
        mesh=mesh,
        videos=sorted((run_dir / "video").glob("*.mp4")) if (run_dir / "video").is_dir() else [],
        validation=sorted((run_dir / "validation").glob("step-*.png")) if (run_dir / "validation").is_dir() else [],
        plots=[p for p in plots if p.is_file() or p.is_symlink()], video_modes=_video_modes(config), notes=notes,
        **_ground_truth(resolved))


def _resolved(config: dict) -> Optional[Config]:
    """A run's config.yaml as read, resolved (None when it does not load: the plots then mark no stage switch and
    the page shows no ground truth)."""
    try:
        return config_from_dict(config)
    except UserError:
        return None


def _ground_truth(resolved: Optional[Config]) -> dict:
    """``{"truth": PNG bytes, "truth_shape": name}`` of a reference-prior run: the true shape rendered at the
    validation grid's views and size (rgb, one row per view); {} for any other run or a config that did not load."""
    if resolved is None or resolved.prior.kind != "reference":
        return {}
    import imageio.v3 as iio

    from sdsbridge.outputs.scores import reference_views, shape_for_prompt
    from sdsbridge.scene.cameras import orbit_cameras

    try:
        shape = shape_for_prompt(resolved.prompt)
    except UserError:
        return {}
    cameras = orbit_cameras(resolved.cameras, resolved.log.val_views)
    rgb, _ = reference_views(shape, cameras, resolved.log.val_resolution)
    column = (rgb.permute(0, 2, 3, 1).reshape(-1, rgb.shape[-1], 3).clamp(0, 1) * 255 + 0.5).byte().numpy()
    return {"truth": iio.imwrite("<bytes>", column, extension=".png"), "truth_shape": shape}


def _video_modes(config: dict) -> list[str]:
    """``export.video_modes`` of a run's config.yaml as read (the default panels where it says none)."""
    modes = (config.get("export") or {}).get("video_modes") if isinstance(config.get("export"), dict) else None
    return [str(m) for m in modes] if isinstance(modes, list) and modes else list(DEFAULT_MODES)


VALIDATION_COLUMNS = "rgb | opacity | depth"
"""The columns of a validation grid (``training/loop.py``'s ``save_validation``)."""


def _truth_figure(page: RunPage) -> str:
    """The ground-truth column beside the validation grid (HTML; empty without a truth)."""
    if page.truth is None:
        return ""
    uri = "data:image/png;base64," + base64.b64encode(page.truth).decode("ascii")
    return (f'<figure><img class="truth" src="{uri}" alt="the true {html.escape(page.truth_shape)}">'
            f'<figcaption>ground truth: the true {html.escape(page.truth_shape)}, same views</figcaption></figure>')


def _run_column(page: RunPage, index: int, embed: Embedder) -> str:
    """One run's column of the page (HTML); files ``embed`` leaves out are listed at its end."""
    esc = html.escape
    noted = len(embed.notes)

    def embedded(paths: list[Path], kind: str) -> list[tuple[Path, str]]:
        """(path, data URI) of those of ``paths`` that may be embedded."""
        return [(path, uri) for path in paths if (uri := embed.uri(path, page.run_dir, kind)) is not None]

    parts = [f'<section class="run"><h2>{esc(page.prompt) or "(no prompt)"}</h2>',
             f'<p class="meta">{esc(page.method)} · {esc(page.run_dir.name)}'
             + (f" · step {page.step}" if page.step is not None else "") + "</p>", "<h3>Mesh</h3>"]
    for mesh, mesh_uri in embedded([page.mesh] if page.mesh is not None else [], "mesh"):
        parts.append(f'<figure><model-viewer id="model-{index}" class="model" '
                     f'src="{mesh_uri}" camera-controls auto-rotate interaction-prompt="none" '
                     f'shadow-intensity="0.6" exposure="1.0" alt="3D mesh of {esc(page.prompt)}"></model-viewer>'
                     f'<figcaption>{esc(mesh.name)}: drag to turn, scroll to zoom</figcaption></figure>')
    if page.mesh is None:
        parts.append(f'<p class="missing">no mesh/*.glb (make one: <code>sdsbridge export {esc(str(page.run_dir))}'
                     "</code>)</p>")
    parts.append("<h3>Turntable</h3>")
    for video, video_uri in embedded(page.videos, "video"):
        parts.append(f'<figure><video class="turntable" src="{video_uri}" controls autoplay loop '
                     f'muted playsinline title="{esc(video.name)}"></video><figcaption>{esc(video.name)}: '
                     f'{esc(" | ".join(video_panels(video, page.video_modes)))}, left to right</figcaption></figure>')
    if not page.videos:
        parts.append(f'<p class="missing">no video/*.mp4 (make one: <code>sdsbridge video '
                     f'{esc(str(page.run_dir))}</code>)</p>')
    validation = embedded(page.validation, "image")
    if validation:
        frames = "".join(f'<img class="val" data-step="{esc(p.stem.removeprefix("step-").lstrip("0") or "0")}" '
                         f'src="{u}"{"" if i == len(validation) - 1 else " hidden"}>' for i, (p, u) in enumerate(validation))
        last = len(validation) - 1
        parts.append(f'<h3>Validation <span class="val-step"></span></h3><input type="range" class="timeline" '
                     f'min="0" max="{last}" value="{last}" step="1" aria-label="training step">'
                     f'<div class="side"><figure><div class="frames">{frames}</div><figcaption>{VALIDATION_COLUMNS}, '
                     'one row per evaluation view</figcaption></figure>' + _truth_figure(page) + '</div>')
    plots = embedded(page.plots, "image")
    if plots:
        parts.append("<h3>Training curves</h3>" + "".join(
            f'<img class="plot" alt="{esc(TITLES[p.stem])}" src="{u}">' for p, u in plots))
    parts.extend(f'<p class="missing note">{esc(note)}</p>' for note in page.notes + embed.notes[noted:])
    parts.append(f"<details><summary>Resolved config</summary><pre>{esc(page.config_text)}</pre></details></section>")
    return "\n".join(parts)


STYLE = """
body{font-family:system-ui,sans-serif;margin:16px;background:#fafafa;color:#222}
.runs{display:grid;grid-template-columns:repeat(var(--columns),minmax(320px,1fr));gap:16px}
.run{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px;min-width:0}
h1{font-size:20px;margin:0 0 12px} h2{font-size:17px;margin:0} h3{font-size:14px;margin:14px 0 6px}
.meta{color:#666;margin:4px 0} .missing{color:#a33}
.model{width:100%;height:360px;background:#eef0f3;border-radius:4px}
video,.plot{width:100%;display:block;margin-bottom:6px}
.val{display:block;max-width:100%;max-height:480px;margin:0 auto 6px}
.val[hidden]{display:none}
figure{margin:0 0 8px} figcaption{color:#555;font-size:12px;margin-top:2px}
.side{display:flex;gap:12px;justify-content:center;align-items:flex-start} .truth{display:block;max-height:480px}
.timeline{width:100%} pre{font-size:11px;overflow:auto;max-height:400px;background:#f4f4f4;padding:8px}
#page-errors{color:#a00;white-space:pre-wrap} #page-errors:empty{display:none}
"""

RECORDER = """
const early = [];  // errors before the page-errors element exists
const record = (what) => {
  const errors = document.getElementById('page-errors');
  if (errors === null) { early.push(String(what)); return; }
  errors.textContent += early.splice(0).map((e) => e + '\\n').join('') + String(what) + '\\n';
};
window.addEventListener('error', (e) => record('error: ' + (e.message || e.type)));
window.addEventListener('unhandledrejection', (e) => record('unhandled rejection: ' + e.reason));
const consoleError = console.error.bind(console);
console.error = (...args) => { record('console.error: ' + args.join(' ')); consoleError(...args); };
window.recordPageError = record;
"""

BEHAVIOUR = """
const record = window.recordPageError;
document.body.dataset.modelsLoaded = '0';
for (const viewer of document.querySelectorAll('model-viewer')) {
  const loaded = () => {
    const box = viewer.getBoundingClientRect();  // where a screenshot shows it (the browser test crops there)
    viewer.dataset.rect = [box.left, box.top + window.scrollY, box.width, box.height].map(Math.round).join(',');
    document.body.dataset.modelsLoaded = String(Number(document.body.dataset.modelsLoaded) + 1); };
  viewer.addEventListener('load', loaded);
  if (viewer.loaded) loaded();  // loaded before this module ran (a failed load shows in console.error, recorded)
  viewer.addEventListener('error', (e) => record('model-viewer error: ' + JSON.stringify(e.detail || {})));
}
for (const video of document.querySelectorAll('video')) {
  const noteDuration = () => { video.dataset.duration = String(video.duration); };
  video.addEventListener('loadedmetadata', noteDuration);
  if (video.readyState >= 1) noteDuration();  // loaded before this script ran
  video.addEventListener('error', () => record('video error: ' + (video.error && video.error.code)));
  if (video.error) record('video error: ' + video.error.code);
}
for (const run of document.querySelectorAll('.run')) {
  const slider = run.querySelector('.timeline');
  if (!slider) continue;
  const frames = run.querySelectorAll('.val'), label = run.querySelector('.val-step');
  const show = () => { frames.forEach((f, i) => { f.hidden = i !== Number(slider.value); });
    label.textContent = '(step ' + frames[Number(slider.value)].dataset.step + '; drag to move through training)'; };
  slider.addEventListener('input', show);
  show();
}
"""


def report_html(pages: list[RunPage]) -> str:
    """The whole page for one or more runs (side by side)."""
    title = " vs ".join(f"{p.method}: {p.prompt}" for p in pages)
    embed = Embedder()  # one budget for the whole page
    columns = "\n".join(_run_column(page, i, embed) for i, page in enumerate(pages))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style>'
            f"<script>{RECORDER}</script></head>\n"
            f'<body><h1>sdsbridge report: {html.escape(title)}</h1><pre id="page-errors"></pre>'
            f'<div class="runs" style="--columns:{len(pages)}">\n{columns}\n</div>\n'
            f"<!-- @google/model-viewer {VIEWER_VERSION} (Apache-2.0; bundles three.js, MIT, and lit, BSD-3-Clause) -->\n"
            f'<script type="module">{viewer_script()}</script>\n<script type="module">{BEHAVIOUR}</script>'
            "</body></html>\n")


def default_report_path(runs: list[Path]) -> Path:
    """RUN/report.html for one run; beside the first run, compare-<names>.html, for several."""
    if len(runs) == 1:
        return Path(runs[0]) / "report.html"
    names = "-vs-".join(Path(r).name for r in runs)[:120]
    return Path(runs[0]).parent / f"compare-{names}.html"


def write_report(runs: list[Path], out: Optional[Path] = None) -> Path:
    """Write the report page of ``runs`` (run directories) to ``out`` (default ``default_report_path``),
    atomically. Returns the path."""
    if not runs:
        raise UserError("report: give at least one run directory")
    pages = [collect_run(Path(run)) for run in runs]
    path = Path(out) if out is not None else default_report_path([Path(r) for r in runs])
    atomic_write_bytes(path, report_html(pages).encode("utf-8"))
    logger.info("report: %d run(s), %.1f MB -> %s", len(pages), path.stat().st_size / 1e6, path)
    return path
