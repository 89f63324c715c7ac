"""Stage `data`: fetch DialogSum or a user's own data (Hub id or local directory) and write a raw
JSONL snapshot.

The snapshot in data/raw/ is what DVC versions, so every later stage reads exactly the same
rows no matter where they came from. Only `data.*` params and the files in data/source (the
place for local data, a declared dependency) affect this stage: changing the prompt or
tokenization reruns `prepare`, never a fetch.

Other shapes of data:
- other column names: `data.columns` maps the pipeline's columns (id, dialogue, summary, topic) to
  the source's, for local files and Hub datasets alike; the snapshot always has the pipeline's names;
- no id column: ids are derived as <split>-<row index in the source split> (recorded as
  ids_derived); no topic column: topic is "";
- no validation or test split (only train is required): the missing ones are split off train by
  dialogue (rows with the same dialogue text up to whitespace, e.g. several references, stay
  together), `data.validation_size` / `data.test_size` of train's distinct dialogues each, drawn by
  `data.split_seed`; recorded as validation_split_off / test_split_off and split_seed.

What is repaired and what is an error (nothing is dropped silently):
- empty or whitespace-only dialogue or summary: row dropped, counted as <split>_dropped_empty
  (a summary of nothing can neither be trained on nor scored);
- a train or validation dialogue that also appears in test (same text up to whitespace): row
  dropped, counted as <split>_dropped_test_overlap (it would leak the test set into training);
- no train split, missing column, malformed line, non-UTF-8 bytes, duplicate id: error naming
  the file (and line) and the fix, because guessing would change the data set silently.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Mapping, NamedTuple

from stages.errors import StageError, run_stage
from stages.jsonio import write_json, write_jsonl
from stages.params import DataParams, load_params

SPLITS = ("train", "validation", "test")
COLUMNS = DataParams.COLUMNS  # id, dialogue, summary, topic: the snapshot's names
REQUIRED = ("dialogue", "summary")  # id is derived when absent, topic "" (unless mapped to other names)
FORMATS = (".jsonl", ".json", ".csv", ".parquet")
RAW_DIR = Path("data/raw")
STATS_FILE = Path("metrics/data.json")


class DataError(StageError):
    """Bad input data; the message names the file (and line) and what to fix."""


def find_split_file(directory: Path, split: str) -> Path | None:
    """The one file `<split>.<ext>` in `directory`, ext in FORMATS; None if there is none (a missing
    validation or test split is split off train; a missing train is an error, see split_files)."""
    found = [directory / f"{split}{ext}" for ext in FORMATS if (directory / f"{split}{ext}").is_file()]
    if not found:
        return None
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


def split_files(directory: Path) -> dict[str, Path]:
    """The split files `directory` has, by split; train is required."""
    files = {split: path for split in SPLITS if (path := find_split_file(directory, split)) is not None}
    if "train" not in files:
        raise DataError(
            f"{directory}: no train split; expected one of "
            + ", ".join(f"train{ext}" for ext in FORMATS)
            + " (validation and test, when missing, are split off train)"
        )
    return files


def load_local(directory: Path) -> dict[str, list[dict]]:
    return {split: read_split_file(path) for split, path in split_files(directory).items()}


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
            "If you are offline, point data.source at a local directory holding a train file and, "
            "optionally, validation and test files (.jsonl, .json, .csv or .parquet), "
            "e.g. dvc exp run -S data.source=path/to/dir"
        ) from None
    if "train" not in dataset:
        raise DataError(
            f"dataset {source!r} has no train split; found {', '.join(dataset) or 'none'} "
            "(validation and test, when missing, are split off train)"
        )
    return {split: dataset[split].to_list() for split in SPLITS if split in dataset}


class Cleaned(NamedTuple):
    rows: list[dict]  # the pipeline's COLUMNS, stripped strings
    dropped_empty: int
    ids_derived: bool  # the split had no id column: ids are <split>-<row index in the source split>


def clean_split(rows: list[dict], split: str, origin: str, columns: Mapping[str, str] | None = None) -> Cleaned:
    """Keep COLUMNS, read from the source's columns `columns` maps them to (a column not named there
    keeps its own name), as stripped strings; drop (and count) rows with an empty dialogue or summary.
    Dialogue and summary must exist, as must a column mapped to another name than its own; an id or
    topic under its own name may be absent (the id is then derived, the topic "")."""
    source = {c: (columns or {}).get(c, c) for c in COLUMNS}
    ids_derived = bool(rows) and source["id"] == "id" and "id" not in rows[0]
    if rows:
        missing = [c for c in COLUMNS if source[c] not in rows[0] and (source[c] != c or c in REQUIRED)]
        if missing:
            named = ", ".join(f"{source[c]!r} (data.columns.{c})" if source[c] != c else c for c in missing)
            raise DataError(
                f"{origin}: {split} split lacks column(s) {named}; found {', '.join(map(str, rows[0]))}; "
                "map each to its column in the source with "
                + " ".join(f"-S data.columns.{c}=<column>" for c in missing)
            )
    kept, dropped = [], 0
    for index, row in enumerate(rows):
        record = {c: str(row.get(source[c]) or "").strip() for c in COLUMNS}
        if ids_derived:
            record["id"] = f"{split}-{index}"
        if not record["dialogue"] or not record["summary"]:
            dropped += 1
            continue
        kept.append(record)
    ids = [r["id"] for r in kept]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{origin}: {split} split has duplicate id {duplicate!r}; ids must be unique")
    return Cleaned(kept, dropped, ids_derived)


def normalize(text: str) -> str:
    return " ".join(text.split())


def drop_test_overlap(rows: list[dict], test_rows: list[dict]) -> tuple[list[dict], int]:
    """Rows whose dialogue does not appear in the test split, and how many were dropped."""
    test_dialogues = {normalize(r["dialogue"]) for r in test_rows}
    kept = [r for r in rows if normalize(r["dialogue"]) not in test_dialogues]
    return kept, len(rows) - len(kept)


def split_off(rows: list[dict], sizes: Mapping[str, float], seed: int, origin: str) -> dict[str, list[dict]]:
    """Train's rows split by dialogue: each split in `sizes` gets that fraction of the distinct
    dialogues (normalized text; at least one), the rest stays train. Dialogues are ranked by a
    seeded hash of their text, so the split depends only on the seed and the dialogue texts (not
    the row order), a dialogue's rows (its references) never straddle splits, and each split keeps
    the source's row order."""
    groups = list(dict.fromkeys(normalize(r["dialogue"]) for r in rows))
    counts = {split: max(1, round(len(groups) * size)) for split, size in sizes.items()}
    if sum(counts.values()) >= len(groups):
        raise DataError(
            f"{origin}: train has {len(groups)} distinct dialogue(s), too few to split off "
            f"{' and '.join(counts)} ({' + '.join(map(str, counts.values()))} dialogues) and keep some to "
            f"train on; add rows, or give the source its own {' and '.join(counts)} split(s)"
        )
    ranked = sorted(groups, key=lambda text: hashlib.sha256(f"{seed}\0{text}".encode()).hexdigest())
    assigned: dict[str, str] = {}  # dialogue text -> the split it moves to; the rest stays train
    start = 0
    for split, count in counts.items():
        assigned.update((text, split) for text in ranked[start : start + count])
        start += count
    parts: dict[str, list[dict]] = {"train": [], **{split: [] for split in sizes}}
    for row in rows:
        parts[assigned.get(normalize(row["dialogue"]), "train")].append(row)
    return parts


