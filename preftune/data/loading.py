"""Loading the data a config describes: the train set (one source, several, or a weighted mixture of them)
and the validation set (its own sources, or a split of train's records)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from preftune.config import DataConfig
from preftune.data.dataset import PreferenceDataset
from preftune.data.mixture import WeightedPairs, weighted
from preftune.errors import ConfigError


def dataset_options(data: DataConfig) -> dict[str, Any]:
    """The ``PreferenceDataset`` keyword arguments the ``data.*`` config sets."""
    return {
        "format": data.format,
        "columns": {k: v for k, v in data.columns.items() if v is not None},
        "chat_template": data.chat_template,
        "completions": data.completions,
    }


def load_datasets(
    data: DataConfig, tokenizer: Any, cache_dir: str | Path | None
) -> tuple[PreferenceDataset | WeightedPairs, PreferenceDataset | None]:
    """The train and validation sets the ``data.*`` config describes: ``data.validation`` files, a
    ``data.validation_fraction`` split of ``data.train`` drawn with ``data.seed``, or none. Train is drawn
    by its sources' weights (``preftune.data.mixture``) after any split."""
    fraction = data.validation_fraction
    options = dataset_options(data)
    train = PreferenceDataset(data.train, tokenizer, data.max_seq_length, cache_dir, **options)
    val = None
    if fraction is not None:
        train, val = train.split(fraction, data.seed)
    elif data.validation:
        val = load_validation(data, tokenizer, cache_dir)
    return weighted(train, data.seed), val


def load_validation(data: DataConfig, tokenizer: Any, cache_dir: str | Path | None) -> PreferenceDataset:
    """The pairs of ``data.validation``."""
    options = dataset_options(data)
    val = PreferenceDataset(
        data.validation, tokenizer, data.max_seq_length, cache_dir, **options, key="data.validation"
    )
    if any(source.weight != 1 for source in val.sources):
        raise ConfigError("data.validation: weights apply to data.train only; drop them from validation")
    return val
