"""What a training run and ``preftune eval`` build the same way from a config: the tokenizer, the layout of
micro-batches (padded, or packed / shared-prompt rows) and the data loaders of global batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from preftune.config import PreftuneConfig
from preftune.data.batch import MicroBatch, padded_micro_batches
from preftune.data.chat import load_chat_template
from preftune.data.dataset import PreferenceDataset
from preftune.data.packing import DPOPackedDataset
from preftune.data.sampler import GlobalBatchSampler
from preftune.modeling.model import DPOModel
from preftune.modeling.parallel import DistInfo
from preftune.modeling.reference_cache import ReferenceCache


def load_tokenizer(cfg: PreftuneConfig) -> Any:
    """``model.path``'s tokenizer, with ``data.chat_template`` when set (checkpoints then carry the template
    the model was trained with)."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.data.chat_template:
        tokenizer.chat_template = load_chat_template(cfg.data.chat_template)
    return tokenizer


def pack_length(cfg: PreftuneConfig) -> int:
    """A packed row's token budget (``data.pack_length``, default two sequences' worth)."""
    return cfg.data.pack_length or 2 * cfg.data.max_seq_length


def micro_batch_layout(
    cfg: PreftuneConfig,
    dataset: PreferenceDataset,
    model: DPOModel,
    eos_id: int,
    device: torch.device,
    context: tuple[int, int] = (0, 1),
) -> tuple[Any, Callable[[Sequence[dict]], list[MicroBatch]]]:
    """The dataset the loader reads and the collate that turns a global batch into this rank's micro-batches:
    packed / shared-prompt rows (``DPOPackedDataset``; ``context`` (rank, ranks): this context rank's part of
    each) or padded pairs, as ``data.*`` says."""
    if cfg.data.packing or cfg.data.share_prompt:  # several pairs per row and/or one prompt per pair
        packed = DPOPackedDataset(
            dataset,
            model.policy.config,
            eos_id=eos_id,
            pack_length=pack_length(cfg),
            pack=cfg.data.packing,
            share_prompt=cfg.data.share_prompt,
            rows_per_micro_batch=cfg.data.micro_batch_size,
            device=device,
            context=context,
        )
        return packed, packed.global_collate_fn  # validation batches are packed by the same collate
    return dataset, partial(padded_micro_batches, micro_batch_size=cfg.data.micro_batch_size, eos_id=eos_id)


def build_dataloader(
    dataset: PreferenceDataset | ReferenceCache, cfg: PreftuneConfig, info: DistInfo, *, train: bool
) -> DataLoader:
    """Batches are this rank's data-parallel group's share of a global batch, as lists of tokenized pairs
    (every tensor- and context-parallel rank of a group reads the same)."""
    sampler = GlobalBatchSampler(
        len(dataset),
        cfg.data.global_batch_size,
        seed=cfg.data.seed,
        shuffle=train,
        drop_last=train,
        rank=info.dp_rank,
        world_size=info.data_parallel,
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=list, num_workers=cfg.data.num_workers)
