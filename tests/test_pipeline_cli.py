"""End to end: ``m2diff-preprocess run`` / ``merge`` on tiny synthetic subjects (24x28x20 PET at 2 mm, cube 32)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from badinputs import TABLE_STRUCTURE_CASES, make_bad_input_corpus, write_subject, write_table
from preprocessing.intake import IntakeOptions, load_subject
from preprocessing.options import parse_shard
from preprocessing.pipeline import PipelineOptions, run_pipeline
from preprocessing.subject_build import process_subject
from preprocessing.subjects import read_subjects

REPO = Path(__file__).resolve().parents[1]
FAST = ["--transform", "rigid", "--size", "32"]


def cli(*args, check_rc: int | None = 0, default_threads: bool = False) -> subprocess.CompletedProcess:
    """``default_threads``: ITK's variable unset and 2 torch/OpenMP threads, i.e. what a user's shell gives."""
    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1", "OMP_NUM_THREADS": "1"}
    if default_threads:
        env.pop("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
        env["OMP_NUM_THREADS"] = "2"
    proc = subprocess.run(
        [sys.executable, "-m", "preprocessing.cli", *[str(a) for a in args]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Three subjects: two with MRI (one with a lesion mask), one MRI-free."""
    root = tmp_path_factory.mktemp("cohort")
    rows = [
        write_subject(root, "s01", with_mask=True, seed=1),
        write_subject(root, "s02", seed=2),
        write_subject(root, "s03", with_mri=False, seed=3),
    ]
    return write_table(root / "subjects.csv", rows)


def _keys(manifest: dict) -> dict:
    out = {
        k: sorted((i["subject"], i["orientation"], i["slice"]) for i in manifest[k])
        for k in ("training", "validation", "test")
    }
    out["volumes"] = sorted((v["subject"], v["split"]) for v in manifest["volumes"])
    return out


@pytest.mark.slow
def test_run_outputs_rerun_skips_and_force_redoes(cohort, tmp_path):
    out, man = tmp_path / "out", tmp_path / "manifests" / "tiny.json"
    cli("run", "--subjects", cohort, "--out", out, "--manifest", man, *FAST, "--notes", "synthetic phantoms")
    m = json.loads(man.read_text())
    assert m["provenance"]["notes"] == "synthetic phantoms"
    assert m["provenance"]["parameters"]["transform"] == "Rigid"
    assert sorted(v["subject"] for v in m["volumes"]) == ["s01", "s02", "s03"]
    for key in ("training", "validation", "test", "volumes"):
        items = load_decathlon_datalist(str(man), is_segmentation=False, data_list_key=key)
        for item in items:
            assert Path(item["ld_pet"]).is_file()
    for sid in ("s01", "s02", "s03"):
        folder = out / "subjects" / sid
        assert (folder / "qc.png").stat().st_size > 1000
        record = json.loads((folder / "subject.json").read_text())
        assert record["shape"] == [32, 32, 32]
        for orientation in ("axial", "coronal", "sagittal"):
            assert record["slices"][orientation]["indices"]
            k = record["slices"][orientation]["indices"][0]
            arr = np.load(folder / "slices" / orientation / f"ld_pet_{k:03d}.npy")
            assert arr.shape == (1, 32, 32) and arr.dtype == np.float32
    s01 = json.loads((out / "subjects/s01/subject.json").read_text())
    assert s01["registration"]["similarity"]["mattes_mi"]["before"] is not None
    assert (out / "subjects/s01" / s01["registration"]["transforms"]["forward"][0]).is_file()
    assert (out / "subjects/s01/regions/lesion.nii.gz").is_file()
    assert json.loads((out / "subjects/s03/subject.json").read_text())["registration"] is None
    vol = {v["subject"]: v for v in m["volumes"]}
    assert vol["s03"]["mri_available"] == 0 and vol["s01"]["regions"]["lesion"].endswith("regions/lesion.nii.gz")
    with open(out / "qc" / "summary.csv") as fh:
        summary = list(csv.DictReader(fh))
    assert [r["subject"] for r in summary] == ["s01", "s02", "s03"] and all(r["status"] == "processed" for r in summary)
    assert (out / "qc" / "summary.md").read_text().count("| s0") == 3

    watched = [out / "subjects/s01/subject.json", out / "subjects/s02/ld_pet.nii.gz"]
    before = [p.stat().st_mtime_ns for p in watched]
    again = cli("run", "--subjects", cohort, "--out", out, "--manifest", man, *FAST)
    assert "processed 0, skipped 3" in again.stdout
    assert [p.stat().st_mtime_ns for p in watched] == before
    assert _keys(json.loads(man.read_text())) == _keys(m)

    forced = cli("run", "--subjects", cohort, "--out", out, "--manifest", man, *FAST, "--force")
    assert "processed 3, skipped 0" in forced.stdout
    assert all(p.stat().st_mtime_ns != b for p, b in zip(watched, before, strict=True))
    assert not list((out / "subjects").glob(".*"))  # no temporary folders left

    changed = cli("run", "--subjects", cohort, "--out", out, "--manifest", man, *FAST, "--slices-per-subject", "3")
    assert "processed 3, skipped 0" in changed.stdout  # other parameters: not reused
    assert len(json.loads((out / "subjects/s02/subject.json").read_text())["slices"]["axial"]["indices"]) == 3


