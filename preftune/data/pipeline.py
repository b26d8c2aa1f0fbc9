"""Tokenizing preference sources at scale: reading overlapped with batched, multi-threaded encoding.

A reader thread reads records, turns them into pairs and renders their texts (chat pairs through the
template); the calling thread encodes each chunk of texts in one call of the fast tokenizer, which runs on
every core without the GIL, then checks and truncates each pair (``PairTokenizer.finish``) and appends it to
flat int32 columns. No per-pair Python object outlives its chunk. Errors keep their file and line: the
reader hands its error over in order, after the chunks read before it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from preftune.data.chat import BAD_END, BROKEN_PREFIX
from preftune.data.formats import detect_format, parse_pairs, rename_columns
from preftune.data.sources import Source
from preftune.data.tokenize import PairTokenizer
from preftune.errors import DataError

logger = logging.getLogger(__name__)

TOKEN_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")
REWARD_FIELDS = ("chosen_reward", "rejected_reward")
TIED = "completions all ranked the same"
LOGGED_DROPS = (BROKEN_PREFIX, BAD_END)  # drops that point at a template problem: logged with their pair
MAX_LOGGED = 5  # per reason and file
CHUNK_CHARS = 1 << 18  # text characters per batched tokenizer call (about 60k tokens)
QUEUED_CHUNKS = 2  # chunks the reader may run ahead


def _column(buffer: array) -> Tensor:
    """``buffer`` as a tensor without a copy; through numpy's view, the tensor holds the buffer (alive, and
    locked against resizing)."""
    return torch.from_numpy(np.frombuffer(buffer, dtype=buffer.typecode))


class PairStoreBuilder:
    """Flat columns filled pair by pair: tokens in int32 arrays, offsets running totals, rewards float64.

    ``columns()`` hands the arrays over as tensors without copying them, so the peak is the store itself
    (plus the arrays' growth slack), never two copies of it.
    """

    def __init__(self) -> None:
        self.tokens = {name: array("i") for name in TOKEN_FIELDS}
        self.offsets = {name: array("q", [0]) for name in TOKEN_FIELDS}
        self.rewards = {name: array("d") for name in REWARD_FIELDS}

    def add(self, example: Mapping[str, Any]) -> None:
        for name in TOKEN_FIELDS:
            ids = example[name]
            self.tokens[name].extend(ids)
            self.offsets[name].append(self.offsets[name][-1] + len(ids))
        for name in REWARD_FIELDS:
            self.rewards[name].append(example[name])

    def __len__(self) -> int:
        return len(self.rewards[REWARD_FIELDS[0]])

    def columns(self) -> dict[str, Tensor]:
        columns: dict[str, Tensor] = {}
        for name in TOKEN_FIELDS:
            columns[name] = _column(self.tokens[name])
            columns[f"{name}_offsets"] = _column(self.offsets[name])
        for name in REWARD_FIELDS:
            columns[name] = _column(self.rewards[name])
        return columns


def store_columns(examples: Iterable[Mapping[str, Any]]) -> dict[str, Tensor]:
    """The flat columns of ``examples`` (dicts of token lists and rewards)."""
    builder = PairStoreBuilder()
    for example in examples:
        builder.add(example)
    return builder.columns()


@dataclass
class Tokenized:
    """What tokenizing the sources gave: the columns, where each kept pair came from, and what was dropped."""

    columns: dict[str, Tensor]
    origins: Tensor  # [N, 3]: file index, record index in the file, line or row
    drops: list[tuple[int, int, int, str]]  # (file index, record index, line or row, reason)
    formats: list[str]
    records: list[int]
    seconds: float = 0.0


@dataclass
class _Item:
    """One pair as read: where it is, and its texts to encode, or why it is already dropped."""

    record: int
    line: int
    pair: dict[str, Any] | None
    texts: tuple[str, str, str] | str | None  # None: a tokenized pair (no texts to encode)


@dataclass
class _Chunk:
    file_index: int
    items: list[_Item] = field(default_factory=list)
    chars: int = 0


@dataclass
class _FileEnd:
    file_index: int
    format: str
    records: int


@contextlib.contextmanager
def _parallel_tokenizers() -> Iterator[None]:
    """Let the Rust tokenizer use every core while tokenizing and, unless the user set
    TOKENIZERS_PARALLELISM, turn it off afterwards so forked DataLoader workers neither warn nor deadlock."""
    if "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


class _Reader(threading.Thread):
    """Reads the sources into chunks of rendered pairs, in order; an error goes into the queue in its place."""

    def __init__(
        self,
        sources: Sequence[Source],
        pair_tokenizer: PairTokenizer,
        format: str,
        columns: Mapping[str, str],
        completions: str,
    ):
        super().__init__(name="preftune-reader", daemon=True)
        self.sources, self.pair_tokenizer = sources, pair_tokenizer
        self.format, self.columns, self.completions = format, columns, completions
        self.out: queue.Queue[_Chunk | _FileEnd | BaseException | None] = queue.Queue(QUEUED_CHUNKS)
        self.stopped = threading.Event()

    def _put(self, item: _Chunk | _FileEnd | BaseException | None) -> None:
        while not self.stopped.is_set():
            with contextlib.suppress(queue.Full):
                self.out.put(item, timeout=0.1)
                return

    def run(self) -> None:
        try:
            for file_index, source in enumerate(self.sources):
                self._read(file_index, source)
            self._put(None)
        except BaseException as e:  # handed to the consumer, raised there in order
            self._put(e)

    def _read(self, file_index: int, source: Source) -> None:
        fmt = None if self.format == "auto" else self.format
        chunk, records = _Chunk(file_index), 0
        for n, record in source.records():
            if self.stopped.is_set():
                return
            where = source.where(n)
            record = rename_columns(record, self.columns, where)
            fmt = fmt or detect_format(record, where)
            pairs = parse_pairs(record, fmt, where, self.completions)
            if not pairs:
                chunk.items.append(_Item(records, n, None, TIED))
            for pair in pairs:
                try:
                    texts = None if fmt == "tokenized" else self.pair_tokenizer.texts(pair)
                except DataError as e:
                    raise DataError(f"{where}: {e}") from None
                chunk.items.append(_Item(records, n, pair, texts))
                chunk.chars += sum(map(len, texts)) if isinstance(texts, tuple) else 0
            records += 1
            if chunk.chars >= CHUNK_CHARS:
                self._put(chunk)
                chunk = _Chunk(file_index)
        if not records:
            raise DataError(f"{source.path}: the file has no records; fix the path or drop the file")
        self._put(chunk)
        self._put(_FileEnd(file_index, fmt, records))


class _Collector:
    """The consumer's side: encodes each chunk's texts in one batched call, checks and stores its pairs, keeps
    the drops (a few of each template problem logged per file) and each file's format and record count."""

    def __init__(self, sources: Sequence[Source], pair_tokenizer: PairTokenizer):
        self.sources, self.pair_tokenizer = sources, pair_tokenizer
        self.store, self.origins = PairStoreBuilder(), array("q")
        self.drops: list[tuple[int, int, int, str]] = []
        self.formats: list[str] = []
        self.records: list[int] = []
        self.logged: Counter = Counter()

    def add_chunk(self, chunk: _Chunk) -> None:
        texts = [text for item in chunk.items if isinstance(item.texts, tuple) for text in item.texts]
        encoded = iter(self.pair_tokenizer.encode_texts(texts))
        del texts
        for item in chunk.items:
            example = item.texts
            if isinstance(example, tuple):
                example = self.pair_tokenizer.finish(item.pair, next(encoded), next(encoded), next(encoded))
            elif example is None:
                example = self.pair_tokenizer.finish_ids(item.pair)
            if isinstance(example, dict):
                self.store.add(example)
                self.origins.extend((chunk.file_index, item.record, item.line))
                continue
            self.drops.append((chunk.file_index, item.record, item.line, example))
            if example in LOGGED_DROPS:
                self.logged[example] += 1
                if self.logged[example] <= MAX_LOGGED:
                    where = self.sources[chunk.file_index].where(item.line)
                    logger.warning("%s: pair dropped: %s", where, example)

    def end_file(self, end: _FileEnd) -> None:
        path = self.sources[end.file_index].path
        for reason, n in self.logged.items():
            if n > MAX_LOGGED:
                logger.warning("%s: %d more pairs dropped: %s", path, n - MAX_LOGGED, reason)
        self.logged.clear()
        self.formats.append(end.format)
        self.records.append(end.records)

    def result(self, seconds: float) -> Tokenized:
        tokens = sum(len(self.store.tokens[name]) for name in TOKEN_FIELDS)
        kept, dropped = len(self.store), len(self.drops)
        logger.info(
            "tokenized %d pairs (%d tokens, %d dropped) from %d records in %.1f s: %.0f pairs/s",
            kept,
            tokens,
            dropped,
            sum(self.records),
            seconds,
            (kept + dropped) / max(seconds, 1e-9),
        )
        origins = _column(self.origins).reshape(-1, 3)
        return Tokenized(self.store.columns(), origins, self.drops, self.formats, self.records, seconds)


def tokenize_sources(
    sources: Sequence[Source],
    pair_tokenizer: PairTokenizer,
    format: str,
    columns: Mapping[str, str],
    completions: str,
) -> Tokenized:
    """Read, check and tokenize every pair of ``sources`` (see the module docstring)."""
    start = time.perf_counter()
    reader = _Reader(sources, pair_tokenizer, format, columns, completions)
    collector = _Collector(sources, pair_tokenizer)
    progress = None
    with _parallel_tokenizers():
        reader.start()
        try:
            while (item := reader.out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if progress is None:  # one bar per file
                    name = sources[item.file_index].path.name
                    progress = tqdm(desc=f"tokenizing {name}", unit=" pairs", disable=None, mininterval=1)
                if isinstance(item, _FileEnd):
                    collector.end_file(item)
                    progress.close()
                    progress = None
                    continue
                collector.add_chunk(item)
                progress.update(len(item.items))
        finally:
            reader.stopped.set()
            reader.join()
            if progress is not None:
                progress.close()
    return collector.result(time.perf_counter() - start)
