"""Datasets by reference: an upload named `*.hfdataset.json` names a dataset instead of holding it,

    {"dataset": "HuggingFaceH4/ultrachat_200k", "split": "train_sft", "sample_percent": 5,
     "revision": "...", "config": null, "map": {"user": "question"}}

and is prepared from its data files, found by the `datasets` library and read a batch at a time
(nothing is loaded whole): a Hugging Face Hub dataset (its revision resolved to a commit and
recorded), a folder of data files on this machine, or an `hf://` path (glob) of data files.
`sample_percent` keeps that share of the conversations by the same deterministic hash as
DATASET_SAMPLE_PERCENT; `map` is a column mapping, as the `map_<field>` metadata of an upload."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from shared.datasets.formats import MAPPABLE
from shared.datasets.sources import Row, UnreadableDataset, read_rows

REFERENCE_SUFFIX = ".hfdataset.json"
MAX_REFERENCE_BYTES = 64 * 1024
_FIELDS = {"dataset", "split", "config", "revision", "sample_percent", "map"}


def is_reference(name: str) -> bool:
    return name.lower().endswith(REFERENCE_SUFFIX)


@dataclass(frozen=True)
class DatasetReference:
    dataset: str  # a Hub id (owner/name), a local folder, or an hf:// path of data files
    split: str = "train"
    config: str | None = None
    revision: str | None = None
    sample_percent: float | None = None
    map: dict[str, str] = field(default_factory=dict)

    @property
    def local(self) -> bool:
        return self.dataset.startswith(("/", ".", "~")) or os.path.isdir(self.dataset)


def _invalid(message: str) -> UnreadableDataset:
    return UnreadableDataset("reference_invalid", f"dataset reference: {message}")


def parse_reference(data: bytes) -> DatasetReference:
    """The reference, every field checked; UnreadableDataset naming the field that is wrong."""
    if len(data) > MAX_REFERENCE_BYTES:
        raise _invalid(f"the file is over {MAX_REFERENCE_BYTES // 1024} KB: a reference names a dataset, it holds none")
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _invalid(f"not a JSON object ({error})") from None
    if not isinstance(value, dict):
        raise _invalid("not a JSON object")
    unknown = sorted(set(value) - _FIELDS)
    if unknown:
        raise _invalid(f"unknown field(s) {', '.join(unknown)}: known ones are {', '.join(sorted(_FIELDS))}")
    dataset = value.get("dataset")
    if not isinstance(dataset, str) or not dataset.strip():
        raise _invalid(
            "'dataset' must name a dataset: a Hub id such as HuggingFaceH4/ultrachat_200k, a folder, or an hf:// path"
        )
    for name in ("split", "config", "revision"):
        if value.get(name) is not None and (not isinstance(value[name], str) or not value[name].strip()):
            raise _invalid(f"'{name}' must be a non-empty string")
    percent = value.get("sample_percent")
    if percent is not None and (
        isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 < percent <= 100
    ):
        raise _invalid(f"'sample_percent' is {percent!r}; expected a number above 0, at most 100")
    mapping = value.get("map") or {}
    if not isinstance(mapping, dict) or any(not isinstance(v, str) or k not in MAPPABLE for k, v in mapping.items()):
        raise _invalid(f"'map' must be an object of <field>: <column>, <field> one of {', '.join(MAPPABLE)}")
    return DatasetReference(dataset.strip(), value.get("split") or "train", value.get("config"), value.get("revision"),
                            float(percent) if percent is not None else None, dict(mapping))  # fmt: skip


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def _local_fingerprint(folder: Path) -> str:
    """What a local folder's data is, as a revision: a digest of its files' names and sizes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}\0{path.stat().st_size}\n".encode())
    return f"local:{digest.hexdigest()[:16]}"


def _hub_revision(reference: DatasetReference) -> str:
    """The commit the reference's revision (or the main branch) resolves to on the Hub."""
    from huggingface_hub import HfApi

    repository = reference.dataset
    if repository.startswith("hf://"):
        found = re.match(r"hf://datasets/([^/@]+/[^/@]+)(?:@([^/]+))?", repository)
        if not found:
            raise ValueError(f"{repository} is not an hf://datasets/<owner>/<name>/... path")
        repository = found.group(1)
        revision = found.group(2) or reference.revision
    else:
        revision = reference.revision
    return str(HfApi().dataset_info(repository, revision=revision).sha)


def _split_files(builder: Any, split: str) -> list[str]:
    data_files = builder.config.data_files or {}
    if split not in data_files:
        raise ValueError(f"Bad split: {split}. Available splits: {sorted(data_files)}")
    return list(data_files[split])


def reference_rows(reference: DatasetReference) -> tuple[dict[str, Any], Iterator[Row]]:
    """What the reference resolved to (for the report), and its rows, streamed file by file.
    `datasets` resolves the dataset (its configuration, splits and data files, at a pinned
    revision); the files are then read as uploads are, a batch or a line at a time: iterating
    `datasets`' own streaming dataset took memory growing with the file (measured on one Parquet
    file: 497 MB peak for 0.1 GB of conversations, 707 MB for 0.4 GB). Anything that keeps the
    dataset from being read is UnreadableDataset naming the dataset and why."""
    import datasets

    datasets.disable_progress_bars()
    name = reference.dataset
    try:
        if reference.local:
            folder = Path(name).expanduser()
            if not folder.is_dir():
                raise FileNotFoundError(f"no folder {folder}")
            revision = _local_fingerprint(folder)
            files = _split_files(datasets.load_dataset_builder(str(folder), name=reference.config), reference.split)
        elif name.startswith("hf://"):
            from huggingface_hub import HfFileSystem

            revision = _hub_revision(reference)
            files = [f"hf://{path}" for path in sorted(HfFileSystem().glob(name))]
            if not files:
                raise FileNotFoundError(f"no data file matches {name}")
        else:
            revision = _hub_revision(reference)
            builder = datasets.load_dataset_builder(name, name=reference.config, revision=revision)
            files = _split_files(builder, reference.split)
    except Exception as error:  # the library's own: FileNotFoundError, ConnectionError, ValueError (bad split)...
        raise UnreadableDataset("dataset_unreachable", f"dataset {name!r} cannot be read: {_one_line(error)}") from None
    resolved = {"dataset": name, "config": reference.config, "split": reference.split, "revision": revision,
                "requested_revision": reference.revision, "sample_percent": reference.sample_percent,
                "files": len(files)}  # fmt: skip
    return resolved, _rows(name, files)


def _open(path: str) -> IO[bytes]:
    if "://" not in path:
        return open(path, "rb")  # closed by the caller's with
    import fsspec

    opened: IO[bytes] = fsspec.open(path, "rb").open()
    return opened


def _rows(name: str, files: list[str]) -> Iterator[Row]:
    """The rows of every data file of the split, in order, numbered across them."""
    line = 0
    for path in files:
        try:
            with _open(path) as handle:
                for row in read_rows(handle, path)[1]:
                    line += 1
                    yield Row(line, row.value, row.raw, row.error)
        except UnreadableDataset as error:
            raise UnreadableDataset(error.category, f"dataset {name!r}, {Path(path).name}: {error}") from None
        except Exception as error:  # a file that cannot be fetched, the connection lost midway
            raise UnreadableDataset(
                "dataset_unreachable",
                f"dataset {name!r} failed after row {line} ({Path(path).name}): {_one_line(error)}",
            ) from None
