"""The data stage: every input format and data shape (other column names, no id, missing validation
or test split), the stats it records, clear errors on bad files and params, and the lead baseline on
dialogues without DialogSum's speaker tags."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import stages.data as data_stage
from stages.data import (
    SPLITS,
    DataError,
    clean_split,
    drop_test_overlap,
    load_hub,
    load_local,
    normalize,
    read_split_file,
    resolved_revision,
    split_off,
)
from stages.generate import lead_summary
from stages.params import DataParams, load_params
from tests.conftest import DIALOGSUM, REPO, dialogsum_rows, problems, require_shared, run_bare_stage, write_jsonl


def write_split(directory, split, rows, fmt):
    directory.mkdir(parents=True, exist_ok=True)
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
        cleaned = clean_split(loaded[split], split, str(tmp_path))
        assert cleaned.rows == rows and cleaned.dropped_empty == 0 and not cleaned.ids_derived


def test_multiline_dialogue_survives_csv(tmp_path):
    rows = dialogsum_rows("train", 1)
    path = write_split(tmp_path, "train", rows, "csv")
    assert read_split_file(path)[0]["dialogue"].count("\n") == 2


def test_missing_train_names_the_expected_files(tmp_path):
    write_jsonl(tmp_path / "validation.jsonl", dialogsum_rows("validation", 2))
    write_jsonl(tmp_path / "test.jsonl", dialogsum_rows("test", 2))
    with pytest.raises(DataError) as info:
        load_local(tmp_path)
    assert str(info.value) == (
        f"{tmp_path}: no train split; expected one of train.jsonl, train.json, train.csv, train.parquet "
        "(validation and test, when missing, are split off train)"
    )


def test_missing_validation_or_test_loads_the_splits_present(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", dialogsum_rows("train", 2))
    write_jsonl(tmp_path / "test.jsonl", dialogsum_rows("test", 2))
    assert set(load_local(tmp_path)) == {"train", "test"}


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
    with pytest.raises(DataError) as info:
        clean_split(rows, "train", "src")
    assert str(info.value) == (
        "src: train split lacks column(s) summary; found id, dialogue; "
        "map each to its column in the source with -S data.columns.summary=<column>"
    )


def test_empty_rows_are_dropped_and_counted():
    rows = dialogsum_rows("train", 3)
    rows[1]["summary"] = "   "
    rows[2]["dialogue"] = ""
    kept, dropped, _ = clean_split(rows, "train", "src")
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
        "train_dialogues": 4,
        "train_dropped_empty": 1,
        "train_dropped_test_overlap": 0,
        "validation_rows": 4,
        "validation_dialogues": 4,
        "validation_dropped_empty": 0,
        "validation_dropped_test_overlap": 0,
        "test_rows": 6,
        "test_dialogues": 2,
        "test_dropped_empty": 0,
        "ids_derived": False,  # every split had its ids
        "validation_split_off": False,  # every split was there: nothing split off train
        "test_split_off": False,
        "split_seed": None,
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


# Other shapes of data: other column names, no id, missing validation or test.


def run_data_stage(cwd, source, **data):
    """The data stage in `cwd` on the committed params with data.source=`source` and `data` set."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source=str(source), **data)
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    return run_bare_stage(cwd, "stages.data")


def snapshot(cwd, split):
    return [json.loads(line) for line in (cwd / "data" / "raw" / f"{split}.jsonl").read_text().splitlines()]


def stage_stats(cwd):
    return json.loads((cwd / "metrics" / "data.json").read_text())


def renamed(rows):
    """DialogSum rows under another data set's column names."""
    return [{"ref": r["id"], "transcript": r["dialogue"], "notes": r["summary"], "category": r["topic"]} for r in rows]


RENAMED = {"id": "ref", "dialogue": "transcript", "summary": "notes", "topic": "category"}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_column_mapping_reads_other_names_in_each_format(tmp_path, fmt):
    expected = {split: dialogsum_rows(split, 3, references=2 if split == "test" else 1) for split in SPLITS}
    for split, rows in expected.items():
        write_split(tmp_path / "source", split, renamed(rows), fmt)
    result = run_data_stage(tmp_path / "run", tmp_path / "source", columns=RENAMED)
    assert result.returncode == 0, result.stderr
    for split, rows in expected.items():  # the snapshot has the pipeline's names, whatever the source's
        assert snapshot(tmp_path / "run", split) == rows
    assert stage_stats(tmp_path / "run")["ids_derived"] is False


