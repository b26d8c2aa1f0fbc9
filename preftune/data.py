"""Preference data: tokenizing pairs, the tokenization cache, the global-batch sampler and the padded collate.

Records come from ``preftune.sources`` (JSONL, JSON, Parquet, save_to_disk directories) and are turned into
pairs by ``preftune.formats``. A text pair is tokenized as ``prompt`` and each response separately, then
concatenated, so the prompt tokens are always an exact prefix of prompt+response: the prompt gets the
tokenizer's BOS (once) if the tokenizer adds one; each response ends with exactly one EOS. A chat pair is
rendered with the chat template (``preftune.chat``), which decides BOS and the end-of-turn token itself.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from preftune.chat import (
    BAD_END,
    BROKEN_PREFIX,
    NO_TEMPLATE,
    ChatTemplate,
    load_chat_template,
    tokenizer_template,
)
from preftune.config import ConfigError
from preftune.formats import COMPLETION_PAIRINGS, FORMAT_NAMES, parse_pairs, rename_columns
from preftune.formats import DataError as DataError
from preftune.formats import detect_format as detect_format
from preftune.formats import parse_record as parse_record
from preftune.sources import Source, file_digest, resolve_sources
from preftune.sources import read_jsonl as read_jsonl

logger = logging.getLogger(__name__)

CACHE_VERSION = 3
IDENTICAL = "identical chosen and rejected"
TRUNCATED_AWAY = "response truncated to zero tokens"
TIED = "completions all ranked the same"
LOGGED_DROPS = (BROKEN_PREFIX, BAD_END)  # drops that point at a template problem: logged with their pair
MAX_LOGGED = 5  # per reason and file


@dataclass
class DatasetStats:
    """What loading kept and dropped (and why), for one file or a whole dataset."""

    path: str
    format: str
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    records: int = 0

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        return f"{self.path}: {self.format} format, {self.kept} pairs kept, dropped: {reasons}"


class PairTokenizer:
    """Tokenizes a pair so the prompt is an exact prefix of prompt+chosen and of prompt+rejected.

    ``chat_template`` (Jinja text) renders chat pairs in place of the tokenizer's own template.
    """

    def __init__(self, tokenizer: Any, max_seq_length: int, chat_template: str | None = None):
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.eos_id: int = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.bos_id: int | None = bos if bos is not None and probe[:1] == [bos] else None
        self.chat_template = chat_template if chat_template is not None else tokenizer_template(tokenizer)
        """The template chat pairs are rendered with (None: chat pairs are an error)."""
        self._chat: ChatTemplate | None = None

    @property
    def chat(self) -> ChatTemplate:
        if self._chat is None:
            if self.chat_template is None:
                raise DataError(NO_TEMPLATE)
            self._chat = ChatTemplate(self.tokenizer, self.chat_template)
        return self._chat

    def encode_prompt(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def encode_response(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids[-1:] != [self.eos_id]:
            ids.append(self.eos_id)
        return ids

    def __call__(self, pair: dict[str, Any]) -> dict[str, Any] | str:
        """A tokenized example, or the reason it is dropped."""
        if isinstance(pair["prompt"], list):
            encoded = self.chat.encode_pair(pair["prompt"], pair["chosen"], pair["rejected"])
            if isinstance(encoded, str):
                return encoded
            prompt, chosen, rejected = encoded
        else:
            prompt = self.encode_prompt(pair["prompt"])
            chosen = self.encode_response(pair["chosen"])
            rejected = self.encode_response(pair["rejected"])
        prompt, chosen, rejected = truncate(prompt, chosen, rejected, self.max_seq_length, self.bos_id)
        if not chosen or not rejected:
            return TRUNCATED_AWAY
        if chosen == rejected:
            return IDENTICAL
        return {
            "prompt_ids": prompt,
            "chosen_ids": chosen,
            "rejected_ids": rejected,
            "chosen_reward": pair["chosen_reward"],
            "rejected_reward": pair["rejected_reward"],
        }


def truncate(
    prompt: list[int], chosen: list[int], rejected: list[int], max_len: int, bos_id: int | None
) -> tuple[list[int], list[int], list[int]]:
    """Fit prompt + each response into ``max_len``: cut the prompt from the left first (keeping its BOS and
    at least one token), then cut the responses from the right."""
    excess = len(prompt) + max(len(chosen), len(rejected)) - max_len
    if excess > 0:
        keep_head = 1 if bos_id is not None and prompt[:1] == [bos_id] else 0
        removable = max(0, len(prompt) - keep_head - 1)
        cut = min(excess, removable)
        prompt = prompt[:keep_head] + prompt[keep_head + cut :]
    room = max_len - len(prompt)
    return prompt, chosen[:room], rejected[:room]


TOKEN_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")
REWARD_FIELDS = ("chosen_reward", "rejected_reward")


class TokenizedPairs(Sequence[dict[str, Any]]):
    """Tokenized pairs held column-wise: each token field is one flat int32 tensor with [N + 1] offsets, the
    rewards are [N] float64. Indexing returns the example as a dict of lists and floats.

    Four bytes a token instead of a Python int each (about 36 bytes with its list slot); loaded from the
    tokenization cache, the tensors are memory-mapped (pages shared with other processes reading the file).
    DataLoader workers should fork (Linux's default): a spawned worker gets the columns copied to shared memory.
    """

    def __init__(self, columns: Mapping[str, Tensor]):
        self.columns = dict(columns)

    @classmethod
    def from_examples(cls, examples: Iterable[Mapping[str, Any]]) -> TokenizedPairs:
        """The store of ``examples`` (dicts of token lists and rewards), filled through compact buffers."""
        tokens = {name: array("i") for name in TOKEN_FIELDS}
        lengths = {name: array("q") for name in TOKEN_FIELDS}
        rewards = {name: array("d") for name in REWARD_FIELDS}
        for ex in examples:
            for name in TOKEN_FIELDS:
                tokens[name].extend(ex[name])
                lengths[name].append(len(ex[name]))
            for name in REWARD_FIELDS:
                rewards[name].append(ex[name])
        columns: dict[str, Tensor] = {}
        for name in TOKEN_FIELDS:
            columns[name] = torch.from_numpy(np.frombuffer(tokens[name], dtype=np.int32).copy())
            counts = torch.from_numpy(np.frombuffer(lengths[name], dtype=np.int64).copy())
            columns[f"{name}_offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        for name in REWARD_FIELDS:
            columns[name] = torch.from_numpy(np.frombuffer(rewards[name], dtype=np.float64).copy())
        return cls(columns)

    def __len__(self) -> int:
        return len(self.columns[REWARD_FIELDS[0]])

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"pair {index} of {len(self)}")
        index %= len(self)
        example: dict[str, Any] = {}
        for name in TOKEN_FIELDS:
            start, end = self.columns[f"{name}_offsets"][index : index + 2].tolist()
            example[name] = self.columns[name][start:end].tolist()
        for name in REWARD_FIELDS:
            example[name] = self.columns[name][index].item()
        return example

    def select(self, indices: Tensor) -> TokenizedPairs:
        """The pairs at ``indices`` (in that order), as a new store."""
        columns: dict[str, Tensor] = {}
        for name in TOKEN_FIELDS:
            offsets = self.columns[f"{name}_offsets"]
            starts, lengths = offsets[indices], offsets[indices + 1] - offsets[indices]
            new_offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
            # token k of the result comes from its pair's start plus its place within the pair
            within = torch.arange(int(new_offsets[-1])) - new_offsets[:-1].repeat_interleave(lengths)
            columns[name] = self.columns[name][starts.repeat_interleave(lengths) + within]
            columns[f"{name}_offsets"] = new_offsets
        for name in REWARD_FIELDS:
            columns[name] = self.columns[name][indices]
        return TokenizedPairs(columns)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash that changes whenever the tokenizer would produce different ids."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(
        json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer("a")["input_ids"]]).encode()
    )
    return h.hexdigest()


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized preference pairs from one source or a list of them (see ``preftune.sources``).

    Each file's format is ``format`` or, with ``auto``, detected from its first record. ``columns`` maps
    preftune's column names to the file's; ``chat_template`` (Jinja text or a file) replaces the tokenizer's
    template for chat pairs; ``completions`` pairs NeMo-RL completions (``best_vs_worst`` or ``all_pairs``).

    Tokenization is cached in ``cache_dir`` keyed by the files' content, the tokenizer and every setting,
    so a second run (or another rank) loads it instead of tokenizing again. Besides ``examples``, the
    dataset keeps ``origins`` ([N, 3]: file index, record index in the file, line or row of each example)
    and ``drops`` ((file index, record index, line or row, reason) of each dropped pair).
    """

    def __init__(
        self,
        path: str | Path | Sequence[str | Path],
        tokenizer: Any,
        max_seq_length: int,
        cache_dir: str | Path | None = None,
        *,
        format: str = "auto",
        columns: Mapping[str, str] | None = None,
        chat_template: str | None = None,
        completions: str = "best_vs_worst",
    ):
        if format not in FORMAT_NAMES:
            raise ConfigError(f"data.format={format!r}: use one of {', '.join(FORMAT_NAMES)}")
        if completions not in COMPLETION_PAIRINGS:
            raise ConfigError(
                f"data.completions={completions!r}: use one of {', '.join(COMPLETION_PAIRINGS)}"
            )
        self.sources: list[Source] = resolve_sources(path)
        self.split_name: str | None = None
        columns = dict(columns or {})
        pair_tokenizer = PairTokenizer(tokenizer, max_seq_length, load_chat_template(chat_template))
        key = [
            CACHE_VERSION,
            [[file_digest(f) for f in source.files()] for source in self.sources],
            tokenizer_fingerprint(tokenizer),
            max_seq_length,
            format,
            sorted(columns.items()),
            pair_tokenizer.chat_template,
            completions,
        ]
        # changes whenever the tokenized examples would (files' content, tokenizer, settings)
        self.fingerprint = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]
        name = self.sources[0].path.stem + (f"+{len(self.sources) - 1}" if len(self.sources) > 1 else "")
        cache_file = Path(cache_dir) / f"{name}-{self.fingerprint}.pt" if cache_dir is not None else None
        if cache_file is not None and cache_file.is_file():
            cached = torch.load(cache_file, weights_only=True, mmap=True)
            self.examples, self.origins = TokenizedPairs(cached["examples"]), cached["origins"]
            self.drops = [tuple(d) for d in cached["drops"]]
            self.formats, self.records = cached["formats"], cached["records"]
            self.from_cache = True
            return
        self.examples = TokenizedPairs.from_examples(
            self._tokenize(pair_tokenizer, format, columns, completions)
        )
        self.from_cache = False
        if not len(self.examples):
            raise DataError(f"{self.stats.summary()}; nothing left to train on (raise data.max_seq_length?)")
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            payload = {
                "examples": self.examples.columns,
                "origins": self.origins,
                "drops": [list(d) for d in self.drops],
                "formats": self.formats,
                "records": self.records,
            }
            torch.save(payload, tmp)
            os.replace(tmp, cache_file)

    def _tokenize(
        self, pair_tokenizer: PairTokenizer, format: str, columns: dict[str, str], completions: str
    ) -> Iterator[dict[str, Any]]:
        """Yield the kept examples; record drops, formats, record counts and (once exhausted) origins."""
        self.drops: list[tuple[int, int, int, str]] = []
        self.formats: list[str] = []
        self.records: list[int] = []
        origins: list[tuple[int, int, int]] = []
        for file_index, source in enumerate(self.sources):
            fmt = None if format == "auto" else format
            records, logged = 0, Counter()
            progress = tqdm(
                source.records(),
                desc=f"tokenizing {source.path.name}",
                unit=" records",
                total=source.num_records(),
                disable=None,
            )
            for n, record in progress:
                where = source.where(n)
                record = rename_columns(record, columns, where)
                fmt = fmt or detect_format(record, where)
                pairs = parse_pairs(record, fmt, where, completions)
                if not pairs:
                    self.drops.append((file_index, records, n, TIED))
                for pair in pairs:
                    try:
                        example = pair_tokenizer(pair)
                    except DataError as e:
                        raise DataError(f"{where}: {e}") from None
                    if isinstance(example, dict):
                        yield example
                        origins.append((file_index, records, n))
                        continue
                    self.drops.append((file_index, records, n, example))
                    if example in LOGGED_DROPS:
                        logged[example] += 1
                        if logged[example] <= MAX_LOGGED:
                            logger.warning("%s: pair dropped: %s", where, example)
                records += 1
            if not records:
                raise DataError(f"{source.path}: the file has no records; fix the path or drop the file")
            for reason, n in logged.items():
                if n > MAX_LOGGED:
                    logger.warning("%s: %d more pairs dropped: %s", source.path, n - MAX_LOGGED, reason)
            self.formats.append(fmt)
            self.records.append(records)
        self.origins = torch.tensor(origins, dtype=torch.long).reshape(-1, 3)

    def _stats(self, path: str, file_indices: Sequence[int]) -> DatasetStats:
        in_files = torch.isin(self.origins[:, 0], torch.tensor(list(file_indices)))
        formats = dict.fromkeys(self.formats[i] for i in file_indices)
        return DatasetStats(
            path,
            "+".join(formats),
            kept=int(in_files.sum()),
            dropped=Counter(d[3] for d in self.drops if d[0] in file_indices),
            records=sum(self.records[i] for i in file_indices),
        )

    @property
    def stats(self) -> DatasetStats:
        """Kept and dropped pairs over every file (of this split, for a split)."""
        path = ", ".join(str(s.path) for s in self.sources)
        if self.split_name is not None:
            path += f" ({self.split_name} split)"
        return self._stats(path, range(len(self.sources)))

    @property
    def file_stats(self) -> list[DatasetStats]:
        return [self._stats(str(s.path), [i]) for i, s in enumerate(self.sources)]

    def where(self, file_index: int, n: int) -> str:
        """``file:line`` or ``file: row N`` of a record."""
        return self.sources[file_index].where(n)

    def split(self, fraction: float, seed: int) -> tuple[PreferenceDataset, PreferenceDataset]:
        """(train, validation): ``fraction`` of the records (drawn with ``seed``) and their pairs validate.

        Records, not pairs, are drawn (every pair of a NeMo-RL record lands on one side), and dropped pairs
        count too, so which records validate depends only on the files, the fraction and the seed.
        """
        counts = torch.tensor(self.records)
        offsets = torch.cumsum(counts, 0) - counts
        total = int(counts.sum())
        n_val = round(fraction * total)
        if not 0 < n_val < total:
            raise DataError(
                f"data.validation_fraction={fraction} of {total} records leaves {n_val} for validation and "
                f"{total - n_val} for training; both need at least one"
            )
        is_val = torch.zeros(total, dtype=torch.bool)
        is_val[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n_val]] = True
        example_val = is_val[offsets[self.origins[:, 0]] + self.origins[:, 1]]
        drop_val = [bool(is_val[offsets[d[0]] + d[1]]) for d in self.drops]
        per_file = [int(is_val[o : o + c].sum()) for o, c in zip(offsets.tolist(), self.records, strict=True)]
        parts = []
        for name, keep in (("train", ~example_val), ("validation", example_val)):
            part = copy.copy(self)
            part.split_name = name
            part.examples = self.examples.select(keep.nonzero().squeeze(1))
            part.origins = self.origins[keep]
            part.drops = [d for d, v in zip(self.drops, drop_val, strict=True) if v == (name == "validation")]
            part.records = (
                per_file
                if name == "validation"
                else [c - v for c, v in zip(self.records, per_file, strict=True)]
            )
            key = json.dumps([self.fingerprint, name, fraction, seed])
            part.fingerprint = hashlib.sha256(key.encode()).hexdigest()[:24]
            if not len(part.examples):
                raise DataError(f"{part.stats.summary()}; the {name} split has no pairs left")
            parts.append(part)
        return parts[0], parts[1]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.examples[index], "index": index}