@pytest.mark.slow
def test_workers_shards_and_merge_match_a_full_run(cohort, tmp_path):
    full = tmp_path / "m" / "full.json"
    cli("run", "--subjects", cohort, "--out", tmp_path / "full", "--manifest", full, *FAST, "--workers", "2")
    shard_out = tmp_path / "sharded"
    s1 = cli(
        "run",
        "--subjects",
        cohort,
        "--out",
        shard_out,
        "--manifest",
        tmp_path / "m" / "s1.json",
        *FAST,
        "--shard",
        "1/2",
    )
    s2 = cli(
        "run",
        "--subjects",
        cohort,
        "--out",
        shard_out,
        "--manifest",
        tmp_path / "m" / "s2.json",
        *FAST,
        "--shard",
        "2/2",
    )
    assert "processed 2" in s1.stdout and "processed 1" in s2.stdout  # sorted ids: s01,s03 | s02
    merged = tmp_path / "merged" / "all.json"
    cli("merge", "--manifests", tmp_path / "m" / "s1.json", tmp_path / "m" / "s2.json", "--out", merged)
    a, b = json.loads(full.read_text()), json.loads(merged.read_text())
    assert _keys(a) == _keys(b)
    assert b["provenance"]["shard"] is None and len(b["provenance"]["merged_from"]) == 2
    for key in ("training", "volumes"):
        for item in load_decathlon_datalist(str(merged), is_segmentation=False, data_list_key=key):
            assert Path(item["ld_pet"]).is_file()
    # the shards' QC tables are joined in their shared folder, as one unsharded run would have written it
    with open(shard_out / "qc" / "summary.csv") as fh:
        joined = list(csv.DictReader(fh))
    with open(tmp_path / "full" / "qc" / "summary.csv") as fh:
        reference = list(csv.DictReader(fh))
    assert [r["subject"] for r in joined] == [r["subject"] for r in reference] == ["s01", "s02", "s03"]
    assert [r["scale"] for r in joined] == [r["scale"] for r in reference]
    assert (shard_out / "qc" / "summary.md").read_text().count("| s0") == 3
    # shards in different folders: the joined table goes beside the merged manifest
    cli(
        "run",
        "--subjects",
        cohort,
        "--out",
        tmp_path / "elsewhere",
        "--manifest",
        tmp_path / "m" / "s2c.json",
        *FAST,
        "--shard",
        "2/2",
        default_threads=True,
    )
    # registration is reproducible: worker processes, the main process, and a shell without ITK's variable (the
    # CLI then gives ITK one thread) register the same T1 bit for bit
    for sid, folders in (("s01", (shard_out,)), ("s02", (shard_out, tmp_path / "elsewhere"))):
        reference = nib.load(str(tmp_path / "full" / "subjects" / sid / "mri.nii.gz")).get_fdata()
        for folder in folders:
            np.testing.assert_array_equal(
                nib.load(str(folder / "subjects" / sid / "mri.nii.gz")).get_fdata(), reference
            )
    apart = tmp_path / "apart" / "cohort.json"
    cli("merge", "--manifests", tmp_path / "m" / "s1.json", tmp_path / "m" / "s2c.json", "--out", apart)
    with open(tmp_path / "apart" / "cohort_qc_summary.csv") as fh:
        assert [r["subject"] for r in csv.DictReader(fh)] == ["s01", "s02", "s03"]

    dup = cli(
        "merge",
        "--manifests",
        tmp_path / "m" / "s1.json",
        tmp_path / "m" / "s1.json",
        "--out",
        tmp_path / "d.json",
        check_rc=2,
    )
    assert "already given" in dup.stderr or "duplicate subject" in dup.stderr
    conflicting = json.loads((tmp_path / "m" / "s2.json").read_text())
    conflicting["provenance"]["parameters"]["size"] = 64
    (tmp_path / "m" / "s2b.json").write_text(json.dumps(conflicting))
    bad = cli(
        "merge",
        "--manifests",
        tmp_path / "m" / "s1.json",
        tmp_path / "m" / "s2b.json",
        "--out",
        tmp_path / "c.json",
        check_rc=2,
    )
    assert "parameters differ" in bad.stderr and "size" in bad.stderr
    assert not (tmp_path / "d.json").exists() and not (tmp_path / "c.json").exists()


