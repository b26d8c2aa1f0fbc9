"""preftune: align causal language models to human preferences with DPO and its family."""

from preftune import losses
from preftune.data import GlobalBatchSampler, PreferenceDataset, dpo_custom_collate
from preftune.model import DPOModel
from preftune.packing import DPOPackedDataset
from preftune.trainer import DPOTrainer

__all__ = [
    "DPOModel",
    "DPOPackedDataset",
    "DPOTrainer",
    "GlobalBatchSampler",
    "PreferenceDataset",
    "dpo_custom_collate",
    "losses",
]
