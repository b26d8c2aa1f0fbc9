"""What the launcher (torchrun, SLURM) tells a process through its environment: its rank and the number of
ranks. Read without torch, so that the CLI reports a config mistake (once, by rank 0) before importing it."""

from __future__ import annotations

import os


def env_int(*names: str) -> int | None:
    """The first of the variables ``names`` that is set, as an int (None: none is)."""
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return None


def env_rank() -> int:
    """This process's global rank from the launcher's variables (0 without a launcher)."""
    return env_int("RANK", "SLURM_PROCID") or 0


def env_world_size() -> int:
    """The number of ranks the launcher started (1 without a launcher)."""
    return env_int("WORLD_SIZE", "SLURM_NTASKS") or 1
