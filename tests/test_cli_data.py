"""The data commands as a user runs them: synth, audit, inspect, cache."""

import json

import pytest

from octft.cli import main


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    assert main(["synth", str(root), "--participants", "24", "--frames", "4", "--height", "32", "--width", "32"]) == 0
    return root


def test_synth_then_audit_passes_and_writes_json(release, tmp_path, capsys):
    out = tmp_path / "audit.json"
    assert main(["data", "audit", "--data", str(release), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["passed"] is True
    assert report["files"]["found"] == sum(report["files"][k] for k in ("matched", "unlabeled", "unparsed", "excluded"))
    assert "audit passed" in capsys.readouterr().out


def test_inspect_prints_shape_and_metadata(release, capsys):
    dicom = next(release.rglob("*.dcm"))
    assert main(["data", "inspect", str(dicom), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["shape"] == [4, 32, 32]
    assert described["meta"]["format"] == "dicom"
    assert described["meta"]["participant_id"] == dicom.parent.name


def test_inspect_of_a_bad_file_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "scan.dcm"
    bad.write_text("not an image")
    assert main(["data", "inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("octft: error:") and str(bad) in err and "\n" not in err


def test_cache_builds_then_reuses(release, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["data", "cache", "--data", str(release), f"data.cache_dir={cache}", "data.preprocess.frames=4",
            "data.preprocess.height=16", "data.preprocess.width=16"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    second = capsys.readouterr().out
    built = int(first.split("built ")[1].split(",")[0])
    assert built > 0 and "failed 0" in first
    assert f"built 0, reused {built}" in second


def test_unknown_override_key_is_named(release, capsys):
    assert main(["data", "audit", "--data", str(release), "data.selection.region=[macula]"]) == 2
    assert "unknown key 'data.selection.region'" in capsys.readouterr().err


def test_b2_without_credentials_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.delenv("B2_APPLICATION_KEY_ID", raising=False)
    monkeypatch.delenv("B2_APPLICATION_KEY", raising=False)
    assert main(["data", "audit", "--data", "b2://aireadi/v3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("octft: error:") and "B2_APPLICATION_KEY_ID" in err and "Traceback" not in err