def test_a_mapped_column_missing_from_the_data_names_split_column_and_fix():
    rows = renamed(dialogsum_rows("test", 2))
    with pytest.raises(DataError) as info:
        clean_split(rows, "test", "src", {"dialogue": "transcript", "summary": "abstract"})
    assert str(info.value) == (
        "src: test split lacks column(s) 'abstract' (data.columns.summary); found ref, transcript, notes, category; "
        "map each to its column in the source with -S data.columns.summary=<column>"
    )


def test_id_and_topic_under_their_own_names_are_optional_under_other_names_required():
    rows = [{"text": "#Person1#: Hi.", "summary": "A greeting."}]
    own_names = {"id": "id", "dialogue": "text", "summary": "summary", "topic": "topic"}  # as params.yaml maps
    for columns in (own_names, {"dialogue": "text"}):
        cleaned = clean_split(rows, "train", "src", columns)
        assert cleaned.ids_derived and cleaned.rows[0]["topic"] == ""
    with pytest.raises(DataError, match=r"lacks column\(s\) 'key' \(data\.columns\.id\); found text, summary"):
        clean_split(rows, "train", "src", {"dialogue": "text", "id": "key"})


def test_derived_ids_name_the_source_row_and_are_unique():
    rows = [{k: v for k, v in r.items() if k != "id"} for r in dialogsum_rows("test", 2, references=3)]
    rows[1]["summary"] = " "  # dropped: the ids of the rows after it still name their own source row
    cleaned = clean_split(rows, "test", "src")
    assert cleaned.ids_derived and cleaned.dropped_empty == 1
    assert [r["id"] for r in cleaned.rows] == ["test-0", "test-2", "test-3", "test-4", "test-5"]


def test_stage_derives_missing_ids_deterministically_and_records_it(tmp_path):
    for split in SPLITS:
        rows = dialogsum_rows(split, 3, references=3 if split == "test" else 1)
        write_split(tmp_path / "source", split, [{"text": r["dialogue"], "summary": r["summary"]} for r in rows], "csv")
    result = run_data_stage(tmp_path / "run", tmp_path / "source", columns={"dialogue": "text"})
    assert result.returncode == 0, result.stderr
    test = snapshot(tmp_path / "run", "test")
    ids = [r["id"] for r in test]
    assert len(ids) == 9 and len(set(ids)) == 9  # three references of each dialogue: one id each
    assert len({r["dialogue"] for r in test}) == 3 and all(r["topic"] == "" for r in test)
    assert stage_stats(tmp_path / "run")["ids_derived"] is True
    again = run_data_stage(tmp_path / "again", tmp_path / "source", columns={"dialogue": "text"})
    assert again.returncode == 0, again.stderr
    assert all(snapshot(tmp_path / "again", split) == snapshot(tmp_path / "run", split) for split in SPLITS)


def test_split_off_is_seeded_by_dialogue_and_keeps_references_together():
    rows = dialogsum_rows("train", 50, references=3)
    rows[1]["dialogue"] = " " + rows[1]["dialogue"].replace("\n", " \n ")  # one reference differs in whitespace
    sizes = {"validation": 0.1, "test": 0.2}
    parts = split_off(rows, sizes, seed=3, origin="src")
    dialogues = {split: {normalize(r["dialogue"]) for r in part} for split, part in parts.items()}
    assert {split: len(d) for split, d in dialogues.items()} == {"train": 35, "validation": 5, "test": 10}
    assert all(len(part) == 3 * len(dialogues[split]) for split, part in parts.items())  # every reference with it
    assert not (dialogues["train"] & dialogues["test"] or dialogues["train"] & dialogues["validation"])
    assert not dialogues["validation"] & dialogues["test"]
    assert sorted(r["id"] for part in parts.values() for r in part) == sorted(r["id"] for r in rows)
    for part in parts.values():  # each split keeps the source's row order
        positions = [rows.index(r) for r in part]
        assert positions == sorted(positions)
    assert split_off(rows, sizes, seed=3, origin="src") == parts  # the same seed, the same split
    shuffled = split_off(list(reversed(rows)), sizes, seed=3, origin="src")  # the row order does not matter
    assert {split: {normalize(r["dialogue"]) for r in part} for split, part in shuffled.items()} == dialogues
    other = split_off(rows, sizes, seed=4, origin="src")  # another seed draws other dialogues
    assert {normalize(r["dialogue"]) for r in other["test"]} != dialogues["test"]


