"""Assembly of a retrain's training set: splits, replay, deduplication, class report, hashes."""

from collections import Counter

from retrain.assembly import (
    assemble_training_data,
    examples_sha256,
    in_holdout,
    normalise,
    split_validation,
)


def production(n, label="l1", prefix="event"):
    return [(f"{prefix}-{i}", f"production text number {i}", label) for i in range(n)]


def base_examples(n=60, labels=3):
    return [(f"base text {i}", f"l{i % labels}") for i in range(n)]


def test_holdout_split_is_stable_and_near_fraction():
    ids = [f"id-{i}" for i in range(5000)]
    first = [in_holdout(event_id, 0.2) for event_id in ids]
    assert first == [in_holdout(event_id, 0.2) for event_id in ids]
    assert 0.17 < sum(first) / len(ids) < 0.23


def test_no_text_both_trained_and_judged():
    events = production(300)
    # The same text posted twice under different ids must not leak across the split.
    events += [(f"copy-{i}", text.upper() + "  ", label) for i, (_, text, label) in enumerate(events[:100])]
    test_split = ["Base text 7", "production text number 5"]
    data = assemble_training_data(base_examples(), events, replay_per_label=5, holdout_fraction=0.3, seed=0,
                                  judged_texts=test_split)
    trained = {normalise(text) for text, _ in data.train}
    for judging in (data.holdout, data.validation, [(text, "") for text in test_split]):
        assert judging
        assert not {normalise(text) for text, _ in judging} & trained
    assert data.duplicates_removed > 0
    assert data.judged_removed > 0


def test_replay_and_cap_per_label():
    events = production(200, label="oos")
    data = assemble_training_data(base_examples(), events, replay_per_label=4, holdout_fraction=0.2, seed=0, max_per_label=25)
    assert data.replay == 12
    counts = Counter(label for _, label in data.train + data.validation)
    assert counts["oos"] == 25
    assert data.capped > 0
    assert all(count <= 25 for count in counts.values())


def test_validation_split_keeps_every_class():
    examples = [(f"text {i} of {label}", label) for label in ("a", "b", "c") for i in range(40)]
    examples += [("lonely", "d"), ("pair one", "e"), ("pair two", "e")]
    train, validation = split_validation(examples, 0.1)
    assert (train, validation) == split_validation(list(reversed(examples)), 0.1)
    assert {label for _, label in validation} == {"a", "b", "c"}
    assert not set(train) & set(validation)
    assert 6 <= len(validation) <= 20
    # Every class is trained on, even when the hash sends all its texts to validation.
    assert {label for _, label in train} == {"a", "b", "c", "d", "e"}
    _, everything = split_validation(examples, 0.999)
    assert {"d", "e"} <= {label for _, label in train}
    assert len([label for _, label in everything if label == "a"]) == 39


def test_small_classes_are_reported_never_dropped():
    events = production(40, label="big") + [("rare-1", "a rare request", "rare"), ("rare-2", "another rare one", "rare")]
    data = assemble_training_data([], events, replay_per_label=0, holdout_fraction=0.01, seed=0,
                                  labels=["big", "rare", "unseen"], min_class_examples=5)
    assert data.small_classes == {"rare": 2}
    assert data.labels_without_examples == ["unseen"]
    assert sum(label == "rare" for _, label in data.train + data.validation) == 2
    lineage = data.lineage()
    assert lineage["class_counts"]["big"] + lineage["validation_class_counts"]["big"] == 40 - len(data.holdout)
    assert set(lineage["sha256"]) == {"train", "validation", "holdout"}


def test_examples_hash_ignores_order_and_separates_fields():
    examples = base_examples(10)
    assert examples_sha256(examples) == examples_sha256(list(reversed(examples)))
    assert examples_sha256([("a\tb", "c")]) != examples_sha256([("a", "b\tc")])
