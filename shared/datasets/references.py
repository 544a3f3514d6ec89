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
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from shared.datasets.formats import checked_mapping
from shared.datasets.sources import Row, UnreadableDataset, read_rows

log = logging.getLogger(__name__)
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
    except (ValueError, RecursionError) as error:  # not UTF-8, not JSON, nested past the parser's depth
        raise _invalid(f"not a JSON object ({type(error).__name__}: {str(error)[:200]})") from None
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
        if isinstance(value.get(name), str):
            value[name] = value[name].strip()
    percent = value.get("sample_percent")
    if percent is not None and (
        isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 < percent <= 100
    ):
        raise _invalid(f"'sample_percent' is {percent!r}; expected a number above 0, at most 100")
    mapping = value.get("map", {})
    if not isinstance(mapping, dict):
        raise _invalid("'map' must be an object of <field>: <column>")
    try:
        checked = checked_mapping(mapping, lambda ours, theirs: f"'map' {ours!r}: {theirs!r}")
    except ValueError as error:
        raise _invalid(str(error)) from None
    return DatasetReference(dataset.strip(), value.get("split") or "train", value.get("config"), value.get("revision"),
                            float(percent) if percent is not None else None, checked)  # fmt: skip


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def _local_fingerprint(folder: Path) -> str:
    """What a local folder's data is, as a revision: a digest of its files' names, sizes and
    modification times (a file rewritten is another revision, even at the same size)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        facts = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{facts.st_size}\0{facts.st_mtime_ns}\n".encode())
    return f"local:{digest.hexdigest()[:16]}"


def _hub_revision(repository: str, revision: str | None) -> str:
    """The commit a revision (None: the main branch) of a Hub dataset resolves to."""
    from huggingface_hub import HfApi

    return str(HfApi().dataset_info(repository, revision=revision).sha)


def _pinned_path(reference: DatasetReference) -> tuple[str, str]:
    """An hf:// path's commit, and the path at that commit: what is recorded is what is read."""
    found = re.fullmatch(r"hf://datasets/([^/@]+/[^/@]+)(?:@([^/]+))?(/.*)?", reference.dataset)
    if not found:
        raise ValueError(f"{reference.dataset} is not an hf://datasets/<owner>/<name>[@<revision>]/<files> path")
    commit = _hub_revision(found.group(1), found.group(2) or reference.revision)
    return commit, f"hf://datasets/{found.group(1)}@{commit}{found.group(3) or '/'}"


def _split_files(builder: Any, split: str) -> list[str]:
    data_files = builder.config.data_files or {}
    if split not in data_files:
        raise ValueError(f"Bad split: {split}. Available splits: {sorted(data_files)}")
    return list(data_files[split])


def reference_rows(reference: DatasetReference, local_folders: bool = True) -> tuple[dict[str, Any], Iterator[Row]]:
    """What the reference resolved to (for the report), and its rows, streamed file by file.
    `datasets` resolves the dataset (its configuration, splits and data files, at a pinned
    revision); the files are then read as uploads are, a batch or a line at a time: iterating
    `datasets`' own streaming dataset took memory growing with the file (measured on one Parquet
    file: 497 MB peak for 0.1 GB of conversations, 707 MB for 0.4 GB). Anything that keeps the
    dataset from being read is UnreadableDataset naming the dataset and why. `local_folders`:
    whether a folder on this machine may be named (not by an upload to the app in Azure: any
    folder of its host would be read)."""
    name = reference.dataset
    if reference.local and not local_folders:
        raise _invalid(f"{name!r} is a folder on the app's machine, which an upload cannot name here: name a Hub "
                       "dataset or an hf:// path")  # fmt: skip
    try:
        import datasets
    except ImportError as error:
        raise UnreadableDataset(
            "dataset_unreachable", f"dataset references need the datasets package ({error})"
        ) from None
    datasets.disable_progress_bars()
    try:
        if reference.local:
            folder = Path(name).expanduser()
            if not folder.is_dir():
                raise FileNotFoundError(f"no folder {folder}")
            revision = _local_fingerprint(folder)
            files = _split_files(datasets.load_dataset_builder(str(folder), name=reference.config), reference.split)
        elif name.startswith("hf://"):
            from huggingface_hub import HfFileSystem

            revision, pinned = _pinned_path(reference)
            files = [f"hf://{path}" for path in sorted(HfFileSystem().glob(pinned))]
            if not files:
                raise FileNotFoundError(f"no data file matches {pinned}")
        else:
            revision = _hub_revision(name, reference.revision)
            builder = datasets.load_dataset_builder(name, name=reference.config, revision=revision)
            files = _split_files(builder, reference.split)
    except Exception as error:  # the libraries': FileNotFoundError, ConnectionError, ValueError (bad split), Hub errors
        log.info("dataset %r cannot be read", name, exc_info=True)  # the whole story, for whoever runs the app
        raise UnreadableDataset("dataset_unreachable", f"dataset {name!r} cannot be read: {_one_line(error)}") from None
    resolved = {"dataset": name, "config": reference.config, "split": reference.split, "revision": revision,
                "requested_revision": reference.revision, "sample_percent": reference.sample_percent,
                "files": len(files), "file_types": sorted({_file_type(path) for path in files})}  # fmt: skip
    return resolved, _rows(name, files)


def _file_type(path: str) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    return name.split(".", 1)[1] if "." in name else "unknown"


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
