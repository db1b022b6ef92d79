"""Locator and audit on small hand-built releases (files hold placeholder bytes: nothing is decoded)."""

import json

import pytest

from octft.data.audit import audit, audit_dataset
from octft.data.labels import load_labels
from octft.data.locator import locate, parse_key
from octft.data.storage import LocalStorage

OCT = "retinal_oct/structural_oct"


def write(root, key, data=b"x"):
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def labels_tsv(rows):
    return ("participant_id\tstudy_group\trecommended_split\n" + "".join(f"{p}\t{g}\t{s}\n" for p, g, s in rows)).encode()


CLASSES4 = ["healthy", "pre_diabetes_lifestyle_controlled",
            "oral_medication_and_or_non_insulin_injectable_medication_controlled", "insulin_dependent"]


def make_release(root, *, with_manifest):
    """Four participants per class in train/val/test, IDs from the three sites, some folder spelling quirks."""
    rows, manifest = [], ["participant_id\tlaterality\tanatomic_region\tnumber_of_frames\theight\twidth\tfilepath"]
    n = 0
    for split in ("train", "val", "test"):
        for label, group in enumerate(CLASSES4):
            site = "147"[n % 3]
            pid = f"{site}{n:03d}"
            rows.append((pid, group, split))
            folder = {0: f"0{pid}", 1: f"sub-{pid}"}.get(n % 5, pid)  # zero-padded and prefixed folders
            for eye in "lr":
                key = f"{OCT}/topcon_maestro2/{folder}/{pid}_maestro2_macula_oct_{eye}_{n}.dcm"
                write(root, key, bytes([n, ord(eye)]) * (10 + n))
                manifest.append(f"{pid}\t{eye.upper()}\tMacula\t8\t64\t64\t/{key}")
            n += 1
    (root / "participants.tsv").write_bytes(labels_tsv(rows))
    if with_manifest:
        write(root, "retinal_oct/manifest.tsv", ("\n".join(manifest) + "\n").encode())
    return rows


def test_parse_key_uses_the_participant_folder_not_a_regex():
    for pid in ("1001", "4001", "7001"):
        item = parse_key(f"{OCT}/zeiss_cirrus/{pid}/{pid}_cirrus_macula_oct_l_1.2.3.dcm", 10)
        assert (item.participant_id, item.laterality, item.region, item.problem) == (pid, "L", "macula", None)
    assert parse_key(f"{OCT}/zeiss_cirrus/sub-04001/x_oct_r.dcm", 1).participant_id == "4001"
    assert "unknown device" in parse_key(f"{OCT}/nikon/1001/a.dcm", 1).problem
    assert "not an image" in parse_key(f"{OCT}/zeiss_cirrus/1001/notes.txt", 1).problem
    assert "not a participant ID" in parse_key(f"{OCT}/zeiss_cirrus/misc/a.dcm", 1).problem
    assert "not under" in parse_key(f"{OCT}/zeiss_cirrus/a.dcm", 1).problem


@pytest.mark.parametrize("with_manifest", [True, False])
def test_every_site_and_folder_spelling_matches(tmp_path, with_manifest):
    make_release(tmp_path, with_manifest=with_manifest)
    report = audit_dataset(str(tmp_path))
    d = report.to_dict()
    assert d["files"] == {**d["files"], "found": 24, "matched": 24, "unlabeled": 0, "unparsed": 0, "excluded": 0}
    assert d["participants"]["matched"] == 12 and d["match_rate"] == 1.0
    assert {pid[0] for pid in report.volumes.participant_id} == {"1", "4", "7"}
    assert all(d["splits"][s][c] == 1 for s in ("train", "val", "test") for c in CLASSES4)
    assert report.passed, [g for g in report.guards if not g.passed]
    assert d["manifest_used"] is with_manifest


