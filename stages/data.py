"""Stage `data`: fetch DialogSum (Hub id or local directory) and write a raw JSONL snapshot.

The snapshot in data/raw/ is what DVC versions, so every later stage reads exactly the same
rows no matter where they came from. Only `data.*` params and the files in data/source (the
place for local data, a declared dependency) affect this stage: changing the prompt or
tokenization reruns `prepare`, never a fetch.

What is repaired and what is an error (nothing is dropped silently):
- empty or whitespace-only dialogue or summary: row dropped, counted as <split>_dropped_empty
  (a summary of nothing can neither be trained on nor scored);
- a train or validation dialogue that also appears in test (same text up to whitespace): row
  dropped, counted as <split>_dropped_test_overlap (it would leak the test set into training);
- missing split file, missing column, malformed line, non-UTF-8 bytes, duplicate id: error naming
  the file (and line) and the fix, because guessing would change the data set silently.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from stages.errors import StageError, run_stage
from stages.jsonio import write_json, write_jsonl
from stages.params import DataParams, load_params

SPLITS = ("train", "validation", "test")
COLUMNS = ("id", "dialogue", "summary", "topic")
REQUIRED = ("id", "dialogue", "summary")  # topic is carried when present, "" otherwise
FORMATS = (".jsonl", ".json", ".csv", ".parquet")
RAW_DIR = Path("data/raw")
STATS_FILE = Path("metrics/data.json")


class DataError(StageError):
    """Bad input data; the message names the file (and line) and what to fix."""


def find_split_file(directory: Path, split: str) -> Path:
    """The one file `<split>.<ext>` in `directory`, ext in FORMATS."""
    found = [directory / f"{split}{ext}" for ext in FORMATS if (directory / f"{split}{ext}").is_file()]
    if not found:
        raise DataError(
            f"{directory}: no {split} split; expected one of " + ", ".join(f"{split}{ext}" for ext in FORMATS)
        )
    if len(found) > 1:
        raise DataError(
            f"{directory}: several files for the {split} split ({', '.join(p.name for p in found)}); keep one"
        )
    return found[0]


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: malformed JSON line ({error.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def read_json(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: malformed JSON ({error.msg})") from None
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise DataError(f"{path}: expected a JSON list of objects (or use .jsonl, one object per line)")
    return data


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq  # imported here: only parquet inputs need it

    return pq.read_table(path).to_pylist()


READERS = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet}


def read_split_file(path: Path) -> list[dict]:
    try:
        return READERS[path.suffix](path)
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); re-encode the file as UTF-8"
        ) from None


def load_local(directory: Path) -> dict[str, list[dict]]:
    return {split: read_split_file(find_split_file(directory, split)) for split in SPLITS}


def load_hub(source: str, revision: str) -> dict[str, list[dict]]:
    import datasets  # imported here: local sources never touch the Hub client

    from stages.progress import download_progress  # here too: it imports transformers (seconds)

    try:
        with download_progress(f"{source}@{revision}"):
            dataset = datasets.load_dataset(source, revision=revision)
    except Exception as error:  # the Hub client raises many types for "offline" and "not found"
        raise DataError(
            f"could not load dataset {source!r} (revision {revision!r}) from the Hugging Face Hub: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n"
            "If you are offline, point data.source at a local directory holding train, validation "
            "and test files (.jsonl, .json, .csv or .parquet), e.g. dvc exp run -S data.source=path/to/dir"
        ) from None
    missing = [split for split in SPLITS if split not in dataset]
    if missing:
        raise DataError(f"dataset {source!r} has no split(s) {', '.join(missing)}; found {', '.join(dataset)}")
    return {split: dataset[split].to_list() for split in SPLITS}


def clean_split(rows: list[dict], split: str, origin: str) -> tuple[list[dict], int]:
    """Keep COLUMNS as stripped strings; drop (and count) rows with an empty dialogue or summary."""
    if rows:
        missing = [c for c in REQUIRED if c not in rows[0]]
        if missing:
            raise DataError(f"{origin}: {split} split lacks column(s) {', '.join(missing)}; found {', '.join(rows[0])}")
    kept, dropped = [], 0
    for row in rows:
        record = {c: str(row.get(c) or "").strip() for c in COLUMNS}
        if not record["dialogue"] or not record["summary"]:
            dropped += 1
            continue
        kept.append(record)
    ids = [r["id"] for r in kept]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{origin}: {split} split has duplicate id {duplicate!r}; ids must be unique")
    return kept, dropped


def normalize(text: str) -> str:
    return " ".join(text.split())


def drop_test_overlap(rows: list[dict], test_rows: list[dict]) -> tuple[list[dict], int]:
    """Rows whose dialogue does not appear in the test split, and how many were dropped."""
    test_dialogues = {normalize(r["dialogue"]) for r in test_rows}
    kept = [r for r in rows if normalize(r["dialogue"]) not in test_dialogues]
    return kept, len(rows) - len(kept)


def fetch(params: DataParams) -> dict[str, list[dict]]:
    local = Path(params.source)
    if local.is_dir():
        return load_local(local)
    return load_hub(params.source, params.revision)


def resolved_revision(params: DataParams) -> str:
    """What the data came from, exactly: the Hub commit the revision points to now, or a content
    hash (sha256 over file names and bytes) of a local directory's split files. Recorded in
    metrics/data.json, so a moved Hub branch or an edited local file shows in `dvc metrics diff`."""
    local = Path(params.source)
    if local.is_dir():
        digest = hashlib.sha256()
        for path in sorted(find_split_file(local, split) for split in SPLITS):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        return "sha256:" + digest.hexdigest()
    from huggingface_hub import HfApi, snapshot_download

    try:
        sha = HfApi().dataset_info(params.source, revision=params.revision).sha
    except Exception:  # offline or unreachable: the cached snapshot's commit, if any
        sha = None
    if sha is None:
        try:
            return Path(
                snapshot_download(params.source, repo_type="dataset", revision=params.revision, local_files_only=True)
            ).name
        except Exception:
            return "unresolved (offline, not in the Hub cache)"
    return sha


def main() -> None:
    params = load_params()
    splits = fetch(params.data)
    cleaned: dict[str, list[dict]] = {}
    stats: dict[str, str | int] = {
        "source": params.data.source,
        "source_revision": params.data.revision,
        "source_resolved_revision": resolved_revision(params.data),
    }
    for split in SPLITS:
        cleaned[split], stats[f"{split}_dropped_empty"] = clean_split(splits[split], split, params.data.source)
    for split in ("train", "validation"):
        cleaned[split], stats[f"{split}_dropped_test_overlap"] = drop_test_overlap(cleaned[split], cleaned["test"])
    for split in SPLITS:
        rows = cleaned[split][: params.data.limit]  # None keeps all
        write_jsonl(rows, RAW_DIR / f"{split}.jsonl")
        stats[f"{split}_rows"] = len(rows)
    write_json(stats, STATS_FILE)
    print(json.dumps(stats))


if __name__ == "__main__":
    run_stage(main)
