import json

import pytest

from monitor.config import parse_config
from monitor.errors import DataError
from retrain.datasets import (
    CLINC150_FILES,
    cap_per_label,
    clinc150_dataset,
    dataset_from_config,
    files_dataset,
    load_clinc150,
    load_labelled_file,
    locate_clinc150,
)


def test_clinc150_from_data_root(clinc_dir):
    clinc = load_clinc150(clinc_dir.parent)
    assert len(clinc.splits["train"]) == 15000
    assert len(clinc.labels) == 151
    assert clinc.labels[-1] == "oos"


def test_clinc150_domain_subset(clinc_dir):
    clinc = load_clinc150(clinc_dir.parent)
    dataset = clinc150_dataset(clinc, ["banking", "travel"], per_label_limit=10, seed=0)
    assert len(dataset.train) == 30 * 10
    assert {label for _, label in dataset.train} <= clinc.intents_of(["banking", "travel"])
    assert len(dataset.labels) == 151
    assert len(dataset.unused_train) == 30 * 90
    assert not {text for text, _ in dataset.train} & {text for text, _ in dataset.unused_train}


def test_clinc150_unknown_domain(clinc_dir):
    clinc = load_clinc150(clinc_dir.parent)
    with pytest.raises(DataError, match="'bankng'"):
        clinc150_dataset(clinc, ["bankng"], None, 0)


def test_missing_files_under_data_root(tmp_path):
    with pytest.raises(DataError) as caught:
        locate_clinc150(tmp_path)
    assert "data_full.json" in str(caught.value)
    assert "DRIFTLOOP_DATA" in str(caught.value)


def test_checksum_mismatch_is_rejected(tmp_path):
    folder = tmp_path / "clinc150"
    folder.mkdir()
    for name in CLINC150_FILES:
        (folder / name).write_text("{}")
    with pytest.raises(DataError, match="sha256 mismatch"):
        load_clinc150(tmp_path)


def test_cache_without_download(tmp_path, monkeypatch):
    monkeypatch.delenv("DRIFTLOOP_DATA", raising=False)
    with pytest.raises(DataError, match="downloading is off"):
        locate_clinc150(None, tmp_path / "cache", download=False)


def test_jsonl_and_csv_loaders(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"utterance": f"text {i}", "intent": f"l{i % 2}"}) for i in range(4)))
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\nhello there,greet\nbye now,leave\n")
    assert load_labelled_file(jsonl, "utterance", "intent")[0] == ("text 0", "l0")
    assert load_labelled_file(csv_path) == [("hello there", "greet"), ("bye now", "leave")]


@pytest.mark.parametrize(
    "content, suffix, expected",
    [
        ('{"text": "a"}\n', ".jsonl", "missing column 'label'"),
        ('{"text": "", "label": "x"}\n', ".jsonl", "non-empty string"),
        ("{broken\n", ".jsonl", ":1: invalid JSON"),
        ("text,label\nhello,\n", ".csv", ":2: column 'label' is empty"),
        ("a\tb\n", ".tsv", "unsupported file type"),
    ],
    ids=["missing-label", "empty-text", "bad-json", "empty-csv-label", "wrong-suffix"],
)
def test_bad_rows_name_line_and_column(tmp_path, content, suffix, expected):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=expected):
        load_labelled_file(path)


def test_files_dataset_splits_and_extra_labels(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"example {i}", "label": f"l{i % 3}"}) for i in range(60)))
    dataset = files_dataset(path, None, None, "text", "label", ["unseen"], None, 0)
    assert dataset.labels == ["l0", "l1", "l2", "unseen"]
    assert len(dataset.train) + len(dataset.validation) + len(dataset.test) == 60
    assert dataset.validation and dataset.test


def test_cap_per_label_is_seeded():
    examples = [(f"t{i}", f"l{i % 2}") for i in range(20)]
    first = cap_per_label(examples, 3, seed=1)
    second = cap_per_label(examples, 3, seed=1)
    assert first == second
    assert len(first[0]) == 6
    assert len(first[1]) == 14


def test_missing_data_file_names_key(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"text": "hello", "label": "greet"}) + "\n")
    config = parse_config({"data": {"source": "files", "train_path": str(train),
                                    "validation_path": "missing-val.jsonl"}}, base_dir=tmp_path)
    with pytest.raises(DataError) as caught:
        dataset_from_config(config)
    message = str(caught.value)
    assert message.startswith("data.validation_path: file not found")
    assert "'missing-val.jsonl'" in message
