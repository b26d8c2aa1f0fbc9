"""Datasets named by id, read through ``datasets.load_dataset``: a Hub dataset, a local dataset directory or a
packaged builder with ``data_files`` (``{hub: json, data_files: [a.jsonl]}``).

A config entry ``{hub: ID, split: S, name: CONFIG, revision: REV, data_files: ..., streaming: false}`` becomes
a ``HubSource``. Rows are numbered from 1, so errors read ``ID[S]: row N``. The tokenization cache is keyed
by the fingerprint ``datasets`` gives the split (its cache directory: dataset, config, version and the
revision's commit hash), read from the builder without downloading the data, so an unchanged revision is
a cache hit and a new one is tokenized again.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import PurePosixPath
from typing import Any

from preftune.errors import DataError

HUB_KEYS = ("hub", "split", "name", "revision", "data_files", "streaming", "weight")


@dataclass(frozen=True)
class HubSource:
    """One split of a dataset ``datasets.load_dataset`` can load."""

    dataset: str
    split: str = "train"
    name: str | None = None  # the dataset's config (load_dataset's ``name``)
    revision: str | None = None
    data_files: Any = None  # load_dataset's data_files: a path, a list, or {split: paths}
    streaming: bool = False
    weight: float = 1.0

    @property
    def label(self) -> str:
        """``ID[split]`` or ``ID/config[split]`` (with ``@revision`` when pinned)."""
        config = f"/{self.name}" if self.name else ""
        revision = f"@{self.revision}" if self.revision else ""
        return f"{self.dataset}{config}{revision}[{self.split}]"

    @property
    def path(self) -> PurePosixPath:
        """The label where a file source has its path (reports, the cache file's name)."""
        return PurePosixPath(self.label)

    def where(self, n: int) -> str:
        return f"{self.label}: row {n}"

    def _load_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"path": self.dataset, "name": self.name, "revision": self.revision}
        if self.data_files is not None:
            args["data_files"] = self.data_files
        return args

    def cache_key(self) -> list[Any]:
        """The split's ``datasets`` fingerprint (changes with the revision or the local files)."""
        datasets = _datasets()
        try:
            builder = datasets.load_dataset_builder(**self._load_args())
        except Exception as e:  # load_dataset's errors span many types; each becomes one line
            raise self._load_error(e) from None
        return [self.label, builder._get_dataset_fingerprint(self.split)]

    @cached_property
    def _loaded(self) -> Any:
        datasets = _datasets()
        try:
            return datasets.load_dataset(**self._load_args(), split=self.split, streaming=self.streaming)
        except Exception as e:
            raise self._load_error(e) from None

    def num_records(self) -> int | None:
        if self.streaming:
            splits = self._loaded.info.splits
            return splits[self.split].num_examples if splits and self.split in splits else None
        return self._loaded.num_rows

    def records(self) -> Iterator[tuple[int, dict]]:
        yield from enumerate(self._loaded, start=1)

    def _load_error(self, error: Exception) -> DataError:
        message = " ".join(str(error).split()) or type(error).__name__
        hint = ""
        missing = isinstance(error, (ConnectionError, FileNotFoundError)) or "find cache" in message
        if missing and _datasets().config.HF_HUB_OFFLINE:
            hint = (
                f"; offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) a dataset must already be in the datasets "
                f"cache ({_datasets().config.HF_DATASETS_CACHE}): load it once online"
            )
        return DataError(f"dataset {self.label}: cannot load it: {message}{hint}")


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "data sources given as {hub: ...} are read with the datasets library: "
            "pip install 'preftune[datasets]'"
        ) from None
    return datasets


def hub_source(entry: Mapping[str, Any], weight: float) -> HubSource:
    """The source a ``{hub: ...}`` config entry names (its keys checked; ``weight`` checked by the caller)."""
    unknown = sorted(set(entry) - set(HUB_KEYS))
    if unknown:
        raise DataError(
            f"data source {dict(entry)}: unknown key '{unknown[0]}'; a {{hub: ...}} entry takes "
            f"{', '.join(HUB_KEYS)}"
        )
    if not isinstance(entry["hub"], str) or not entry["hub"]:
        raise DataError(f"data source {dict(entry)}: hub must be a dataset id, directory or builder name")
    streaming = entry.get("streaming", False)
    if not isinstance(streaming, bool):
        raise DataError(f"data source {entry['hub']}: streaming must be true or false")
    data_files = entry.get("data_files")
    if data_files is not None and not isinstance(data_files, str):  # a list or a {split: files} mapping
        data_files = (
            {k: v if isinstance(v, str) else list(v) for k, v in data_files.items()}
            if isinstance(data_files, Mapping)
            else list(data_files)
        )
    return HubSource(
        dataset=entry["hub"],
        split=str(entry.get("split") or "train"),
        name=None if entry.get("name") is None else str(entry["name"]),
        revision=None if entry.get("revision") is None else str(entry["revision"]),
        data_files=data_files,
        streaming=streaming,
        weight=weight,
    )