def dialogue_count(rows: list[dict]) -> int:
    return len({normalize(r["dialogue"]) for r in rows})


def fetch(params: DataParams) -> dict[str, list[dict]]:
    local = Path(params.source)
    if local.is_dir():
        return load_local(local)
    return load_hub(params.source, params.revision)


def resolved_revision(params: DataParams) -> str:
    """What the data came from, exactly: the Hub commit the revision points to now, or a content
    hash (sha256 over file names and bytes) of a local directory's split files, whichever exist.
    Recorded in metrics/data.json, so a moved Hub branch or an edited, added or removed local file
    shows in `dvc metrics diff`."""
    local = Path(params.source)
    if local.is_dir():
        digest = hashlib.sha256()
        for path in sorted(split_files(local).values()):
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


def clean_splits(splits: dict[str, list[dict]], data: DataParams, stats: dict) -> dict[str, list[dict]]:
    """Each split the source has, cleaned (clean_split), with train and validation rows whose dialogue
    is in test dropped; the counts go to `stats`, with ids_derived."""
    cleaned, ids_derived = {}, False
    for split in SPLITS:
        stats[f"{split}_dropped_empty"] = 0
        if split in splits:
            result = clean_split(splits[split], split, data.source, data.columns)
            cleaned[split], stats[f"{split}_dropped_empty"] = result.rows, result.dropped_empty
            ids_derived = ids_derived or result.ids_derived
    for split in ("train", "validation"):
        stats[f"{split}_dropped_test_overlap"] = 0
        if split in cleaned and "test" in cleaned:
            cleaned[split], stats[f"{split}_dropped_test_overlap"] = drop_test_overlap(cleaned[split], cleaned["test"])
    stats["ids_derived"] = ids_derived
    return cleaned


def fill_missing_splits(cleaned: dict[str, list[dict]], data: DataParams, stats: dict) -> None:
    """Validation and test, where the source lacks them, split off train (split_off); recorded in `stats`."""
    sizes = {"validation": data.validation_size, "test": data.test_size}
    missing = {split: sizes[split] for split in sizes if split not in cleaned}
    had_validation = "validation" in cleaned
    if missing:
        cleaned.update(split_off(cleaned["train"], missing, data.split_seed, data.source))
        print(f"{data.source}: no {' or '.join(missing)} split; split off train (data.split_seed={data.split_seed})")
    if "test" in missing and had_validation:  # the source's own validation vs a test split off train
        cleaned["validation"], dropped = drop_test_overlap(cleaned["validation"], cleaned["test"])
        stats["validation_dropped_test_overlap"] += dropped
    stats["validation_split_off"] = "validation" in missing
    stats["test_split_off"] = "test" in missing
    stats["split_seed"] = data.split_seed if missing else None  # None: the source had every split


def main() -> None:
    data = load_params().data
    stats: dict[str, str | int | bool | None] = {
        "source": data.source,
        "source_revision": data.revision,
        "source_resolved_revision": resolved_revision(data),
    }
    cleaned = clean_splits(fetch(data), data, stats)
    fill_missing_splits(cleaned, data, stats)
    for split in SPLITS:
        rows = cleaned[split][: data.limit]  # None keeps all
        write_jsonl(rows, RAW_DIR / f"{split}.jsonl")
        stats[f"{split}_rows"] = len(rows)
        stats[f"{split}_dialogues"] = dialogue_count(rows)
    write_json(stats, STATS_FILE)
    print(json.dumps(stats))


if __name__ == "__main__":
    run_stage(main)
