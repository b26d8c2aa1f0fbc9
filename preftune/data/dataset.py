"""``PreferenceDataset``: preference files read, tokenized and cached as flat int32 token columns.

Records come from ``preftune.data.sources`` (JSONL, JSON, Parquet, save_to_disk directories) and are turned
into pairs by ``preftune.data.formats``, then tokenized by ``preftune.data.tokenize``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from preftune.data.chat import load_chat_template
from preftune.data.checked_file import load_checked, save_checked
from preftune.data.formats import COMPLETION_PAIRINGS, FORMAT_NAMES, parse_pairs, rename_columns
from preftune.data.hub import HubSource
from preftune.data.pipeline import REWARD_FIELDS, TOKEN_FIELDS, store_columns, tokenize_sources
from preftune.data.pipeline import TIED as TIED  # the drop reason of a tied NeMo-RL record, named here too
from preftune.data.sources import Source, SourceSpec, resolve_sources
from preftune.data.tokenize import PairTokenizer, tokenizer_fingerprint
from preftune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

CACHE_VERSION = 3


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
        return cls(store_columns(examples))

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


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized preference pairs from one source or a list of them (see ``preftune.data.sources``).

    Each file's format is ``format`` or, with ``auto``, detected from its first record. ``columns`` maps
    preftune's column names to the file's; ``chat_template`` (Jinja text or a file) replaces the tokenizer's
    template for chat pairs; ``completions`` pairs NeMo-RL completions (``best_vs_worst`` or ``all_pairs``);
    ``key``: the config key the sources come from, named in their errors.

    Tokenization is cached in ``cache_dir`` keyed by the files' content, the tokenizer and every setting,
    so a second run (or another rank) loads it instead of tokenizing again. Besides ``examples``, the
    dataset keeps ``origins`` ([N, 3]: file index, record index in the file, line or row of each example)
    and ``drops`` ((file index, record index, line or row, reason) of each dropped pair).
    """

    def __init__(
        self,
        path: SourceSpec | Sequence[SourceSpec],
        tokenizer: Any,
        max_seq_length: int,
        cache_dir: str | Path | None = None,
        *,
        format: str = "auto",
        columns: Mapping[str, str] | None = None,
        chat_template: str | None = None,
        completions: str = "best_vs_worst",
        key: str = "data.train",
    ):
        if format not in FORMAT_NAMES:
            raise ConfigError(f"data.format={format!r}: use one of {', '.join(FORMAT_NAMES)}")
        if completions not in COMPLETION_PAIRINGS:
            raise ConfigError(
                f"data.completions={completions!r}: use one of {', '.join(COMPLETION_PAIRINGS)}"
            )
        self.sources: list[Source | HubSource] = resolve_sources(path, key)
        self.split_name: str | None = None
        columns = dict(columns or {})
        self.columns, self.completions = columns, completions  # to read a record's prompt again (prompts)
        pair_tokenizer = PairTokenizer(tokenizer, max_seq_length, load_chat_template(chat_template))
        key = [
            CACHE_VERSION,
            [source.cache_key() for source in self.sources],
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
        cached = load_checked(cache_file, mmap=True) if cache_file is not None else None
        if cached is not None:
            self.examples, self.origins = TokenizedPairs(cached["examples"]), cached["origins"]
            self.drops = [tuple(d) for d in cached["drops"]]
            self.formats, self.records = cached["formats"], cached["records"]
            self.from_cache, self.tokenize_seconds = True, 0.0
            return
        tokenized = tokenize_sources(self.sources, pair_tokenizer, format, columns, completions)
        self.examples, self.origins = TokenizedPairs(tokenized.columns), tokenized.origins
        self.drops, self.formats, self.records = tokenized.drops, tokenized.formats, tokenized.records
        self.tokenize_seconds, self.from_cache = tokenized.seconds, False
        if not len(self.examples):
            raise DataError(f"{self.stats.summary()}; nothing left to train on (raise data.max_seq_length?)")
        if cache_file is not None:
            payload = {
                "examples": self.examples.columns,
                "origins": self.origins,
                "drops": [list(d) for d in self.drops],
                "formats": self.formats,
                "records": self.records,
            }
            save_checked(payload, cache_file)

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

    def load_summary(self) -> str:
        """The stats line, with where the pairs came from: the cache, or tokenizing at some pairs/s."""
        if self.from_cache:
            return f"{self.stats.summary()} (from cache)"
        pairs, seconds = len(self) + len(self.drops), max(self.tokenize_seconds, 1e-9)
        return f"{self.stats.summary()} (tokenized in {seconds:.1f} s, {pairs / seconds:.0f} pairs/s)"

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

    def prompts(self, count: int) -> list[str | list[dict]]:
        """The data's own prompts of the first ``count`` pairs, read again from their records: text, or the
        messages before the final assistant turn for conversational data (what a judge gets, as in TRL)."""
        origins = [tuple(o) for o in self.origins[:count, :2].tolist()]
        found: dict[tuple[int, int], Any] = {}
        for file_index in sorted({f for f, _ in origins}):
            wanted = {r for f, r in origins if f == file_index}
            source = self.sources[file_index]
            for record_index, (n, record) in enumerate(source.records()):
                if record_index in wanted:
                    where = source.where(n)
                    record = rename_columns(record, self.columns, where)
                    pair = parse_pairs(record, self.formats[file_index], where, self.completions)[0]
                    found[(file_index, record_index)] = pair["prompt"]
                if record_index >= max(wanted):
                    break
        return [found[origin] for origin in origins]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.examples[index], "index": index}