def test_bad_shard_and_size_are_rejected(cohort, tmp_path):
    for args, fragment in ((["--shard", "0/2"], "1 <= I <= N"), (["--shard", "3/2"], "1 <= I <= N"),
                           (["--shard", "a/b"], "I/N"), (["--size", "100"], "multiple of 16"),
                           (["--spacing", "2,2"], "--spacing must be auto, native, X or X,Y,Z")):  # fmt: skip
        proc = cli(
            "run", "--subjects", cohort, "--out", tmp_path / "o", "--manifest", tmp_path / "m.json", *args, check_rc=2
        )
        assert fragment in proc.stderr
    assert parse_shard("2/3") == (2, 3)
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    return make_bad_input_corpus(tmp_path_factory.mktemp("bad"))


def _no_outputs_for(out: Path, sid: str) -> None:
    assert not (out / "subjects" / sid).exists()
    assert not list((out / "subjects").glob(f".*{sid}*")) if (out / "subjects").exists() else True


@pytest.mark.slow
def test_each_bad_input_fails_cleanly(bad_corpus, tmp_path):
    from badinputs import CASE_CLI_ARGS

    for case, (table, fragment) in bad_corpus.items():
        out, man = tmp_path / case / "out", tmp_path / case / "m.json"
        proc = cli(
            "run",
            "--subjects",
            table,
            "--out",
            out,
            "--manifest",
            man,
            *FAST,
            *CASE_CLI_ARGS.get(case, []),
            check_rc=None,
        )
        assert proc.returncode != 0, case
        assert fragment in proc.stderr, (case, proc.stderr)
        assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1, (case, proc.stderr)  # one line
        _no_outputs_for(out, "bad01")
        assert not man.exists(), case