def test_faults_land_in_their_buckets_and_nothing_is_lost(tmp_path):
    make_release(tmp_path, with_manifest=True)
    write(tmp_path, f"{OCT}/topcon_maestro2/1000/notes.txt", b"hello")  # non-image, not in manifest
    write(tmp_path, f"{OCT}/topcon_triton/9999/9999_triton_macula_oct_l_x.dcm", b"zz")  # not in manifest
    manifest = tmp_path / "retinal_oct/manifest.tsv"
    with manifest.open("a") as f:
        f.write(f"9999\tL\tMacula\t8\t64\t64\t/{OCT}/topcon_triton/9999/9999_triton_macula_oct_l_x.dcm\n")  # unlabeled
        f.write(f"1000\tL\tOptic Disc\t8\t64\t64\t/{OCT}/topcon_maestro2/01000/1000_maestro2_disc_oct_l_y.dcm\n")
        f.write(f"1000\tR\tMacula\t8\t64\t64\t/{OCT}/topcon_maestro2/01000/gone.dcm\n")  # missing file
    write(tmp_path, f"{OCT}/topcon_maestro2/01000/1000_maestro2_disc_oct_l_y.dcm", b"disc" * 9)  # excluded by region
    original = next(tmp_path.rglob("1000_maestro2_macula_oct_l_0.dcm"))
    copy_key = f"{OCT}/topcon_maestro2/01000/1000_maestro2_macula_oct_l_copy.dcm"
    write(tmp_path, copy_key, original.read_bytes())
    with manifest.open("a") as f:
        f.write(f"1000\tL\tMacula\t8\t64\t64\t/{copy_key}\n")
    with (tmp_path / "participants.tsv").open("a") as f:
        f.write("1999\thealthy\ttrain\n")  # labelled, no files

    report = audit_dataset(str(tmp_path))
    d = report.to_dict()
    files = d["files"]
    assert files["found"] == 24 + 4
    assert files["found"] == files["matched"] + files["unlabeled"] + files["unparsed"] + files["excluded"]
    assert (files["matched"], files["unlabeled"], files["unparsed"], files["excluded"]) == (24, 1, 1, 2)
    assert d["unparsed"][0]["reason"].startswith("not an image")
    rules = {row["key"]: row["rule"] for row in d["excluded"]}
    assert rules[copy_key].startswith("duplicate of")
    assert any(rule.startswith("region 'optic_disc'") for rule in rules.values())
    assert d["participants"]["oct_without_labels"] == ["9999"]
    assert d["participants"]["labels_without_oct"] == ["1999"]
    assert [row["filepath"].endswith("gone.dcm") for row in d["manifest_missing"]] == [True]
    guards = {g["name"]: g for g in d["guards"]}
    assert not guards["duplicate_files"]["passed"] and "1 duplicate" in guards["duplicate_files"]["detail"]
    assert guards["match_rate"]["passed"]
    assert not report.passed
    assert report.failed_guards(allowed=["duplicate_files"]) == []
    json.dumps(d)  # the JSON report is serialisable as it stands


def test_a_file_missing_from_the_manifest_is_counted(tmp_path):
    make_release(tmp_path, with_manifest=True)
    write(tmp_path, f"{OCT}/zeiss_cirrus/1000/1000_cirrus_macula_oct_l_z.dcm", b"q" * 3)
    d = audit_dataset(str(tmp_path)).to_dict()
    assert d["files"]["unparsed"] == 1
    assert "not listed in retinal_oct/manifest.tsv" in d["unparsed"][0]["reason"]


def test_old_regex_failure_is_caught_by_the_match_rate_guard(tmp_path):
    """Two sites' folders carry an unparseable name: the guard fails and names the numbers."""
    make_release(tmp_path, with_manifest=False)
    for folder in list((tmp_path / OCT / "topcon_maestro2").iterdir()):
        if folder.name.lstrip("sub-0")[0] in "47":
            folder.rename(folder.parent / f"participant_{folder.name}_x")
    report = audit_dataset(str(tmp_path))
    guard = next(g for g in report.guards if g.name == "match_rate")
    assert not guard.passed
    assert "4 of 12" in guard.detail
    assert report.to_dict()["files"]["unparsed"] == 16


def test_guards_fail_on_a_labels_file_missing_a_class_in_val(tmp_path):
    rows = make_release(tmp_path, with_manifest=True)
    broken = [(p, "healthy" if s == "val" else g, s) for p, g, s in rows]
    (tmp_path / "participants.tsv").write_bytes(labels_tsv(broken))
    report = audit_dataset(str(tmp_path))
    failed = {g.name: g.detail for g in report.guards if not g.passed}
    assert list(failed) == ["classes_in_val"]
    assert "insulin_dependent" in failed["classes_in_val"].split("below")[1]


