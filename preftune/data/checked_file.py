"""Cache files that are checked before they are used: the content is saved with its own SHA-256.

``save_checked`` writes ``{"digest": ..., "content": obj}`` atomically (``obj``: tensors, lists, dicts and
plain values); ``load_checked`` returns None, with a warning, for a file that cannot be read or whose
content no longer matches its digest (truncated, altered, from an older preftune), so the caller rebuilds it
instead of reading garbage. Loading is ``torch.load(weights_only=True)``: nothing in the file can run code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def content_digest(obj: Any) -> str:
    """SHA-256 of ``obj``'s structure and values (each tensor's dtype, shape and bytes)."""
    h = hashlib.sha256()

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            h.update(f"tensor {value.dtype} {tuple(value.shape)}".encode())
            h.update(memoryview(value.detach().cpu().contiguous().view(torch.uint8).numpy()))
        elif isinstance(value, dict):
            h.update(f"dict {len(value)}".encode())
            for key in sorted(value):
                h.update(json.dumps(key).encode())
                visit(value[key])
        elif isinstance(value, (list, tuple)):
            h.update(f"list {len(value)}".encode())
            for item in value:
                visit(item)
        else:
            h.update(json.dumps(value).encode())

    visit(obj)
    return h.hexdigest()


def save_checked(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save({"digest": content_digest(obj), "content": obj}, tmp)
    os.replace(tmp, path)


def load_checked(path: Path, **load_kwargs: Any) -> Any | None:
    """The object saved at ``path``, or None if there is none or it fails its check (then with a warning)."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True, **load_kwargs)
        if content_digest(saved["content"]) == saved["digest"]:
            return saved["content"]
        why = "its content changed since it was written"
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, IndexError, pickle.UnpicklingError) as e:
        why = f"it cannot be read: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    logger.warning("cache %s is damaged (%s): rebuilding it", path, why)
    return None
