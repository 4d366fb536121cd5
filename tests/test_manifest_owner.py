"""The manifest's one owner (m2diff_monai.data.manifest): round trip, validation errors, split aliases,
selection by split and subject, the packaged schema, and its place at the bottom of the import graph."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from m2diff_monai.data import manifest as mf
from m2diff_monai.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def slice_item(subject: str, orientation: str = "axial", k: int = 0, mri: bool = True) -> dict:
    return {
        "ld_pet": f"{subject}/ld_{k}.npy",
        "sd_pet": f"{subject}/sd_{k}.npy",
        "mri": f"{subject}/mri_{k}.npy" if mri else "",
        "mri_available": int(mri),
        "subject": subject,
        "orientation": orientation,
        "slice": k,
    }


def volume_item(subject: str, split: str) -> dict:
    return {
        "subject": subject,
        "split": split,
        "ld_pet": f"{subject}/ld.nii.gz",
        "sd_pet": f"{subject}/sd.nii.gz",
        "mri": "",
        "brain_mask": f"{subject}/mask.nii.gz",
        "scale": 2.5,
        "offset": 0.0,
        "source_ld_pet": f"raw/{subject}_ld.nii.gz",
        "mri_available": 0,
        "source_mri": "",
        "regions": {},
        "preprocessed_dir": subject,
    }


def small_manifest() -> dict:
    return {
        "name": "small",
        "training": [slice_item("a", "axial", 0), slice_item("a", "coronal", 1), slice_item("b", "axial", 0, False)],
        "validation": [slice_item("c")],
        "test": [],
        "volumes": [
            volume_item("a", "train"),
            volume_item("b", "train"),
            volume_item("c", "val"),
            volume_item("d", "test"),
        ],
        "provenance": mf.provenance("tests", {"size": 16}, notes="unit test"),
    }


def test_round_trip_write_read_validate(tmp_path):
    content = small_manifest()
    path = mf.write_manifest(tmp_path / "m.json", content)
    assert mf.read_manifest(path) == json.loads(json.dumps(content))
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # atomic: no temp file left behind
    assert mf.schema_problems(mf.read_manifest(path)) == []


def test_invalid_manifests_are_one_line_input_errors_naming_the_file(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(InputError, match="m2diff-preprocess demo") as err:
        mf.read_manifest(missing)
    assert str(missing) in str(err.value)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    broken = small_manifest()
    broken["volumes"][1]["split"] = "training"  # the datalist key, not a split
    del broken["volumes"][2]["scale"]
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(broken))
    for path, problem in ((bad_json, "not valid JSON"), (wrong, r"volumes\[1\]\.split: 'training' is not one of")):
        with pytest.raises(InputError, match=problem) as err:
            mf.read_manifest(path)
        line = str(err.value)
        assert "\n" not in line and line.startswith(f"file {path}:")
    assert "(and 1 more)" in line  # the second problem is counted, not hidden


def test_an_invalid_manifest_is_never_written(tmp_path):
    target = mf.write_manifest(tmp_path / "m.json", small_manifest())
    before = target.read_bytes()
    broken = small_manifest()
    broken["training"][0]["ld_pet"] = "/absolute/path.npy"
    with pytest.raises(InputError, match=r"training\[0\]\.ld_pet"):
        mf.write_manifest(target, broken)
    assert target.read_bytes() == before


def test_split_names_and_their_aliases():
    assert mf.SPLITS == ("train", "val", "test")
    assert [mf.canonical_split(s) for s in ("train", "training", "val", "validation", "test", " Test ")] == [
        "train",
        "train",
        "val",
        "val",
        "test",
        "test",
    ]
    assert [mf.datalist_key(s) for s in ("train", "training", "val", "validation", "test")] == [
        "training",
        "training",
        "validation",
        "validation",
        "test",
    ]
    assert mf.canonical_split("all", allow_all=True) is None
    with pytest.raises(InputError, match="unknown split 'all'"):
        mf.canonical_split("all")
    with pytest.raises(InputError, match="unknown split 'holdout'"):
        mf.canonical_split("holdout", allow_all=True)
    assert set(mf.SLICE_LISTS) | {"volumes"} == set(mf.LIST_KEYS)
    assert set(mf.load_schema()["required"]) >= set(mf.LIST_KEYS)


def test_select_volumes_by_split_and_subject(tmp_path):
    content = small_manifest()
    subjects = lambda items: [it["subject"] for it in items]  # noqa: E731
    assert subjects(mf.select_volumes(content, "train")) == ["a", "b"]
    assert subjects(mf.select_volumes(content, "training")) == ["a", "b"]
    assert subjects(mf.select_volumes(content, "validation")) == ["c"]
    assert subjects(mf.select_volumes(content, "all")) == ["a", "b", "c", "d"]
    assert subjects(mf.select_volumes(content, "all", subjects=["d", "a"])) == ["a", "d"]
    with pytest.raises(InputError, match="subject\\(s\\) d not in the manifest's train volumes"):
        mf.select_volumes(content, "train", subjects=["d"], path=tmp_path / "m.json")
    content["volumes"] = [it for it in content["volumes"] if it["split"] != "test"]
    with pytest.raises(InputError, match="no 'test' volumes to infer"):
        mf.select_volumes(content, "test", purpose="infer")


def test_slice_items_resolve_paths_and_filter_orientations(tmp_path):
    path = mf.write_manifest(tmp_path / "sub" / "m.json", small_manifest())
    items = mf.slice_items(path, "train")
    assert items == mf.slice_items(path, "training") and len(items) == 3
    assert items[0]["ld_pet"] == str(path.parent.resolve() / "a/ld_0.npy")
    assert items[2]["mri"] == "" and items[2]["mri_available"] == 0  # "" is not turned into the folder's path
    assert [it["orientation"] for it in mf.slice_items(path, "train", orientations="coronal")] == ["coronal"]
    with pytest.raises(InputError, match="no 'test' slice items"):
        mf.slice_items(path, "test")


def test_packaged_schema_is_the_repository_schema():
    """``data_manifests/schema.json`` (SPEC) and the copy the code reads (package data) must not drift."""
    assert mf.SCHEMA_PATH.parent == Path(mf.__file__).parent  # inside the package: works from a wheel
    assert (REPO / "data_manifests" / "schema.json").read_bytes() == mf.SCHEMA_PATH.read_bytes()


def test_path_keys_come_from_the_schema_and_match_the_safety_rule():
    from m2diff_monai.io import safety

    assert mf.SLICE_PATH_KEYS == ("ld_pet", "sd_pet", "mri")
    assert set(mf.VOLUME_PATH_KEYS) == {
        "ld_pet",
        "sd_pet",
        "mri",
        "brain_mask",
        "source_ld_pet",
        "source_sd_pet",
        "source_mri",
        "preprocessed_dir",
        "subject_json",
    }
    # io/safety sits below data/ and keeps its own list of the inputs a manifest names: it must not drift
    assert set(safety.MANIFEST_PATH_KEYS) == set(mf.VOLUME_PATH_KEYS)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_owner_sits_at_the_bottom_layer_and_breaks_the_evaluation_loop():
    allowed = ("m2diff_monai.errors", "m2diff_monai.io", "m2diff_monai.data.orientation")
    own = {m for m in imported_modules(Path(mf.__file__)) if m.startswith(("m2diff_monai", "preprocessing"))}
    assert all(m.startswith(allowed) or m == "m2diff_monai" for m in own), own
    package = Path(mf.__file__).parents[1]
    assert "m2diff_monai.evaluation.run" not in imported_modules(package / "evaluation" / "representation.py")


def test_item_paths_and_subject_record_resolve_against_the_manifest_folder(tmp_path):
    """Relative paths resolve against the manifest's folder; ``subject.json`` is found through ``subject_json``,
    else ``preprocessed_dir``, else the manifest folder; missing is {} or an InputError by the caller's choice."""
    assert mf.item_path(tmp_path, "a/b.nii.gz") == tmp_path / "a" / "b.nii.gz"
    assert mf.item_path(tmp_path, "") is None and mf.item_path(tmp_path, None) is None
    assert mf.subject_record_path({}, tmp_path) == tmp_path / "subject.json"
    assert mf.subject_record_path({"preprocessed_dir": "s1"}, tmp_path) == tmp_path / "s1" / "subject.json"
    explicit = {"preprocessed_dir": "s1", "subject_json": "elsewhere/r.json"}
    assert mf.subject_record_path(explicit, tmp_path) == tmp_path / "elsewhere" / "r.json"

    item = {"subject": "s1", "preprocessed_dir": "s1"}
    assert mf.read_subject_record(item, tmp_path, "s1", required=False) == {}
    with pytest.raises(InputError, match="s1.*subject.json of the preprocessed subject does not exist"):
        mf.read_subject_record(item, tmp_path, "s1", required=True)
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "subject.json").write_text("{not json")
    for required in (False, True):
        with pytest.raises(InputError, match="cannot read subject.json"):
            mf.read_subject_record(item, tmp_path, "s1", required=required)
    (tmp_path / "s1" / "subject.json").write_text(json.dumps({"space": "pet"}))
    assert mf.read_subject_record(item, tmp_path, "s1", required=True) == {"space": "pet"}
