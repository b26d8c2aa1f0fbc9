"""preftune: align causal language models to human preferences with DPO and its family.

The public names below are imported on first use (``preftune.DPOTrainer``), not with the package: the CLI
and the config loader then start without torch and transformers (README "Start-up").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module that defines it (``losses`` is the module itself)
_PUBLIC = {
    "DPOModel": "preftune.modeling.model",
    "DPOPackedDataset": "preftune.data.packing",
    "DPOTrainer": "preftune.training.trainer",
    "GlobalBatchSampler": "preftune.data.sampler",
    "MicroBatch": "preftune.data.batch",
    "PreferenceDataset": "preftune.data.dataset",
    "dpo_custom_collate": "preftune.data.batch",
    "losses": "preftune.losses",
}
__all__ = [
    "DPOModel",
    "DPOPackedDataset",
    "DPOTrainer",
    "GlobalBatchSampler",
    "MicroBatch",
    "PreferenceDataset",
    "dpo_custom_collate",
    "losses",
]

if TYPE_CHECKING:
    from preftune import losses
    from preftune.data.batch import MicroBatch, dpo_custom_collate
    from preftune.data.dataset import PreferenceDataset
    from preftune.data.packing import DPOPackedDataset
    from preftune.data.sampler import GlobalBatchSampler
    from preftune.modeling.model import DPOModel
    from preftune.training.trainer import DPOTrainer


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'preftune' has no attribute {name!r}")
    module = importlib.import_module(_PUBLIC[name])
    value = module if name == "losses" else getattr(module, name)
    globals()[name] = value  # later look-ups skip this function
    return value
