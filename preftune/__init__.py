"""preftune: align causal language models to human preferences with DPO and its family."""

from preftune import losses
from preftune.data.batch import MicroBatch, dpo_custom_collate
from preftune.data.dataset import PreferenceDataset
from preftune.data.packing import DPOPackedDataset
from preftune.data.sampler import GlobalBatchSampler
from preftune.modeling.model import DPOModel
from preftune.training.trainer import DPOTrainer

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
