"""Where a model comes from: ``model.path`` names a local directory or a Hugging Face Hub repository id.

Hub ids go through transformers' normal resolution (the Hub cache, ``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1``
reads only that cache), so nothing here downloads anything itself. The check runs before the first load so a
wrong path or id is one clear line rather than a traceback from deep inside ``from_pretrained``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from transformers.utils import cached_file

from preftune.errors import ConfigError

HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # name or org/name


def check_model_source(path: str, key: str = "model.path", *, tokenizer_only: bool = False) -> None:
    """Raise ``ConfigError`` unless ``path`` is a model directory (``config.json`` and weights) or a Hub id
    whose ``config.json`` resolves. ``tokenizer_only`` (``inspect``): a local directory may hold just a
    tokenizer."""
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ConfigError(f"{key}={path} is a file: point it at a model directory (config.json, weights)")
        if tokenizer_only:
            return
        if not (local / "config.json").is_file():
            raise ConfigError(
                f"{key}={path} holds no model: the directory has no config.json; point it at a directory "
                "written by save_pretrained, e.g. a checkpoint's model/"
            )
        if not any(p.suffix in (".safetensors", ".bin") for p in local.iterdir()):
            raise ConfigError(f"{key}={path} holds no weights (no *.safetensors or *.bin files)")
        return
    if not HUB_ID.match(str(path)):
        raise ConfigError(
            f"{key}={path} does not exist (no such directory, and not a Hub id of the form org/name)"
        )
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry warnings repeat what the one line below says
    try:
        cached_file(str(path), "config.json")
    except (OSError, ValueError) as e:  # ValueError: huggingface_hub rejects the id (e.g. "a..b")
        where = (
            "in the local Hub cache (HF_HUB_OFFLINE=1 is set)"
            if constants.HF_HUB_OFFLINE
            else "on the Hugging Face Hub (check the id, the network, and HF_TOKEN for gated or private models)"
        )
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{key}={path}: not a local directory, and no model with that id was found {where}: {reason}"
        ) from None
    finally:
        hub_logger.setLevel(level)


def local_model_dir(path: str) -> Path:
    """The directory holding ``path``'s files: ``path`` itself, or a Hub id's snapshot in the Hub cache (the
    files loaded so far; call after the model is loaded)."""
    return Path(path) if Path(path).is_dir() else Path(snapshot_download(str(path), local_files_only=True))