def dataset_options(data: Mapping[str, Any]) -> dict[str, Any]:
    """The ``PreferenceDataset`` keyword arguments the ``data.*`` config sets."""
    return {
        "format": data["format"],
        "columns": {k: v for k, v in data["columns"].items() if v is not None},
        "chat_template": data["chat_template"],
        "completions": data["completions"],
    }


def load_datasets(
    data: Mapping[str, Any], tokenizer: Any, cache_dir: str | Path | None
) -> tuple[PreferenceDataset, PreferenceDataset | None]:
    """The train and validation sets the ``data.*`` config describes: ``data.validation`` files, a
    ``data.validation_fraction`` split of ``data.train`` drawn with ``data.seed``, or none."""
    fraction = data["validation_fraction"]
    if fraction is not None and data["validation"]:
        raise ConfigError("set data.validation or data.validation_fraction, not both")
    if fraction is not None and not 0 < fraction < 1:
        raise ConfigError(f"data.validation_fraction={fraction}: must be between 0 and 1")
    options = dataset_options(data)
    train = PreferenceDataset(data["train"], tokenizer, data["max_seq_length"], cache_dir, **options)
    if fraction is not None:
        return train.split(fraction, data["seed"])
    if data["validation"]:
        return train, PreferenceDataset(
            data["validation"], tokenizer, data["max_seq_length"], cache_dir, **options
        )
    return train, None


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this rank's share of each global batch.

    The order of the global batches depends only on (seed, epoch), and a resumed run starts at a batch
    offset, so the sample order is independent of the number of ranks and of the micro-batch size.
    Rank ``r`` takes the ``r``-th contiguous slice of every global batch.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if global_batch_size % world_size:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by {world_size} ranks")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        full, rest = divmod(num_samples, global_batch_size)
        self.batches_per_epoch = full + (1 if rest and not drop_last else 0)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        for b in range(self.start_batch, self.batches_per_epoch):
            batch = order[b * self.global_batch_size : (b + 1) * self.global_batch_size]
            per_rank = math.ceil(len(batch) / self.world_size)
            yield batch[self.rank * per_rank : (self.rank + 1) * per_rank]