def test_too_few_dialogues_to_split_off_is_an_error():
    with pytest.raises(DataError) as info:
        split_off(dialogsum_rows("train", 2, references=3), {"validation": 0.1, "test": 0.1}, 0, "src")
    assert str(info.value) == (
        "src: train has 2 distinct dialogue(s), too few to split off validation and test (1 + 1 dialogues) and "
        "keep some to train on; add rows, or give the source its own validation and test split(s)"
    )


def test_stage_splits_a_train_only_source_and_records_the_split(tmp_path):
    rows = dialogsum_rows("train", 40, references=2)
    write_split(tmp_path / "source", "train", rows, "parquet")
    result = run_data_stage(tmp_path / "run", tmp_path / "source", split_seed=7, validation_size=0.1, test_size=0.2)
    assert result.returncode == 0, result.stderr
    stats = stage_stats(tmp_path / "run")
    assert (stats["validation_split_off"], stats["test_split_off"], stats["split_seed"]) == (True, True, 7)
    sizes = {split: (stats[f"{split}_dialogues"], stats[f"{split}_rows"]) for split in SPLITS}
    assert sizes == {"train": (28, 56), "validation": (4, 8), "test": (8, 16)}
    assert stats["source_resolved_revision"].startswith("sha256:")
    written = {split: snapshot(tmp_path / "run", split) for split in SPLITS}
    assert sorted(r["id"] for part in written.values() for r in part) == sorted(r["id"] for r in rows)
    train_dialogues = {r["dialogue"] for r in written["train"]}
    assert not train_dialogues & {r["dialogue"] for r in written["test"] + written["validation"]}
    assert written == split_off(rows, {"validation": 0.1, "test": 0.2}, 7, "src")  # the seed decides
    again = run_data_stage(tmp_path / "again", tmp_path / "source", split_seed=7, validation_size=0.1, test_size=0.2)
    assert again.returncode == 0, again.stderr
    assert {split: snapshot(tmp_path / "again", split) for split in SPLITS} == written


def test_stage_splits_validation_off_train_when_only_train_and_test_exist(tmp_path):
    train = dialogsum_rows("train", 21)
    test = dialogsum_rows("test", 3, references=3)
    train[0]["dialogue"] = test[0]["dialogue"]  # dropped as a test overlap before validation is drawn
    write_split(tmp_path / "source", "train", train, "jsonl")
    write_split(tmp_path / "source", "test", test, "csv")
    result = run_data_stage(tmp_path / "run", tmp_path / "source", validation_size=0.25)
    assert result.returncode == 0, result.stderr
    stats = stage_stats(tmp_path / "run")
    assert (stats["validation_split_off"], stats["test_split_off"]) == (True, False)
    assert stats["split_seed"] == yaml.safe_load((REPO / "params.yaml").read_text())["data"]["split_seed"]
    assert stats["train_dropped_test_overlap"] == 1 and stats["validation_dropped_test_overlap"] == 0
    assert (stats["validation_dialogues"], stats["train_dialogues"]) == (5, 15)  # 20 left, a quarter drawn
    assert snapshot(tmp_path / "run", "test") == test  # the source's own test split, untouched
    kept = snapshot(tmp_path / "run", "train") + snapshot(tmp_path / "run", "validation")
    assert sorted(r["id"] for r in kept) == sorted(r["id"] for r in train[1:])
    assert not {r["dialogue"] for r in kept} & {r["dialogue"] for r in test}


