"""Reading preference sources record by record, without loading a file whole.

JSONL and JSON arrays are parsed incrementally; Parquet is read in row batches; a ``datasets``
``save_to_disk`` directory is read from its memory-mapped Arrow files (``datasets`` is not needed).
Records are numbered from 1 by line (JSONL: the line; JSON: the line the record starts on) or by row
(Parquet, Arrow), so every error names where it is. Entries naming a dataset by id (``{hub: ...}``) are
read by ``preftune.data.hub``; an entry's ``weight`` is used by ``preftune.data.mixture``.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from preftune.data.hub import HubSource, hub_source
from preftune.errors import DataError

ROW_BATCH = 1024  # Parquet rows converted to Python at a time
MAX_JSON_RECORD = 64 << 20  # characters one JSON-array record may span before it is called invalid
_WHITESPACE = " \t\r\n"
SourceSpec = str | Path | Mapping[str, Any]  # a path, {path: P, weight: W} or {hub: ID, ...}


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line; bad JSON or non-objects raise DataError."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{line_no}: invalid JSON: {e.msg} (column {e.colno}); each line must be one "
                    f"JSON object"
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}; each line must "
                    f"be one JSON object"
                )
            yield line_no, record


class _JsonText:
    """A UTF-8 file decoded chunk by chunk, with the line number of the read position."""

    def __init__(self, path: Path, chunk_size: int):
        self.path, self.chunk_size = path, chunk_size
        self.file = path.open("rb")
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.pos, self.line = "", 0, 1
        self.raw_lines = 0  # newlines in the bytes read so far
        self.eof = False

    def fill(self) -> bool:
        """Append the next chunk to the buffer; False at the end of the file."""
        if self.eof:
            return False
        raw = self.file.read(self.chunk_size)
        pending = len(self.decoder.getstate()[0])
        try:
            text = self.decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            line = self.raw_lines + raw[: max(0, e.start - pending)].count(b"\n") + 1
            raise DataError(
                f"{self.path}:{line}: not valid UTF-8 ({e.reason}); save the file as UTF-8"
            ) from None
        self.raw_lines += raw.count(b"\n")
        self.eof = not raw
        self.buf, self.pos = self.buf[self.pos :] + text, 0
        return bool(raw)

    def advance(self, end: int) -> None:
        self.line += self.buf.count("\n", self.pos, end)
        self.pos = end

    def peek(self) -> str:
        """The next non-whitespace character ('' at the end of the file), without consuming it."""
        while True:
            end = self.pos
            while end < len(self.buf) and self.buf[end] in _WHITESPACE:
                end += 1
            self.advance(end)
            if self.pos < len(self.buf) or not self.fill():
                return self.buf[self.pos : self.pos + 1]

    def value(self, decoder: json.JSONDecoder) -> object:
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if len(self.buf) - self.pos < MAX_JSON_RECORD and self.fill():
                    continue  # the record may just continue in the next chunk
                line = self.line + self.buf.count("\n", self.pos, e.pos)
                raise DataError(f"{self.path}:{line}: invalid JSON: {e.msg}; fix the record there") from None
            if end == len(self.buf) and self.fill():
                continue  # a number or literal may go on in the next chunk
            self.advance(end)
            return value


def read_json_array(path: Path, chunk_size: int = 1 << 20) -> Iterator[tuple[int, dict]]:
    """Yield (line the record starts on, record) for each object of a file holding one JSON array."""
    text = _JsonText(path, chunk_size)
    decoder = json.JSONDecoder()
    try:
        first = text.peek()
        if not first:
            return
        if first != "[":
            raise DataError(
                f"{path}:{text.line}: a .json file must hold one JSON array of records ([{{...}}, ...]); "
                f"for one record per line name the file .jsonl"
            )
        text.advance(text.pos + 1)
        if text.peek() == "]":
            return
        while True:
            text.peek()
            line = text.line
            record = text.value(decoder)
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line}: expected a JSON object, got {type(record).__name__}")
            yield line, record
            sep = text.peek()
            if sep == "]":
                break
            if sep != ",":
                raise DataError(f"{path}:{text.line}: invalid JSON: expected ',' or ']' after a record")
            text.advance(text.pos + 1)
        text.advance(text.pos + 1)
        if text.peek():
            raise DataError(f"{path}:{text.line}: invalid JSON: text after the closing ']'")
    finally:
        text.file.close()


@dataclass(frozen=True)
class Source:
    """One input: a ``.jsonl``, ``.json`` or ``.parquet`` file or a ``save_to_disk`` directory."""

    path: Path
    kind: str  # jsonl | json | parquet | arrow
    weight: float = 1.0  # times each of its pairs is drawn per epoch (``preftune.data.mixture``)

    def where(self, n: int) -> str:
        return f"{self.path}:{n}" if self.kind in ("jsonl", "json") else f"{self.path}: row {n}"

    def files(self) -> list[Path]:
        """The files that hold the data (their bytes key the tokenization cache)."""
        if self.kind != "arrow":
            return [self.path]
        state = self.path / "state.json"
        try:
            names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(
                f"{state}: not a datasets state.json ({_one_line(e)}); save the dataset again"
            ) from None
        return [state, *(self.path / name for name in names)]

    def cache_key(self) -> list[str]:
        """The digests of its files: the tokenization cache is keyed by their content."""
        return [file_digest(f) for f in self.files()]

    def num_records(self) -> int | None:
        """The record count where the file says it without being read (Parquet, Arrow)."""
        if self.kind == "parquet":
            return self._parquet().metadata.num_rows
        if self.kind == "arrow":
            return sum(batch.num_rows for file in self.files()[1:] for batch in self._arrow_batches(file))
        return None

    def records(self) -> Iterator[tuple[int, dict]]:
        if self.kind == "jsonl":
            yield from read_jsonl(self.path)
        elif self.kind == "json":
            yield from read_json_array(self.path)
        elif self.kind == "parquet":
            yield from self._rows(self.path, self._parquet().iter_batches(batch_size=ROW_BATCH), 0)
        else:
            row = 0
            for file in self.files()[1:]:
                row = yield from self._rows(file, self._arrow_batches(file), row)

    def _parquet(self) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(self.path, memory_map=True)
        except (pa.ArrowException, OSError) as e:
            raise DataError(
                f"{self.path}: cannot read as Parquet ({_one_line(e)}); re-export it, e.g. with "
                f"pandas.DataFrame.to_parquet or datasets.Dataset.to_parquet"
            ) from None

    @staticmethod
    def _arrow_batches(file: Path) -> Iterator[pa.RecordBatch]:
        try:
            with pa.memory_map(str(file)) as mapped:
                yield from pa.ipc.open_stream(mapped)
        except (pa.ArrowException, OSError) as e:
            raise DataError(
                f"{file}: cannot read the Arrow data ({_one_line(e)}); save the dataset again with "
                f"Dataset.save_to_disk"
            ) from None

    @staticmethod
    def _rows(
        file: Path, batches: Iterator[pa.RecordBatch], row: int
    ) -> Generator[tuple[int, dict], None, int]:
        """Yield (row, record) numbering on from ``row``; return the last row number."""
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return row
            except (pa.ArrowException, OSError) as e:
                raise DataError(
                    f"{file}: row {row + 1}: cannot read ({_one_line(e)}); re-export the file"
                ) from None
            for record in batch.to_pylist():
                row += 1
                yield row, record


def resolve_sources(
    spec: SourceSpec | Sequence[SourceSpec], key: str = "data.train"
) -> list[Source | HubSource]:
    """``data.train`` / ``data.validation`` (``key``, named in errors with the entry's index in a list): one
    entry or a list of them. An entry is a path, ``{path: P}`` or ``{hub: ID, ...}`` (``preftune.data.hub``),
    each mapping with an optional ``weight``."""
    single = isinstance(spec, (str, Path, Mapping))
    entries = [spec] if single else list(spec)
    if not entries:
        raise DataError(f"{key}: no data files given: set it to a file, a directory or a list of them")
    sources: list[Source | HubSource] = []
    for index, entry in enumerate(entries):
        name = key if single else f"{key}[{index}]"
        if not isinstance(entry, Mapping):
            sources.append(_file_source(Path(entry), 1.0, name))
            continue
        weight = _weight(entry, name)
        if "hub" in entry:
            sources.append(hub_source(entry, weight))
        elif set(entry) <= {"path", "weight"} and "path" in entry:
            sources.append(_file_source(Path(entry["path"]), weight, name))
        else:
            raise DataError(
                f"{name}: data source {dict(entry)}: give a path, {{path: FILE, weight: W}} or "
                f"{{hub: DATASET, split: SPLIT, weight: W}}"
            )
    return sources


def _weight(entry: Mapping[str, Any], name: str) -> float:
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
        raise DataError(
            f"{name}: data source {dict(entry)}: weight must be a number >= 0 (times drawn per epoch)"
        )
    return float(weight)


def _file_source(path: Path, weight: float, name: str) -> Source:
    """The file or ``save_to_disk`` directory at ``path``, the entry ``name`` (e.g. ``data.train[1]``)."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise DataError(
                f"{name}: {path} holds a DatasetDict (splits: {', '.join(splits)}); point it at one split's "
                f"directory, e.g. {path / (splits or ['train'])[0]}"
            )
        if not (path / "state.json").is_file():
            raise DataError(
                f"{name}: {path}: a directory must be written by datasets' Dataset.save_to_disk (it has no "
                f"state.json); otherwise list its .jsonl, .json or .parquet files, or load it with "
                f"{{hub: {path}, split: train}}"
            )
        return Source(path, "arrow", weight)
    if not path.is_file():
        raise DataError(f"{name}: data file not found: {path}")
    if path.suffix in (".jsonl", ".json", ".parquet"):
        return Source(path, path.suffix[1:], weight)
    raise DataError(
        f"{name}: {path}: unsupported file type '{path.suffix}'; use .jsonl, .json (an array of records), "
        f".parquet or a datasets save_to_disk directory"
    )


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
