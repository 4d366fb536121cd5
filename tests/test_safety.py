"""Issue 13: never destroy an input, never write outside the output, never serve stale results.

One test per class of :data:`badinputs.SAFETY_CLASSES` (each reproduces the mistake, checks the clear error or the
correct behaviour, and that every input is byte-identical afterwards), plus property-style tests of the path rule
in :mod:`m2diff_monai.io.safety`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from badinputs import (
    SAFETY_CLASSES,
    make_unsafe_output_corpus,
    rewrite_manifest_subject,
    tree_digest,
    write_subject,
    write_table,
)
from m2diff_monai.errors import InputError
from m2diff_monai.io import safety
from preprocessing.pipeline import PipelineOptions, run_pipeline

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1", "PYTHONWARNINGS": "ignore"}
FAST = PipelineOptions(transform="rigid", size=32, slices_per_subject=2, split=(0.0, 0.0, 1.0))


def preprocess_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "preprocessing.cli", *[str(a) for a in args]],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


# ----------------------------------------------------------------------------------------- the path rule
def test_corpus_names_every_class():
    assert len(SAFETY_CLASSES) == 8 and len(set(SAFETY_CLASSES)) == 8


def _tree(tmp_path: Path) -> tuple[Path, Path, safety.RunInputs]:
    raw = tmp_path / "cohort" / "sub01"
    raw.mkdir(parents=True)
    ld = raw / "ld_pet.nii.gz"
    ld.write_bytes(b"raw pet")
    return raw, ld, safety.RunInputs([("ld_pet", ld)])


def test_rule_refuses_the_input_and_every_folder_above_it(tmp_path):
    raw, ld, inputs = _tree(tmp_path)
    for target, relation in (
        (ld, "overwrite the input ld_pet"),
        (raw, "holds the input ld_pet"),
        (raw.parent, "holds the input ld_pet"),
    ):
        with pytest.raises(InputError, match=relation) as err:
            inputs.check(target, "--out")
        assert "--out" in str(err.value) and str(ld) in str(err.value)
    # neighbours, children of the input's folder and look-alike prefixes are fine
    for ok in (
        raw / "pred.nii.gz",
        raw / "ld_pet.nii",
        tmp_path / "cohort" / "sub01x",
        tmp_path / "cohort2",
        raw / "ld_pet.nii.gz.bak",
        tmp_path / "cohort" / "sub0",
    ):
        assert inputs.check(ok, "--out") == ok


def test_rule_follows_dotdot_symlinks_and_hard_links(tmp_path):
    raw, ld, inputs = _tree(tmp_path)
    (tmp_path / "other").mkdir()
    aliases = [
        tmp_path / "other" / ".." / "cohort" / "sub01" / "ld_pet.nii.gz",
        tmp_path / "cohort" / "." / "sub01" / ".." / "sub01",
    ]
    link_dir = tmp_path / "linked"
    link_dir.symlink_to(tmp_path / "cohort", target_is_directory=True)
    aliases += [link_dir / "sub01" / "ld_pet.nii.gz", link_dir / "sub01", link_dir]
    link_file = tmp_path / "other" / "pred.nii.gz"
    link_file.symlink_to(ld)
    hard = tmp_path / "other" / "hard.nii.gz"
    os.link(ld, hard)
    aliases += [link_file, hard]
    for alias in aliases:
        with pytest.raises(InputError):
            inputs.check(alias, "--out")
    # and the other way round: an input given through a symlink protects the real file
    via_link = safety.RunInputs([("mri", link_dir / "sub01" / "ld_pet.nii.gz")])
    with pytest.raises(InputError, match="holds the input mri"):
        via_link.check(tmp_path / "cohort", "--out")


def test_rule_property_random_spellings_of_inputs_and_their_folders(tmp_path):
    """Random spellings (``.``/``..`` detours, symlinked folders) of the input or a folder above it are always
    refused; random spellings of unrelated paths never are."""
    rng = random.Random(13)
    root = tmp_path / "r"
    folders = [root / a / b for a in ("x", "y") for b in ("p", "q")]
    for folder in folders:
        folder.mkdir(parents=True)
    (tmp_path / "lnk").symlink_to(root, target_is_directory=True)
    inputs = safety.RunInputs()
    protected = []
    for folder in folders[:2]:
        f = folder / "in.nii.gz"
        f.write_bytes(b"x")
        inputs.add("input", f)
        protected += [f, folder, folder.parent, root]

    def spell(path: Path) -> Path:
        rel = path.relative_to(root).parts
        base = rng.choice([root, tmp_path / "lnk", root / "y" / ".."])
        out = base
        for part in rel:
            if rng.random() < 0.3:
                out = out / rng.choice(["x", "y"]) / ".."
            if rng.random() < 0.2:
                out = out / "."
            out = out / part
        return out

    unrelated = [folders[2] / "in.nii.gz", folders[3], folders[2] / "new.nii.gz", root / "x" / "p" / "pred.nii.gz"]
    for _ in range(200):
        with pytest.raises(InputError):
            inputs.check(spell(rng.choice(protected)), "--out")
        target = spell(rng.choice(unrelated))
        assert inputs.check(target, "--out") == target


def test_case_only_difference_is_the_same_file_where_the_file_system_says_so(tmp_path):
    """On a case-insensitive file system ``SUB01/LD.nii.gz`` *is* ``sub01/ld.nii.gz``: identity (device, inode)
    catches it. Simulated everywhere with a hard link under the other-case name, which is exactly what such a file
    system presents (two names, one inode)."""
    raw, ld, inputs = _tree(tmp_path)
    other_case = raw / "LD_PET.nii.gz"
    if other_case.exists():  # a real case-insensitive file system (macOS, Windows)
        with pytest.raises(InputError):
            inputs.check(other_case, "--out")
        with pytest.raises(InputError):
            inputs.check(tmp_path / "COHORT", "--out")
    else:
        os.link(ld, other_case)
        with pytest.raises(InputError, match="overwrite the input"):
            inputs.check(other_case, "--out")


def test_case_insensitive_file_system_real(tmp_path):
    probe = tmp_path / "probe"
    probe.write_text("x")
    if not (tmp_path / "PROBE").exists():
        pytest.skip("this file system is case-sensitive: the case-only alias is covered by the hard-link simulation")
    _, _, inputs = _tree(tmp_path)
    with pytest.raises(InputError):
        inputs.check(tmp_path / "Cohort" / "SUB01", "--out")


def test_names_read_from_data_must_be_safe_file_names(tmp_path):
    for bad in ("../escape", "..", ".", "", "/abs", "a/b", "a\\b", "a b", "x\x00", "sub.01", None, 7):
        with pytest.raises(InputError, match="may contain only"):
            safety.check_name(bad, "manifest subject id", tmp_path / "m.json")
    assert safety.check_name("sub-01_A", "subject id") == "sub-01_A"
    assert safety.child(tmp_path, "s01.nii.gz", "--out-dir") == tmp_path / "s01.nii.gz"
    for escape in ("../s01.nii.gz", "/etc/s01.nii.gz", "a/../../x", "."):
        with pytest.raises(InputError, match="outside --out-dir"):
            safety.child(tmp_path, escape, "--out-dir")
    with pytest.raises(InputError, match="outside"):
        safety.RunInputs().check(tmp_path / ".." / "x", "--out-dir", root=tmp_path)


def test_fingerprint_tells_same_size_rewrites_apart(tmp_path):
    small = tmp_path / "small.nii"
    small.write_bytes(b"a" * 1000)
    before = safety.fingerprint_files({"ld_pet": small, "mri": None})
    stat = small.stat()
    small.write_bytes(b"b" * 1000)
    os.utime(small, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old modification time
    after = safety.fingerprint_files({"ld_pet": small, "mri": None})
    assert before["ld_pet"]["size"] == after["ld_pet"]["size"] and before["ld_pet"]["hashed"] == "full"
    assert safety.stale_roles(before, after) == ["ld_pet"]
    assert safety.stale_roles(after, safety.fingerprint_files({"ld_pet": small, "mri": None})) == []
    assert safety.stale_roles({"ld_pet": {"path": str(small), "size": 1000}, "mri": None}, after) == ["ld_pet"]
    assert safety.stale_roles(after, {**after, "mask_lesion": safety.fingerprint(small)}) == ["mask_lesion"]

    big = tmp_path / "big.nii"
    size = safety.FULL_HASH_MAX_BYTES + 3 * safety.EDGE_BYTES
    big.write_bytes(bytes(size))
    first = safety.fingerprint(big)
    assert first["hashed"] == "first+last MiB"
    with open(big, "r+b") as fh:  # change a byte in the middle: only the modification time can tell
        fh.seek(size // 2)
        fh.write(b"\x01")
    os.utime(big, ns=(first["mtime_ns"] + 10**9, first["mtime_ns"] + 10**9))
    assert safety.stale_roles({"ld_pet": first}, {"ld_pet": safety.fingerprint(big)}) == ["ld_pet"]
    with open(big, "r+b") as fh:  # a change in the last MiB shows in the hash itself
        fh.seek(size - 10)
        fh.write(b"\x02")
    os.utime(big, ns=(first["mtime_ns"], first["mtime_ns"]))
    assert safety.fingerprint(big)["sha256"] != first["sha256"]


def test_lock_refuses_a_second_holder_in_another_process(tmp_path):
    code = (
        "import sys\nfrom m2diff_monai.io.safety import output_lock\nfrom m2diff_monai.errors import InputError\n"
        "try:\n    with output_lock(sys.argv[1], 'm2diff-x', '--out'):\n        print('acquired')\n"
        "except InputError as err:\n    print(err)\n"
    )
    with safety.output_lock(tmp_path, "m2diff-x", "--out"):
        proc = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120
        )
        assert "another m2diff-x run is writing to this --out folder" in proc.stdout, proc.stdout + proc.stderr
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.strip() == "acquired"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_cleanup_touches_only_temps_whose_owner_is_gone(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = safety.owned_temp_prefix("tmp", "s01").split(".")[3].rsplit("-p", 1)[0]
        names = {
            "live": f".tmp.s01.{host}-p{live.pid}.abc",
            "dead": f".tmp.s01.{host}-p{_dead_pid()}.abc",
            "dead_old": f".old.s01.{host}-p{_dead_pid()}.xyz",
            "other_host": f".tmp.s01.elsewhere-p{_dead_pid()}.abc",
            "legacy": ".tmp.s01.k2j3h4",
            "other_subject": f".tmp.s011.{host}-p{_dead_pid()}.abc",
        }
        for name in names.values():
            (tmp_path / name).mkdir()
        removed = safety.remove_abandoned_temps(tmp_path, ("tmp", "old"), "s01")
        assert sorted(p.name for p in removed) == sorted([names["dead"], names["dead_old"]])
        for kept in ("live", "other_host", "legacy", "other_subject"):
            assert (tmp_path / names[kept]).is_dir(), kept
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------------------- classes 1 and 2 (+ corpus)
@pytest.mark.slow
def test_preprocessing_unsafe_output_corpus(tmp_path):
    """Classes 1 and 2 and their variants: exit 2, one line naming the input, nothing changed or added."""
    corpus = make_unsafe_output_corpus(tmp_path / "corpus")
    assert {"out_holds_raw_cohort", "manifest_is_table"} <= set(corpus)
    for case, (argv, fragment, folder) in corpus.items():
        before = tree_digest(folder)
        proc = preprocess_cli(*argv)
        assert proc.returncode == 2, (case, proc.stderr)
        line = one_line(proc.stderr)
        assert fragment in line and "choose another" in line, (case, line)
        assert tree_digest(folder) == before, case


def test_out_holding_the_raw_cohort_is_refused_in_process(tmp_path):
    """Class 1 through the API: raw at DIR/subjects/<id>/, --out DIR."""
    subjects = tmp_path / "DIR" / "subjects"
    table = write_table(subjects / "subjects.csv", [write_subject(subjects, "s01", seed=3)])
    before = tree_digest(tmp_path)
    with pytest.raises(InputError, match=r"--out would replace or delete a folder that holds the input ld_pet"):
        run_pipeline(table, tmp_path / "DIR", tmp_path / "m.json", FAST)
    assert tree_digest(tmp_path) == before


def test_manifest_that_is_the_table_is_refused_in_process(tmp_path):
    table = write_table(tmp_path / "subjects.csv", [write_subject(tmp_path, "s01", seed=3)])
    before = tree_digest(tmp_path)
    with pytest.raises(InputError, match="--manifest would overwrite the input subjects table"):
        run_pipeline(table, tmp_path / "out", table, FAST)
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()


def test_simulate_one_file_never_overwrites_its_source(tmp_path):
    from preprocessing.cli import main

    cells = write_subject(tmp_path, "s01", seed=3, with_mri=False)
    sd = tmp_path / cells["sd_pet"]
    before = tree_digest(tmp_path)
    assert main(["simulate", "--sd-pet", str(sd), "--out", str(sd), "--drf", "4"]) == 2
    assert main(["simulate", "--sd-pet", str(sd), "--out", str(tmp_path / "ld.nii.gz"), "--sd-out", str(sd)]) == 2
    assert tree_digest(tmp_path) == before


# -------------------------------------------------------------------------------------------- class 3
@pytest.fixture(scope="module")
def eval_cohort(tmp_path_factory):
    from test_evaluate_cli import build_cohort

    return build_cohort(tmp_path_factory.mktemp("safety_cohort"))


def _flat_source_manifest(cohort: dict, folder: Path) -> Path:
    """The cohort's manifest with every source LD PET moved to ``folder/<id>.nii.gz`` (the prediction name)."""
    content = json.loads(cohort["manifest"].read_text())
    folder.mkdir(parents=True, exist_ok=True)
    base = cohort["manifest"].parent
    for item in content["volumes"]:
        source = (base / item["source_ld_pet"]).resolve()
        flat = folder / f"{item['subject']}.nii.gz"
        shutil.copyfile(source, flat)
        item["source_ld_pet"] = os.path.relpath(flat, base)
    out = base / "flat.json"
    out.write_text(json.dumps(content))
    return out