def test_a_test_split_off_train_never_shares_a_dialogue_with_the_source_s_validation(tmp_path):
    """Train and validation but no test: the test drawn from train must not hold a validation dialogue
    (checkpoints are picked on validation), so a validation row whose dialogue went to test is dropped."""
    train = dialogsum_rows("train", 20)
    validation = [{**row, "id": f"v{i}"} for i, row in enumerate(train[:10])]  # half of train's dialogues again
    write_split(tmp_path / "source", "train", train, "jsonl")
    write_split(tmp_path / "source", "validation", validation, "jsonl")
    result = run_data_stage(tmp_path / "run", tmp_path / "source", test_size=0.25)
    assert result.returncode == 0, result.stderr
    stats = stage_stats(tmp_path / "run")
    test_dialogues = {r["dialogue"] for r in snapshot(tmp_path / "run", "test")}
    kept = snapshot(tmp_path / "run", "validation")
    assert stats["test_split_off"] is True and len(test_dialogues) == 5
    assert not {r["dialogue"] for r in kept} & test_dialogues
    overlapping = sum(r["dialogue"] in test_dialogues for r in validation)
    assert overlapping > 0  # the premise: the seeded draw put some of those dialogues in test
    assert stats["validation_dropped_test_overlap"] == overlapping and len(kept) == len(validation) - overlapping


def test_resolved_revision_covers_the_split_files_present(tmp_path):
    params = DataParams(source=str(tmp_path), revision="main", limit=None)
    write_split(tmp_path, "train", dialogsum_rows("train", 3), "jsonl")
    train_only = resolved_revision(params)
    assert train_only == resolved_revision(params)
    write_split(tmp_path, "test", dialogsum_rows("test", 2), "csv")
    with_test = resolved_revision(params)
    write_split(tmp_path, "train", dialogsum_rows("train", 4), "jsonl")
    assert len({train_only, with_test, resolved_revision(params)}) == 3


def hub_dataset(monkeypatch, **splits):
    """datasets.load_dataset answering with these splits, as a Hub dataset would."""
    import datasets

    loaded = datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})
    monkeypatch.setattr(datasets, "load_dataset", lambda source, revision: loaded)


