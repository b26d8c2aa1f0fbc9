"""Files written with the user's umask, also those a library writes with a fixed mode.

safetensors (>= 0.8) writes each file through a temporary file renamed into place, which is always created
mode 0600: a teammate on a shared cluster could not read a checkpoint's or an export's weights, though every
other file there follows the umask (0644 under 022).
"""

from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """The process's umask (read by setting a stricter one for an instant, never a looser one)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def apply_umask(directory: Path) -> None:
    """Give every ``.safetensors`` file under ``directory`` the mode a new file gets under the umask."""
    mode = 0o666 & ~umask()
    for path in directory.rglob("*.safetensors"):
        path.chmod(mode)
