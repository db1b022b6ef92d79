import pandas as pd
import pytest

from octft.data.ids import canonical_participant_id
from octft.data.labels import LabelsError, class_index, load_labels, stratified_split
from octft.data.layout import CLASSES


@pytest.mark.parametrize(
    "value", [1001, 1001.0, "1001", "01001", "001001", "sub-1001", "SUB_1001", "AIREADI-1001", "aireadi_1001", " 1001 ", "1001.0"]
)
def test_every_spelling_of_an_id_is_one_participant(value):
    assert canonical_participant_id(value) == "1001"


@pytest.mark.parametrize("value", ["", "notes", "10a1", None, float("nan"), 1001.5, True, "sub-"])
def test_non_ids_are_none(value):
    assert canonical_participant_id(value) is None


def test_ids_of_all_three_sites_survive():
    # The old locator's regex kept only 1xxx; the canonical form must keep every site.
    assert [canonical_participant_id(v) for v in ("1001", "4001", "7001")] == ["1001", "4001", "7001"]


def _tsv(rows, header=("participant_id", "study_group", "recommended_split"), newline="\n"):
    lines = ["\t".join(header)] + ["\t".join(map(str, r)) for r in rows]
    return (newline.join(lines) + newline).encode()


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_labels_crlf_and_lf_read_the_same(newline):
    data = _tsv([(1001, "healthy", "train"), (4002, "insulin_dependent", "val"), (7003, "pre_diabetes_lifestyle_controlled", "test")], newline=newline)
    labels = load_labels(data, name="participants.tsv")
    assert labels.table.to_dict("records") == [
        {"participant_id": "1001", "label": 0, "class_name": "healthy", "split": "train"},
        {"participant_id": "4002", "label": 3, "class_name": "insulin_dependent", "split": "val"},
        {"participant_id": "7003", "label": 1, "class_name": "pre_diabetes_lifestyle_controlled", "split": "test"},
    ]
    assert labels.invalid == []


def test_person_id_column_and_slash_spelling_accepted():
    data = _tsv([("01001", "oral_medication_and/or_non_insulin_injectable_medication_controlled", "train")],
                header=("person_id", "study_group", "recommended_split"))
    labels = load_labels(data)
    assert labels.table.iloc[0].participant_id == "1001"
    assert labels.table.iloc[0].label == 2 == class_index(CLASSES[2])


def test_bad_rows_are_reported_not_dropped_silently():
    data = _tsv([(1001, "healthy", "train"), ("x9", "healthy", "train"), (1002, "diabetic?", "train"), (1003, "healthy", "holdout")])
    labels = load_labels(data)
    assert list(labels.table.participant_id) == ["1001"]
    reasons = {row: reason for row, _, reason in labels.invalid}
    assert set(reasons) == {3, 4, 5}
    assert "not a participant ID" in reasons[3]
    assert "diabetic?" in reasons[4]
    assert "holdout" in reasons[5]


def test_participant_in_two_splits_is_caught_even_when_zero_padded():
    data = _tsv([(1001, "healthy", "train"), ("01001", "healthy", "val"), (1002, "healthy", "train")])
    labels = load_labels(data)
    assert [c.participant_id for c in labels.conflicts] == ["1001"]
    assert list(labels.table.participant_id) == ["1002"]  # no first row wins


def test_participant_in_two_classes_is_a_conflict_naming_both_rows():
    data = _tsv([(1001, "healthy", "train"), ("01001", "insulin_dependent", "train")])
    labels = load_labels(data)
    (conflict,) = labels.conflicts
    assert conflict.participant_id == "1001"
    assert conflict.rows == ((2, "1001", "healthy", "train"), (3, "01001", "insulin_dependent", "train"))
    assert labels.table.empty and labels.invalid == []


def test_identical_duplicate_rows_are_merged_and_counted():
    data = _tsv([(1001, "healthy", "train"), ("01001", "healthy", "train"), ("sub-1001", "healthy", "train"),
                 (1002, "healthy", "val")])
    labels = load_labels(data)
    assert labels.conflicts == [] and labels.duplicate_rows == 2
    assert list(labels.table.participant_id) == ["1001", "1002"]


def test_missing_columns_message_names_file_and_columns():
    with pytest.raises(LabelsError, match=r"p\.tsv.*participant_id or person_id.*\['id', 'group'\]"):
        load_labels(b"id\tgroup\n1\thealthy\n", name="p.tsv")


def test_missing_file_message(tmp_path):
    with pytest.raises(LabelsError, match="not found"):
        load_labels(tmp_path / "nope.tsv")


def test_stratified_split_when_labels_have_no_split():
    rows = [(1000 + i, CLASSES[i % 4]) for i in range(80)]
    data = _tsv(rows, header=("participant_id", "study_group"))
    first = load_labels(data, seed=3)
    again = load_labels(data, seed=3)
    other = load_labels(data, seed=4)
    assert first.split_source == "stratified(seed=3)"
    pd.testing.assert_frame_equal(first.table, again.table)
    assert not first.table.split.equals(other.table.split)
    counts = first.table.groupby(["split", "label"]).size()
    for split in ("train", "val", "test"):
        for label in range(4):
            assert counts[(split, label)] >= 1
    assert counts.xs("train", level="split").sum() == 56  # 70% of 80


def test_stratified_split_puts_each_participant_once():
    ids = [str(1000 + i) for i in range(30)]
    assignment = stratified_split(ids, [i % 3 for i in range(30)], val_fraction=0.2, test_fraction=0.2, seed=0)
    assert sorted(assignment) == sorted(ids)