def test_hub_dataset_with_other_names_and_only_train(tmp_path, monkeypatch):
    rows = dialogsum_rows("train", 30)
    hub_dataset(monkeypatch, train=[{"transcript": r["dialogue"], "notes": r["summary"]} for r in rows])
    monkeypatch.setattr(data_stage, "resolved_revision", lambda params: "0123abcd")  # no Hub to ask
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source="someone/meetings", columns={"dialogue": "transcript", "summary": "notes"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    data_stage.main()
    stats = stage_stats(tmp_path)
    assert stats["ids_derived"] and stats["validation_split_off"] and stats["test_split_off"]
    written = [r for split in SPLITS for r in snapshot(tmp_path, split)]
    assert sorted((r["dialogue"], r["summary"]) for r in written) == sorted((r["dialogue"], r["summary"]) for r in rows)
    assert all(set(r) == {"id", "dialogue", "summary", "topic"} for r in written)


def test_hub_dataset_without_train_is_an_error(monkeypatch):
    hub_dataset(monkeypatch, test=dialogsum_rows("test", 2))
    with pytest.raises(DataError) as info:
        load_hub("someone/meetings", "main")
    assert str(info.value) == (
        "dataset 'someone/meetings' has no train split; found test (validation and test, when missing, are "
        "split off train)"
    )


def test_column_mapping_params_errors_name_the_key_and_the_valid_ones(raw):
    raw["data"]["columns"] = {"text": "transcript", "dialogue": "", "summary": "notes", "topic": "notes"}
    assert problems(raw) == (
        "3 problem(s) in params.yaml:\n"
        "  - data.columns.text: unknown key; valid keys are dialogue, id, summary, topic (the pipeline's "
        "columns, each mapped to the source's column that holds it)\n"
        "  - data.columns.dialogue: expected the source's column name, got ''\n"
        "  - data.columns: summary, topic map to the same column 'notes'; each needs its own source column"
    )


def test_columns_must_be_a_mapping(raw):
    raw["data"]["columns"] = ["transcript"]
    assert problems(raw) == (
        "1 problem(s) in params.yaml:\n"
        "  - data.columns: expected a mapping of the pipeline's columns to the source's (e.g. {dialogue: "
        "transcript, summary: notes}), or {} for the names as they are; got ['transcript']"
    )


def test_split_params_are_checked(raw):
    raw["data"].update(split_seed=-1, validation_size=0, test_size=1.5)
    assert problems(raw) == (
        "3 problem(s) in params.yaml:\n"
        "  - data.split_seed: must be >= 0, got -1\n"
        "  - data.validation_size: must be a fraction of the train dialogues in (0, 1), got 0.0\n"
        "  - data.test_size: must be a fraction of the train dialogues in (0, 1), got 1.5"
    )
    raw["data"].update(split_seed=0, validation_size=0.5, test_size=0.5)
    assert problems(raw) == (
        "1 problem(s) in params.yaml:\n"
        "  - data.validation_size + test_size: must be < 1 to leave dialogues in train, got 0.5 + 0.5"
    )
    raw["data"]["test_size"] = "10%"
    assert "data.test_size: expected a number, got '10%'" in problems(raw)


# The lead baseline on dialogues in other shapes: DialogSum's exactly as before.


def dialogsum_lead_as_before(dialogue, turns):
    """The lead rule as it was before other tag forms: what a DialogSum dialogue must still give."""
    lines = [re.sub(r"^\s*#[^#]+#\s*:\s*", "", line).strip() for line in dialogue.splitlines()]
    return " ".join([line for line in lines if line][:turns])


def test_lead_of_a_dialogsum_dialogue_is_unchanged():
    dialogues = [r["dialogue"] for r in dialogsum_rows("test", 3)] + [
        "#Person1#: Mr. Lee: is he in?\n  a continued line\n\n#Person2#:\nBob: Note: yes. He is.",
    ]
    for dialogue in dialogues:
        for turns in (1, 2, 3, 10):
            assert lead_summary(dialogue, turns) == dialogsum_lead_as_before(dialogue, turns)
    assert lead_summary(dialogues[-1], 2) == "Mr. Lee: is he in? a continued line"


def test_lead_of_real_dialogsum_is_unchanged():
    require_shared()
    for split in SPLITS:
        for line in (DIALOGSUM / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            dialogue = json.loads(line)["dialogue"]
            assert all(lead_summary(dialogue, t) == dialogsum_lead_as_before(dialogue, t) for t in (1, 2, 3))


def test_lead_strips_name_tags_from_lines():
    dialogue = "Alice: Hi there, Bob.\nBob: Hello! How are you?\n\nDr. Smith: Fine: thanks.\nA: ok\n[Ann]: bye"
    assert lead_summary(dialogue, 2) == "Hi there, Bob. Hello! How are you?"
    assert lead_summary(dialogue, 10) == "Hi there, Bob. Hello! How are you? Fine: thanks. ok bye"


def test_lead_of_untagged_lines_keeps_them_whole():
    dialogue = "The plan: meet at noon.\nWe agreed on it. Then we left.\nSee you soon."
    assert lead_summary(dialogue, 2) == "The plan: meet at noon. We agreed on it. Then we left."


def test_lead_of_one_paragraph_takes_its_first_sentences():
    prose = "I called Mr. Brown at nine. He was out! Would he call back?  Maybe tomorrow."
    assert lead_summary(prose, 2) == "I called Mr. Brown at nine. He was out!"
    assert lead_summary(prose, 3) == "I called Mr. Brown at nine. He was out! Would he call back?"
    assert lead_summary(prose, 10) == "I called Mr. Brown at nine. He was out! Would he call back? Maybe tomorrow."
    tagged = "Alice: Hi. Are you free tonight? Bob: Sure."
    assert lead_summary(tagged, 2) == "Hi. Are you free tonight?"
    assert lead_summary(tagged, 3) == "Hi. Are you free tonight? Sure."
    # one colon in prose is no speaker tag: the paragraph stays as written
    assert lead_summary("The plan: we meet at noon. Bring food.", 2) == "The plan: we meet at noon. Bring food."


def test_column_mapping_is_set_with_exp_run_syntax(tmp_path):
    """params.yaml maps every column (DialogSum's names), so `-S data.columns.<name>=<column>` overrides a
    key that exists: DVC refuses to add one to an empty mapping without a leading +."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "set_params.py"), "data.columns.dialogue=transcript"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    columns = load_params(tmp_path / "params.yaml").data.columns
    assert columns == {"id": "id", "dialogue": "transcript", "summary": "summary", "topic": "topic"}