@pytest.mark.slow
def test_keep_going_finishes_good_subjects(bad_corpus, tmp_path):
    """Every bad subject of the corpus in one table (a missing file too: it fails its row only), plus the good one
    and a late (crop) failure."""
    rows = []
    expected = {}
    for case, (table, fragment) in bad_corpus.items():
        if case in TABLE_STRUCTURE_CASES:
            continue
        with open(table) as fh:
            for row in csv.DictReader(fh):
                row = {k: (str((table.parent / v).resolve()) if k in ("ld_pet", "sd_pet", "mri") and v else v)
                       for k, v in row.items()}  # fmt: skip
                if row["subject_id"] == "bad01":
                    row["subject_id"] = f"bad-{case.replace('_', '-')}"
                    expected[row["subject_id"]] = fragment
                    rows.append(row)
                elif not any(r["subject_id"] == "good01" for r in rows):
                    rows.append(row)
    combined = write_table(tmp_path / "all.csv", rows)
    out, man = tmp_path / "out", tmp_path / "m.json"
    proc = cli(
        "run",
        "--subjects",
        combined,
        "--out",
        out,
        "--manifest",
        man,
        *FAST,
        "--qform-policy",
        "reject",
        "--keep-going",
        check_rc=1,
    )
    for sid, fragment in expected.items():
        line = next(ln for ln in proc.stderr.splitlines() if sid in ln)
        assert fragment in line, (sid, line)
        _no_outputs_for(out, sid)
    m = json.loads(man.read_text())
    assert [v["subject"] for v in m["volumes"]] == ["good01"]
    assert all(sid not in man.read_text() for sid in expected)

    # a failure late in the subject (crop, after registration wrote its transforms) leaves nothing behind
    late = cli(
        "run",
        "--subjects",
        combined,
        "--out",
        tmp_path / "late",
        "--manifest",
        tmp_path / "late.json",
        "--transform",
        "rigid",
        "--size",
        "16",
        "--keep-going",
        check_rc=1,
    )
    assert "subject good01" in late.stderr and "larger --size" in late.stderr
    _no_outputs_for(tmp_path / "late", "good01")
    assert json.loads((tmp_path / "late.json").read_text())["volumes"] == []


def test_api_mri_space_and_inference_only_subject(tmp_path):
    root = tmp_path / "in"
    a = write_subject(root, "a01", seed=5)
    b = write_subject(root, "b01", seed=6)
    b["sd_pet"] = ""  # inference-only: no target
    table = write_table(root / "subjects.csv", [a, b])
    rows = {r.subject_id: r for r in read_subjects(table)}
    options = PipelineOptions(transform="rigid", space="mri", size=48, slices_per_subject=4)
    record = process_subject(load_subject(rows["a01"], IntakeOptions()), tmp_path / "out", options)
    assert record["space"] == "mri"
    assert record["spacing"] == pytest.approx([1.6, 1.6, 1.6])  # the T1 grid
    assert record["registration"]["moving"] == "sd_pet" and record["registration"]["fixed"] == "mri"
    assert all(len(v["indices"]) == 4 for v in record["slices"].values())
    assert (tmp_path / "out/subjects/a01/subject.json").is_file()

    summary = run_pipeline(
        table,
        tmp_path / "out2",
        tmp_path / "m.json",
        PipelineOptions(transform="rigid", size=32, split=(1.0, 0.0, 0.0)),
    )
    assert summary.splits == {"a01": "train", "b01": "test"}
    m = json.loads((tmp_path / "m.json").read_text())
    assert {i["subject"] for i in m["test"]} == {"b01"} and all(i["sd_pet"] == "" for i in m["test"])
    assert {i["subject"] for i in m["training"]} == {"a01"}

    with open(table) as fh:
        text = fh.read()
    (root / "explicit.csv").write_text(
        text.replace("subject_id,ld_pet,sd_pet,mri", "subject_id,ld_pet,sd_pet,mri,split").replace(
            "t1.nii.gz\n", "t1.nii.gz,train\n"
        )
    )
    summary = run_pipeline(
        root / "explicit.csv",
        tmp_path / "out2",
        tmp_path / "m2.json",
        PipelineOptions(transform="rigid", size=32, keep_going=True),
    )
    assert "needs a standard-dose PET" in summary.failed["b01"] and summary.skipped == ["a01"]