def dpo_custom_collate(
    batch: Sequence[dict[str, Any]], eos_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, Tensor]:
    """Right-pad prompt+chosen and prompt+rejected of a micro-batch to one length.

    Returns ``chosen``, ``rejected`` ([B, T] token ids, padded with ``eos_id``), ``chosen_length``,
    ``rejected_length`` ([B] real lengths), ``chosen_labels``, ``rejected_labels`` ([B, T], -100 on the
    prompt and the padding), ``attention_mask`` and ``position_ids`` ([2B, T]: chosen rows then rejected
    rows, the order of the single policy forward), ``chosen_rewards``, ``rejected_rewards`` ([B]),
    ``indices`` ([B] dataset indices) and ``num_tokens`` (real tokens in the batch).
    """
    chosen = [ex["prompt_ids"] + ex["chosen_ids"] for ex in batch]
    rejected = [ex["prompt_ids"] + ex["rejected_ids"] for ex in batch]
    length = max(len(s) for s in chosen + rejected)
    if pad_to_multiple_of:
        length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of

    def pad(seqs: list[list[int]], value: int) -> Tensor:
        return torch.tensor([s + [value] * (length - len(s)) for s in seqs], dtype=torch.long)

    def labels(seqs: list[list[int]]) -> Tensor:
        return pad(
            [
                [-100] * len(ex["prompt_ids"]) + s[len(ex["prompt_ids"]) :]
                for ex, s in zip(batch, seqs, strict=True)
            ],
            -100,
        )

    lengths = torch.tensor([len(s) for s in chosen + rejected])
    positions = torch.arange(length)
    return {
        "chosen": pad(chosen, eos_id),
        "rejected": pad(rejected, eos_id),
        "chosen_length": lengths[: len(batch)],
        "rejected_length": lengths[len(batch) :],
        "chosen_labels": labels(chosen),
        "rejected_labels": labels(rejected),
        "attention_mask": (positions[None, :] < lengths[:, None]).long(),
        "position_ids": positions.expand(len(lengths), length).clone(),
        "chosen_rewards": torch.tensor([ex["chosen_reward"] for ex in batch], dtype=torch.float32),
        "rejected_rewards": torch.tensor([ex["rejected_reward"] for ex in batch], dtype=torch.float32),
        "indices": torch.tensor([ex.get("index", -1) for ex in batch], dtype=torch.long),
        "num_tokens": lengths.sum(),
    }


def padded_micro_batches(
    pairs: Sequence[dict[str, Any]],
    *,
    micro_batch_size: int,
    eos_id: int,
    pad_to_multiple_of: int | None = None,
) -> list[dict[str, Tensor]]:
    """A rank's share of a global batch as padded micro-batches of ``micro_batch_size`` pairs.

    Pairs are grouped by length (longest first) so each micro-batch pads little; the step's objective is the
    same whatever the grouping, since each micro-batch's loss is weighted by its share of the pairs.
    """
    pairs = sorted(pairs, key=padded_length, reverse=True)
    return [
        dpo_custom_collate(pairs[i : i + micro_batch_size], eos_id, pad_to_multiple_of)
        for i in range(0, len(pairs), micro_batch_size)
    ]


def padded_length(pair: dict[str, Any]) -> int:
    """Tokens of prompt + the longer response: the padded length a pair needs."""
    return len(pair["prompt_ids"]) + max(len(pair["chosen_ids"]), len(pair["rejected_ids"]))