def test_cohort_inference_never_overwrites_a_source_pet(eval_cohort, tmp_path):
    from m2diff_monai.inference.cli import main
    from test_inference import identity_checkpoint

    flat = tmp_path / "flat"
    manifest = _flat_source_manifest(eval_cohort, flat)
    checkpoint = identity_checkpoint(tmp_path / "id.pt")
    before, before_cohort = tree_digest(flat), tree_digest(eval_cohort["root"])
    rc = main(
        [
            "--checkpoint",
            str(checkpoint),
            "--manifest",
            str(manifest),
            "--split",
            "all",
            "--out-dir",
            str(flat),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == 2
    assert tree_digest(flat) == before and tree_digest(eval_cohort["root"]) == before_cohort
    # the checkpoint, the manifest and --summary are inputs too
    rc = main(
        [
            "--checkpoint",
            str(checkpoint),
            "--manifest",
            str(manifest),
            "--out-dir",
            str(tmp_path / "ok"),
            "--summary",
            str(checkpoint),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == 2 and checkpoint.is_file() and not (tmp_path / "ok").exists()


def test_cohort_inference_error_line_names_option_and_input(eval_cohort, tmp_path, capsys):
    from m2diff_monai.inference.cli import main

    flat = tmp_path / "flat"
    manifest = _flat_source_manifest(eval_cohort, flat)
    rc = main(
        [
            "--checkpoint",
            str(tmp_path / "never_loaded.pt"),
            "--manifest",
            str(manifest),
            "--split",
            "all",
            "--out-dir",
            str(flat),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and "--out-dir would overwrite the input source_ld_pet of subject s01" in line, line


# -------------------------------------------------------------------------------------------- class 4
def test_export_force_never_deletes_the_training_run(tmp_path, capsys):
    from m2diff_monai.export.cli import main
    from test_export import BUNDLE, TINY_V6, write_checkpoint

    run_dir = tmp_path / "runs" / "m2diff"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "train.log").write_text("epoch 1 loss 0.1\n")
    checkpoint = write_checkpoint(run_dir / "checkpoints" / "best.pt", TINY_V6)
    before = tree_digest(tmp_path)
    rc = main(
        ["--bundle", str(BUNDLE), "--checkpoint", str(checkpoint), "--out", str(run_dir), "--force", "--no-progress"]
    )
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and "--out would replace or delete a folder that holds the input --checkpoint" in line, line
    assert tree_digest(tmp_path) == before
    # --force replaces an earlier export only: a folder of other files (no input among them) is kept too
    other = tmp_path / "notes"
    other.mkdir()
    (other / "paper.md").write_text("draft")
    rc = main(
        ["--bundle", str(BUNDLE), "--checkpoint", str(checkpoint), "--out", str(other), "--force", "--no-progress"]
    )
    assert rc == 2 and "earlier export" in one_line(capsys.readouterr().err)
    assert (other / "paper.md").read_text() == "draft" and tree_digest(tmp_path / "runs") == before_runs(before)


def before_runs(before: dict[str, str]) -> dict[str, str]:
    return {k[len("runs/") :]: v for k, v in before.items() if k.startswith("runs/")}


# -------------------------------------------------------------------------------------------- class 5
def test_manifest_subject_id_with_dotdot_is_refused_by_evaluate_and_inference(eval_cohort, tmp_path, capsys):
    from m2diff_monai.evaluation import cli as evaluate_cli
    from m2diff_monai.evaluation.inputs import prediction_path
    from m2diff_monai.inference.cli import main as infer_main

    manifest = rewrite_manifest_subject(
        eval_cohort["manifest"], eval_cohort["manifest"].parent / "escape.json", "s01", "../escape"
    )
    # a planted "prediction" outside the prediction folder that the old code would have read
    planted = eval_cohort["preds"] / "escape.nii.gz"
    shutil.copyfile(eval_cohort["preds"] / "Good" / "s02.nii.gz", planted)
    before = tree_digest(eval_cohort["root"])
    out = tmp_path / "report"
    rc = evaluate_cli.main(
        [
            "--manifest",
            str(manifest),
            "--pred",
            f"Good={eval_cohort['preds'] / 'Good'}",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and "volumes[0].subject: '../escape' does not match" in line, line  # the schema refuses it
    assert not out.exists() and not (tmp_path / "escape.png").exists()

    rc = infer_main(
        [
            "--checkpoint",
            str(tmp_path / "never_loaded.pt"),
            "--manifest",
            str(manifest),
            "--split",
            "all",
            "--out-dir",
            str(tmp_path / "preds" / "inner"),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and "'../escape'" in line, line
    assert not (tmp_path / "preds").exists()
    assert tree_digest(eval_cohort["root"]) == before
    with pytest.raises(InputError):
        prediction_path(eval_cohort["preds"] / "Good", "../escape")
    planted.unlink()
    manifest.unlink()


# -------------------------------------------------------------------------------------------- class 6
def _nii_subject(folder: Path, sid: str, seed: int) -> dict[str, str]:
    """A subject whose LD PET is an uncompressed .nii: a corrected image has exactly the same size."""
    cells = write_subject(folder, sid, seed=seed, with_mri=False)
    gz = folder / cells["ld_pet"]
    nii = gz.with_name("ld_pet.nii")
    nib.save(nib.load(gz), str(nii))
    gz.unlink()
    cells["ld_pet"] = nii.relative_to(folder).as_posix()
    return cells


def test_same_size_rewrite_is_redone_and_reported(tmp_path):
    raw = tmp_path / "raw"
    table = write_table(raw / "subjects.csv", [_nii_subject(raw, "s01", 4)])
    out, manifest = tmp_path / "out", tmp_path / "m.json"
    first = run_pipeline(table, out, manifest, FAST)
    assert first.processed == ["s01"]
    again = run_pipeline(table, out, manifest, FAST)
    assert again.skipped == ["s01"] and again.changed == {}
    record = json.loads((out / "subjects/s01/subject.json").read_text())
    assert record["inputs"]["ld_pet"]["hashed"] == "full"

    ld = raw / "s01" / "ld_pet.nii"
    stat = ld.stat()
    img = nib.load(ld)
    data = np.asarray(img.dataobj) * np.float32(2.0)  # "the corrected image": same header, same size
    nib.save(nib.Nifti1Image(data.astype(img.get_data_dtype()), img.affine, img.header), str(ld))
    os.utime(ld, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even a copy that kept the old time stamp
    assert ld.stat().st_size == stat.st_size
    before = tree_digest(raw)
    third = run_pipeline(table, out, manifest, FAST)
    assert third.processed == ["s01"] and third.changed == {"s01": ["ld_pet"]}
    new = json.loads((out / "subjects/s01/subject.json").read_text())
    assert new["inputs"]["ld_pet"]["sha256"] != record["inputs"]["ld_pet"]["sha256"]
    assert new["normalization"]["scale"] == pytest.approx(2 * record["normalization"]["scale"], rel=1e-4)
    assert tree_digest(raw) == before

    # merge never writes over a manifest it merges
    from preprocessing.merge import merge_manifests

    text = manifest.read_text()
    with pytest.raises(InputError, match="--out would overwrite the input manifest"):
        merge_manifests([manifest], manifest)
    assert manifest.read_text() == text


def test_cli_says_which_input_changed(tmp_path):
    raw = tmp_path / "raw"
    table = write_table(raw / "subjects.csv", [_nii_subject(raw, "s01", 4)])
    out, manifest = tmp_path / "out", tmp_path / "m.json"
    args = [
        "run",
        "--subjects",
        table,
        "--out",
        out,
        "--manifest",
        manifest,
        "--transform",
        "rigid",
        "--size",
        "32",
        "--slices-per-subject",
        "2",
        "--split",
        "0,0,1",
    ]
    assert preprocess_cli(*args).returncode == 0
    ld = raw / "s01" / "ld_pet.nii"
    raw_bytes = bytearray(ld.read_bytes())
    middle = len(raw_bytes) // 2
    raw_bytes[middle : middle + 64] = bytes(b ^ 0x55 for b in raw_bytes[middle : middle + 64])  # same size, new content
    ld.write_bytes(bytes(raw_bytes))
    proc = preprocess_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "subject s01: ld_pet changed since its last run; redone" in proc.stderr
    assert "processed 1, skipped 0" in proc.stdout


# -------------------------------------------------------------------------------------------- class 7
def test_second_run_on_one_out_refuses_and_live_temps_survive(tmp_path):
    raw = tmp_path / "raw"
    table = write_table(raw / "subjects.csv", [write_subject(raw, "s01", seed=5, with_mri=False)])
    out, manifest = tmp_path / "out", tmp_path / "m.json"
    before = tree_digest(raw)
    with safety.output_lock(out, "m2diff-preprocess", "--out", ".m2diff-preprocess.lock"):  # run one, live
        proc = preprocess_cli(
            "run", "--subjects", table, "--out", out, "--manifest", manifest, "--transform", "rigid", "--size", "32"
        )
    assert proc.returncode == 2
    assert "another m2diff-preprocess run is writing to this --out folder" in one_line(proc.stderr)
    assert not manifest.exists() and not (out / "subjects").exists()

    # a run that does get the folder removes only temps whose owner is gone
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        prefix = safety.owned_temp_prefix("tmp", "s01")
        host = prefix.split(".")[3].rsplit("-p", 1)[0]
        in_progress = out / "subjects" / f".tmp.s01.{host}-p{live.pid}.abc"
        abandoned = out / "subjects" / f".tmp.s01.{host}-p{_dead_pid()}.abc"
        for folder in (in_progress, abandoned):
            folder.mkdir(parents=True)
            (folder / "ld_pet.nii.gz").write_bytes(b"half")
        summary = run_pipeline(table, out, manifest, FAST)
        assert summary.processed == ["s01"]
        assert in_progress.is_dir() and (in_progress / "ld_pet.nii.gz").read_bytes() == b"half"
        assert not abandoned.exists()
    finally:
        live.kill()
        live.wait()
    assert tree_digest(raw) == before


# -------------------------------------------------------------------------------------------- class 8
def test_keep_going_fails_only_the_row_whose_file_is_missing(tmp_path):
    raw = tmp_path / "raw"
    good = write_subject(raw, "good01", seed=1, with_mri=False)
    bad = write_subject(raw, "bad01", seed=2, with_mri=False)
    (raw / bad["ld_pet"]).unlink()
    table = write_table(raw / "subjects.csv", [good, bad])
    before = tree_digest(raw)
    out, manifest = tmp_path / "out", tmp_path / "m.json"
    with pytest.raises(InputError, match="does not exist"):  # without --keep-going: stops before any work
        run_pipeline(table, out, manifest, FAST)
    assert not out.exists() and not manifest.exists()

    keep = PipelineOptions(transform="rigid", size=32, slices_per_subject=2, split=(0.0, 0.0, 1.0), keep_going=True)
    summary = run_pipeline(table, out, manifest, keep)
    assert summary.processed == ["good01"] and list(summary.failed) == ["bad01"]
    assert "subject bad01" in summary.failed["bad01"] and "does not exist" in summary.failed["bad01"]
    assert [v["subject"] for v in json.loads(manifest.read_text())["volumes"]] == ["good01"]
    assert not (out / "subjects" / "bad01").exists()
    assert tree_digest(raw) == before

    # table-structure errors still stop the run, --keep-going or not
    dup = write_table(raw / "dup.csv", [good, {**good}])
    with pytest.raises(InputError, match="duplicate subject_id"):
        run_pipeline(dup, tmp_path / "out2", tmp_path / "m2.json", keep)
    unsafe = write_table(raw / "unsafe.csv", [good, {**bad, "subject_id": "../bad"}])
    with pytest.raises(InputError, match="may contain only"):
        run_pipeline(unsafe, tmp_path / "out3", tmp_path / "m3.json", keep)
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_ids_that_differ_only_in_case_are_refused(eval_cohort, tmp_path, capsys):
    """``S01`` and ``s01`` are one folder (one prediction file) on a case-insensitive file system."""
    from m2diff_monai.inference.cli import main
    from preprocessing.subjects import read_subjects

    a, b = write_subject(tmp_path, "s01", seed=1), write_subject(tmp_path, "S01", seed=2)
    with pytest.raises(InputError, match="differs from 's01' .* only in case"):
        read_subjects(write_table(tmp_path / "subjects.csv", [a, b]))
    manifest = rewrite_manifest_subject(
        eval_cohort["manifest"], eval_cohort["manifest"].parent / "case.json", "s02", "S01"
    )
    try:
        rc = main(
            [
                "--checkpoint",
                str(tmp_path / "never_loaded.pt"),
                "--manifest",
                str(manifest),
                "--split",
                "all",
                "--out-dir",
                str(tmp_path / "preds"),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        assert rc == 2 and "repeats 's01'" in one_line(capsys.readouterr().err)
        assert not (tmp_path / "preds").exists()
    finally:
        manifest.unlink()


def test_second_cohort_inference_on_one_out_dir_refuses(eval_cohort, tmp_path, capsys):
    from m2diff_monai.inference.cli import main

    out = tmp_path / "preds"
    with safety.output_lock(out, "m2diff-infer", "--out-dir", ".m2diff-infer.lock"):
        rc = main(
            [
                "--checkpoint",
                str(tmp_path / "never_loaded.pt"),
                "--manifest",
                str(eval_cohort["manifest"]),
                "--split",
                "all",
                "--out-dir",
                str(out),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
    assert rc == 2 and "another m2diff-infer run is writing to this --out-dir folder" in one_line(
        capsys.readouterr().err
    )
    assert [p.name for p in out.iterdir()] == [".m2diff-infer.lock"]


def test_table_reader_collects_row_problems_and_still_raises_structure_errors(tmp_path):
    from preprocessing.subjects import read_subjects

    good = write_subject(tmp_path, "good01", seed=1, with_mri=False)
    rows = [
        good,
        {**good, "subject_id": "missing01", "ld_pet": "nowhere/ld.nii.gz"},
        {**good, "subject_id": "split01", "split": "holdout"},
        {**good, "subject_id": "drf01", "drf": "-4"},
        {**good, "subject_id": "folder01", "sd_pet": "good01"},
    ]
    table = write_table(tmp_path / "subjects.csv", rows)
    with pytest.raises(InputError, match="does not exist"):
        read_subjects(table)
    problems: dict[str, InputError] = {}
    parsed = read_subjects(table, problems=problems)
    assert [r.subject_id for r in parsed] == ["good01", "missing01", "split01", "drf01", "folder01"]
    assert sorted(problems) == ["drf01", "folder01", "missing01", "split01"]
    assert "does not exist" in problems["missing01"].line() and "is not a file" in problems["folder01"].line()
    assert parsed[1].sd_pet is not None  # the split of the others does not move: it still counts as having a target
    for bad in ({**good, "subject_id": "good01"}, {**good, "subject_id": "a/../b"}, {**good, "subject_id": "GOOD01"}):
        with pytest.raises(InputError):
            read_subjects(write_table(tmp_path / "structure.csv", [good, bad]), problems={})


def test_region_name_with_dotdot_in_a_manifest_is_refused(eval_cohort, tmp_path):
    from m2diff_monai.evaluation.run import evaluate_cohort

    content = json.loads(eval_cohort["manifest"].read_text())
    regions = content["volumes"][0]["regions"]
    name = next(iter(regions))
    regions["../" + name] = regions.pop(name)
    manifest = eval_cohort["manifest"].parent / "region.json"
    manifest.write_text(json.dumps(content))
    try:
        with pytest.raises(InputError, match="region name '../"):
            evaluate_cohort(
                manifest,
                {"Good": eval_cohort["preds"] / "Good"},
                tmp_path / "report",
                lpips=False,
                figures=False,
                progress=False,
                workers=1,
            )
        assert not (tmp_path / "report").exists()
    finally:
        manifest.unlink()