def test_selection_one_per_eye_is_deterministic(tmp_path):
    make_release(tmp_path, with_manifest=False)
    for eye in "lr":  # a second device for participant 1000
        write(tmp_path, f"{OCT}/zeiss_cirrus/1000/1000_cirrus_macula_oct_{eye}_9.dcm", b"c" * (50 + (eye == "l")))
    storage = LocalStorage(tmp_path)
    labels = load_labels(tmp_path / "participants.tsv")
    kwargs = dict(per_participant="one_per_eye", devices=["zeiss_cirrus", "topcon_maestro2"])
    first = audit(locate(storage), labels, **kwargs)
    second = audit(locate(storage), labels, **kwargs)
    assert first.volumes.key.tolist() == second.volumes.key.tolist()
    kept = first.volumes[first.volumes.participant_id == "1000"]
    assert sorted(kept.device) == ["zeiss_cirrus", "zeiss_cirrus"]
    assert first.to_dict()["files"]["excluded"] == 2
    assert all(r["rule"].startswith("one_per_eye: kept") for r in first.to_dict()["excluded"])


def test_a_file_name_that_disagrees_with_its_folder_is_reported(tmp_path):
    make_release(tmp_path, with_manifest=False)
    write(tmp_path, f"{OCT}/zeiss_cirrus/1000/4555_cirrus_macula_oct_l_q.dcm", b"m" * 7)
    d = audit_dataset(str(tmp_path)).to_dict()
    assert {"key": f"{OCT}/zeiss_cirrus/1000/4555_cirrus_macula_oct_l_q.dcm", "folder_id": "1000",
            "file_name_id": "4555"} in d["id_mismatches"]
    assert d["files"]["matched"] == 25  # the folder decides; the mismatch is reported, not dropped


def test_contradicting_label_rows_fail_the_conflicting_labels_guard(tmp_path):
    rows = make_release(tmp_path, with_manifest=True)
    first = rows[0][0]
    # The same participant again, zero-padded, in another class: one of the two rows must be wrong.
    text = (tmp_path / "participants.tsv").read_text() + f"0{first}\tinsulin_dependent\t{rows[0][2]}\n"
    (tmp_path / "participants.tsv").write_text(text)
    report = audit_dataset(str(tmp_path), min_per_class=1)
    guards = {g.name: g for g in report.guards}
    assert not guards["conflicting_labels"].passed and first in guards["conflicting_labels"].detail
    assert "conflicting_labels" in [g.name for g in report.failed_guards(())]
    assert "conflicting_labels" not in [g.name for g in report.failed_guards(["conflicting_labels"])]
    summary = report.to_dict()
    assert summary["labels_conflicting"][0]["participant_id"] == first
    # Its files are counted as unlabeled, never trained on under either class.
    assert first in summary["participants"]["oct_without_labels"] and first not in set(report.volumes.participant_id)


def test_identical_duplicate_label_rows_pass_and_are_counted(tmp_path):
    rows = make_release(tmp_path, with_manifest=True)
    pid, group, split = rows[0]
    (tmp_path / "participants.tsv").write_text((tmp_path / "participants.tsv").read_text() + f"0{pid}\t{group}\t{split}\n")
    report = audit_dataset(str(tmp_path))
    assert report.passed and report.to_dict()["labels_duplicate_rows_merged"] == 1
    assert "1 identical duplicate rows merged" in {g.name: g for g in report.guards}["conflicting_labels"].detail


@pytest.mark.parametrize("name, laterality, region", [
    ("{pid}_maestro2_oct_r.dcm", "R", None),
    ("{pid}_maestro2_oct_l_macula.dcm", "L", "macula"),
    ("{pid}_maestro2_macula_oct_l_1.2.840.1.dcm", "L", "macula"),
    ("{pid}_cirrus_optic_disc_OD.nii.gz", "R", "optic_disc"),
    ("{pid}-spectralis-macula-left", "L", "macula"),
])
def test_laterality_and_region_are_found_anywhere_in_the_file_name(name, laterality, region):
    item = parse_key(f"{OCT}/zeiss_cirrus/1001/{name.format(pid=1001)}", 10)
    assert (item.participant_id, item.laterality, item.region, item.problem) == ("1001", laterality, region, None)


def test_without_a_manifest_a_region_last_in_the_name_is_selected(tmp_path):
    write(tmp_path, f"{OCT}/topcon_maestro2/1001/1001_maestro2_oct_l_macula.dcm", b"a" * 20)
    write(tmp_path, f"{OCT}/topcon_maestro2/1001/1001_maestro2_oct_r_macula.dcm", b"b" * 20)
    (tmp_path / "participants.tsv").write_bytes(labels_tsv([("1001", "healthy", "train")]))
    report = audit_dataset(str(tmp_path), min_per_class=0)
    assert sorted(report.volumes.laterality) == ["L", "R"] and set(report.volumes.region) == {"macula"}
