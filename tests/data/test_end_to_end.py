"""synth --messy -> audit: every planted fault is found and counted, all three sites match, guards
fail on broken labels, and the same release served from B2 (b2sdk's RawSimulator) audits the same."""

import json

import pytest

from octft.cli import main
from octft.data.audit import audit_dataset
from octft.data.layout import CLASSES
from octft.data.storage import open_storage
from octft.data.synth import synthesize


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    report = synthesize(root, participants=48, seed=7, messy=True, frames=4, height=32, width=32)
    return root, report.to_dict()


def test_every_planted_fault_is_found_and_counted(messy, tmp_path):
    root, truth = messy
    faults = truth["faults"]
    out = tmp_path / "audit.json"
    code = main(["data", "audit", "--data", str(root), "--verify", "--json", str(out)])
    d = json.loads(out.read_text())
    files = d["files"]
    assert files["found"] == files["matched"] + files["unlabeled"] + files["unparsed"] + files["excluded"]

    unparsed = {row["key"]: row["reason"] for row in d["unparsed"]}
    assert faults["truncated"][0] in unparsed and "truncat" in unparsed[faults["truncated"][0]].lower()
    assert unparsed[faults["non_image"][0]].startswith("not an image")
    assert "not listed in retinal_oct/manifest.tsv" in unparsed[faults["not_in_manifest"][0]]
    missing = [row["filepath"].lstrip("/") for row in d["manifest_missing"]]
    assert missing == faults["manifest_missing_file"]
    assert d["duplicates"] == [sorted(faults["duplicates"][0])]
    excluded = {row["key"]: row["rule"] for row in d["excluded"]}
    duplicate_copy = sorted(faults["duplicates"][0])[1]
    assert excluded[duplicate_copy].startswith("duplicate of")
    assert sorted(d["participants"]["oct_without_labels"]) == sorted(faults["unlabelled_participants"])
    assert sorted(d["participants"]["labels_without_oct"]) == sorted(faults["labelled_without_files"])
    assert {row["participant_id"] for row in d["unlabeled"]} == set(faults["unlabelled_participants"])

    # Zero-padded and prefixed folders still match their labels.
    volumes = audit_dataset(str(root)).volumes
    matched_folders = {key.split("/")[3] for key in volumes.key}
    assert set(faults["zero_padded_folders"]) | set(faults["prefixed_folders"]) <= matched_folders
    # All three sites are matched.
    assert {pid[0] for pid in volumes.participant_id} == {"1", "4", "7"}
    assert d["participants"]["matched"] == truth["participants"] - len(faults["labelled_without_files"])
    # Every class in every split, matching the labels the generator wrote.
    for split in ("train", "val", "test"):
        assert all(d["splits"][split][name] >= 1 for name in CLASSES)
    guards = {g["name"]: g["passed"] for g in d["guards"]}
    assert guards["duplicate_files"] is False and code == 1  # the planted duplicate fails its guard
    assert all(passed for name, passed in guards.items() if name != "duplicate_files")


def test_guards_fail_on_a_broken_labels_file(messy, tmp_path, capsys):
    root, _ = messy
    lines = (root / "participants.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    group = header.index("study_group")
    broken = [lines[0]] + [
        "\t".join(cols[:group] + ["healthy"] + cols[group + 1 :]) if cols[header.index("recommended_split")] == "val" else line
        for line in lines[1:] for cols in [line.split("\t")]
    ]
    labels = tmp_path / "broken.tsv"
    labels.write_text("\n".join(broken) + "\n")
    code = main(["data", "audit", "--data", str(root), "--labels", str(labels), "--allow", "duplicate_files"])
    err = capsys.readouterr().err
    assert code == 1
    assert "guard classes_in_val failed" in err and "insulin_dependent=0" in err


def test_the_same_release_through_the_b2_simulator_audits_the_same(messy, tmp_path):
    from b2sdk.v2 import B2Api, B2HttpApiConfig, InMemoryAccountInfo, RawSimulator

    root, _ = messy
    api = B2Api(InMemoryAccountInfo(), api_config=B2HttpApiConfig(_raw_api_class=RawSimulator))
    key_id, key = api.session.raw_api.create_account()
    api.authorize_account("production", key_id, key)
    bucket = api.create_bucket("aireadi", "allPrivate")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        bucket.upload_bytes(path.read_bytes(), "v3/" + path.relative_to(root).as_posix())

    storage = open_storage("b2://aireadi/v3", b2_api=api, cache_dir=tmp_path / "b2cache")
    from_b2 = audit_dataset("b2://aireadi/v3", storage=storage, verify=True).to_dict()
    local = audit_dataset(str(root), verify=True).to_dict()
    for d in (from_b2, local):
        for key in ("data", "labels", "seconds"):
            d.pop(key)
    assert from_b2 == local
