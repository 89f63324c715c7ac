"""The data stage: every input format, the stats it records, and clear errors on bad files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from stages.data import DataError, clean_split, drop_test_overlap, load_local, read_split_file
from tests.conftest import REPO, dialogsum_rows, write_jsonl


def write_split(directory, split, rows, fmt):
    path = directory / f"{split}.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_each_format_loads_the_same_rows(tmp_path, fmt):
    expected = {
        split: dialogsum_rows(split, 3, references=3 if split == "test" else 1)
        for split in ("train", "validation", "test")
    }
    for split, rows in expected.items():
        write_split(tmp_path, split, rows, fmt)
    loaded = load_local(tmp_path)
    for split, rows in expected.items():
        cleaned, dropped = clean_split(loaded[split], split, str(tmp_path))
        assert cleaned == rows and dropped == 0


def test_multiline_dialogue_survives_csv(tmp_path):
    rows = dialogsum_rows("train", 1)
    path = write_split(tmp_path, "train", rows, "csv")
    assert read_split_file(path)[0]["dialogue"].count("\n") == 2


def test_missing_split_names_the_expected_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", dialogsum_rows("train", 2))
    write_jsonl(tmp_path / "test.jsonl", dialogsum_rows("test", 2))
    with pytest.raises(
        DataError,
        match=r"no validation split; expected one of validation\.jsonl, "
        r"validation\.json, validation\.csv, validation\.parquet",
    ):
        load_local(tmp_path)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", dialogsum_rows("train", 2))
    path.write_text(path.read_text() + '{"id": "broken", \n')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON line"):
        read_split_file(path)


def test_non_utf8_file_is_an_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"id": "a", "dialogue": "caf\xe9", "summary": "s", "topic": "t"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl: not UTF-8 text .*re-encode the file as UTF-8"):
        read_split_file(path)


def test_missing_column_is_an_error():
    rows = [{"id": "1", "dialogue": "d"}]
    with pytest.raises(DataError, match="src: train split lacks column\\(s\\) summary; found id, dialogue"):
        clean_split(rows, "train", "src")


def test_empty_rows_are_dropped_and_counted():
    rows = dialogsum_rows("train", 3)
    rows[1]["summary"] = "   "
    rows[2]["dialogue"] = ""
    kept, dropped = clean_split(rows, "train", "src")
    assert [r["id"] for r in kept] == ["train_0"] and dropped == 2


def test_duplicate_ids_are_an_error():
    rows = dialogsum_rows("train", 2)
    rows[1]["id"] = rows[0]["id"]
    with pytest.raises(DataError, match="src: train split has duplicate id 'train_0'; ids must be unique"):
        clean_split(rows, "train", "src")


def test_stage_writes_snapshot_limit_and_stats(tmp_path):
    source = tmp_path / "source"
    for split in ("train", "validation", "test"):
        write_split(source, split, dialogsum_rows(split, 4, references=3 if split == "test" else 1), "jsonl")
    (source / "train.jsonl").write_text(
        (source / "train.jsonl").read_text()
        + json.dumps({"id": "empty", "dialogue": " ", "summary": "x", "topic": ""})
        + "\n"
    )
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source=str(source), limit=6)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, "-m", "stages.data"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "metrics" / "data.json").read_text())
    assert stats.pop("source") == str(source) and stats.pop("source_revision") == "main"
    resolved = stats.pop("source_resolved_revision")  # a content hash: an edited file shows in metrics diff
    assert resolved.startswith("sha256:") and len(resolved) == 7 + 64
    assert stats == {
        "train_rows": 4,
        "train_dropped_empty": 1,
        "train_dropped_test_overlap": 0,
        "validation_rows": 4,
        "validation_dropped_empty": 0,
        "validation_dropped_test_overlap": 0,
        "test_rows": 6,
        "test_dropped_empty": 0,
    }
    snapshot = [json.loads(line) for line in (tmp_path / "data" / "raw" / "test.jsonl").read_text().splitlines()]
    assert [r["id"] for r in snapshot] == ["test_0_1", "test_0_2", "test_0_3", "test_1_1", "test_1_2", "test_1_3"]
    assert set(snapshot[0]) == {"id", "dialogue", "summary", "topic"}


def test_unreachable_hub_dataset_is_one_clear_line(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = "no-such-user/no-such-dataset"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, "-m", "stages.data"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # after the progress lines
    assert len(errors) == 1
    assert errors[0].startswith("error: could not load dataset 'no-such-user/no-such-dataset' (revision 'main')")
    assert "point data.source at a local directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_dialogues_seen_in_test_are_dropped_and_counted():
    train = dialogsum_rows("train", 3)
    test = dialogsum_rows("test", 2, references=3)
    train[2]["dialogue"] = "  " + test[0]["dialogue"].replace("\n", " \n ")  # same text up to whitespace
    kept, dropped = drop_test_overlap(train, test)
    assert [r["id"] for r in kept] == ["train_0", "train_1"] and dropped == 1


def test_stage_exits_2_naming_the_malformed_line(tmp_path):
    source = tmp_path / "source"
    for split in ("train", "validation", "test"):
        write_split(source, split, dialogsum_rows(split, 2), "jsonl")
    with open(source / "validation.jsonl", "a", encoding="utf-8") as f:
        f.write("not json\n")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = str(source)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, "-m", "stages.data"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert result.stderr == (f"error: {source}/validation.jsonl:3: malformed JSON line (Expecting value)\n")
