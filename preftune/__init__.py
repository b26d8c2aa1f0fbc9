"""preftune: align causal language models to human preferences with DPO and its family."""

from preftune import losses
from preftune.data import GlobalBatchSampler, PreferenceDataset, dpo_custom_collate
from preftune.model import DPOModel
from preftune.trainer import DPOTrainer

__all__ = [
    "DPOModel",
    "DPOTrainer",
    "GlobalBatchSampler",
    "PreferenceDataset",
    "dpo_custom_collate",
    "losses",
]
