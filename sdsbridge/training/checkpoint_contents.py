"""What a checkpoint file may hold, checked before anything in it is used: the payload's shape (``check_payload``:
nesting, tensor kinds, integer sizes), its checksum (``payload_checksum``), its entries and their types
(``check_structure``), and the line for a file whose pickle ``weights_only`` refused (``unpickling_refused``).

The file is untrusted: every check raises a one-line UserError naming the entry, never a traceback.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch

from sdsbridge.common.errors import UserError

FORMAT = "sdsbridge-checkpoint-v1"
CHECKSUM = "checksum"

SCENE_KEYS = ("field", "background", "renderer")
RESUME_KEYS = ("optimizer", "rng")
"""Entries ``--resume`` needs besides the scene's (export, video and eval read the scene and config only)."""


MAX_DEPTH = 32
"""Deepest nesting of dicts and lists a checkpoint may hold (sdsbridge writes 4: optimizer state)."""


def check_payload(tree: Any, where: str = "", depth: int = 0) -> None:
    """UserError naming the first entry (``'field.encoding.params'``) that no sdsbridge checkpoint holds: nesting
    deeper than MAX_DEPTH (a hostile file's 5,000-deep list would end the checksum's walk in a RecursionError), or
    a tensor that is not plain data: sparse or another layout, without data (meta), quantized, or with overlapping
    elements (a broadcast view that a copy would blow up to its full size)."""
    if depth > MAX_DEPTH:
        raise UserError(f"'{where.split('[')[0]}' nests deeper than {MAX_DEPTH} levels")
    if isinstance(tree, dict):
        for key, value in tree.items():
            check_payload(value, f"{where}.{key}" if where else str(key), depth + 1)
    elif isinstance(tree, (list, tuple)):
        for index, item in enumerate(tree):
            check_payload(item, f"{where}[{index}]", depth + 1)
    elif isinstance(tree, int) and tree.bit_length() > 64:
        raise UserError(f"'{where}' is an integer of {tree.bit_length()} bits")
    elif isinstance(tree, torch.Tensor):
        if tree.layout != torch.strided:
            kind = "sparse" if tree.is_sparse or "sparse" in str(tree.layout) else str(tree.layout)
            raise UserError(f"'{where}' is a {kind} tensor; checkpoints hold dense tensors")
        if tree.is_meta:
            raise UserError(f"'{where}' is a tensor without data (meta)")
        if tree.is_quantized:
            raise UserError(f"'{where}' is a quantized tensor; checkpoints hold plain tensors")
        if tree.numel() * tree.element_size() > tree.untyped_storage().nbytes():
            raise UserError(f"'{where}' is a tensor whose elements overlap (a broadcast view of "
                            f"{tree.untyped_storage().nbytes()} bytes shaped {list(tree.shape)})")


def _hash_tree(tree: Any, digest: "hashlib._Hash") -> None:
    """Feed a checkpoint (sub)tree that ``check_payload`` accepted into ``digest`` in a fixed order: dict keys
    sorted, tensors as dtype, shape and raw bytes, other leaves as repr. Lists and tuples hash alike (pickling may
    turn one into the other)."""
    if isinstance(tree, dict):
        digest.update(b"{")
        for key in sorted(tree, key=repr):
            digest.update(repr(key).encode() + b":")
            _hash_tree(tree[key], digest)
        digest.update(b"}")
    elif isinstance(tree, (list, tuple)):
        digest.update(b"[")
        for item in tree:
            _hash_tree(item, digest)
        digest.update(b"]")
    elif isinstance(tree, torch.Tensor):
        t = tree.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    else:
        digest.update(f"{type(tree).__name__}={tree!r};".encode())


def payload_checksum(checkpoint: dict[str, Any]) -> str:
    """SHA-256 (hex) of every entry but ``checksum``."""
    digest = hashlib.sha256()
    _hash_tree({k: v for k, v in checkpoint.items() if k != CHECKSUM}, digest)
    return digest.hexdigest()


def _check_type(checkpoint: dict, key: str, kind: type, path: Path) -> None:
    if key not in checkpoint:
        raise UserError(f"{path}: not a complete sdsbridge checkpoint: '{key}' is missing")
    value = checkpoint[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserError(f"{path}: damaged checkpoint: '{key}' is a {type(value).__name__}, expected a "
                        f"{kind.__name__}")


def check_structure(checkpoint: dict, path: Path, for_resume: bool = False) -> None:
    """UserError naming the first entry that is missing or of the wrong type (``for_resume``: the
    optimizer and RNG entries too)."""
    _check_type(checkpoint, "step", int, path)
    if checkpoint["step"] < 0:
        raise UserError(f"{path}: damaged checkpoint: 'step' is negative ({checkpoint['step']})")
    for key in ("config", *SCENE_KEYS, *(RESUME_KEYS if for_resume else ())):
        _check_type(checkpoint, key, dict, path)
    if "bad_steps" in checkpoint:
        _check_type(checkpoint, "bad_steps", int, path)
        # + 1: a divergence's checkpoint counts the step it stopped at, which a resume does again
        if not 0 <= checkpoint["bad_steps"] <= checkpoint["step"] + 1:
            raise UserError(f"{path}: damaged checkpoint: 'bad_steps' is {checkpoint['bad_steps']}, expected 0 to "
                            f"'step' + 1 ({checkpoint['step'] + 1})")
    if not for_resume:
        return
    optimizer, rng = checkpoint["optimizer"], checkpoint["rng"]
    if not (isinstance(optimizer.get("state"), dict) and isinstance(optimizer.get("param_groups"), list)):
        raise UserError(f"{path}: damaged checkpoint: 'optimizer' lacks its state or param_groups")
    numpy_state, python_state = rng.get("numpy"), rng.get("python")
    if not (isinstance(rng.get("torch"), torch.Tensor) and isinstance(numpy_state, dict)
            and isinstance(numpy_state.get("keys"), torch.Tensor) and isinstance(python_state, dict)
            and isinstance(python_state.get("state"), (list, tuple))):
        raise UserError(f"{path}: damaged checkpoint: 'rng' lacks the torch, numpy or python generator state")


_REFUSED_GLOBAL = re.compile(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL)\s+([\w.]+)")


def unpickling_refused(path: Path, message: str) -> str:
    """The one line for a file whose pickle ``weights_only`` refused: the callable or class it would have
    loaded, instead of torch's advice to load it without ``weights_only`` (which would run it)."""
    found = _REFUSED_GLOBAL.search(message)
    if found is None:
        parts = [part for part in message.split("\n\n") if part.strip()
                 and not part.lstrip().startswith(("Weights only load failed", "Check the documentation"))]
        reason = " ".join(" ".join(parts or [message]).split())[:160]
        return f"{path}: not a readable sdsbridge checkpoint (corrupt or foreign file: {reason})"
    return (f"{path}: refused: loading it would call {found.group(1)}, and checkpoints hold only tensors and plain "
            "values (nothing in it was run)")
