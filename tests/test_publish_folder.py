"""Atomic folder publishing (m2diff_monai.io.atomic.staged_folder / publish_folder): the one implementation the
report, the exported bundle and the preprocessed subject folders are written with."""

import os
import stat

import pytest

from m2diff_monai.errors import InputError
from m2diff_monai.io import atomic
from m2diff_monai.io.safety import RunInputs


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_staged_folder_publishes_and_replaces_own_earlier_output(tmp_path):
    dest = tmp_path / "report"
    with atomic.staged_folder(dest) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".tmp.report.") and not dest.exists()
        (staging / "a.txt").write_text("first")
        (staging / "only_first.txt").write_text("x")
    assert (dest / "a.txt").read_text() == "first"
    with atomic.staged_folder(dest) as staging:
        (staging / "a.txt").write_text("second")
        assert (dest / "a.txt").read_text() == "first"  # the old version stays readable until the swap
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]  # replaced as a whole, no mix of the two
    assert (dest / "a.txt").read_text() == "second"
    assert _hidden(tmp_path) == []  # no staging, no moved-aside copy, no lock file


def test_published_folder_has_the_usual_mode_not_mkdtemps_private_one(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic.staged_folder(tmp_path / "out") as staging:
            (staging / "f").write_text("")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_failure_leaves_the_earlier_output_and_no_temp(tmp_path):
    dest = tmp_path / "bundle"
    dest.mkdir()
    (dest / "model.pt").write_text("earlier")
    with pytest.raises(RuntimeError, match="trace failed"), atomic.staged_folder(dest) as staging:
        (staging / "model.pt").write_text("half")
        raise RuntimeError("trace failed")
    assert (dest / "model.pt").read_text() == "earlier"
    assert _hidden(tmp_path) == []


def test_failed_swap_restores_the_earlier_output(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("earlier")
    staging = atomic.new_staging_folder(dest)
    real_replace = os.replace

    def replace(src, dst):
        if os.fspath(src) == os.fspath(staging):
            raise OSError("disk went away")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="disk went away"):
        atomic.publish_folder(staging, dest)
    monkeypatch.undo()
    assert (dest / "keep.txt").read_text() == "earlier"
    assert _hidden(tmp_path) == [staging.name]  # the caller's staging only (staged_folder removes it)


def test_refuses_to_replace_an_input_or_a_folder_holding_one(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    ld = data / "ld.nii.gz"
    ld.write_bytes(b"input")
    inputs = RunInputs([("--ld-pet", ld)])
    for dest in (data, ld):
        with pytest.raises(InputError, match="--out would"), atomic.staged_folder(dest, inputs=inputs) as staging:
            (staging / "x").write_text("")
    assert ld.read_bytes() == b"input" and sorted(p.name for p in data.iterdir()) == ["ld.nii.gz"]
    assert _hidden(tmp_path) == []


def test_refuses_a_plain_file_and_replaces_a_symlink_not_its_target(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("a file")
    with pytest.raises(InputError, match="not a folder"), atomic.staged_folder(plain):
        pass
    assert plain.read_text() == "a file"
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious").write_text("keep")
    for name, points_to in (("link", target), ("dangling", tmp_path / "gone")):
        link = tmp_path / name
        link.symlink_to(points_to)
        with atomic.staged_folder(link) as staging:
            (staging / "new").write_text("new")
        assert not link.is_symlink() and (link / "new").read_text() == "new"
    assert sorted(p.name for p in target.iterdir()) == ["precious"] and (target / "precious").read_text() == "keep"
    assert _hidden(tmp_path) == []


def test_abandoned_temps_of_a_dead_owner_are_removed_live_ones_kept(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    host = "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname())
    abandoned = tmp_path / f".tmp.out.{host}-p{dead}.abc"
    live = tmp_path / f".tmp.out.{host}-p{os.getpid()}.abc"
    for folder in (abandoned, live):
        folder.mkdir()
    with atomic.staged_folder(tmp_path / "out") as staging:
        (staging / "f").write_text("")
    assert not abandoned.exists() and live.exists()


def test_folder_names_outside_the_safe_alphabet_get_owner_labelled_temps(tmp_path):
    staging = atomic.new_staging_folder(tmp_path / "report v1.2")
    assert staging.name.startswith(".tmp.report_v1_2.")
    atomic.publish_folder(staging, tmp_path / "report v1.2")
    assert (tmp_path / "report v1.2").is_dir() and _hidden(tmp_path) == []


def test_the_swap_waits_for_another_publisher_of_the_same_folder(tmp_path):
    """The swap takes an exclusive lock on the parent folder: while another run holds it, nothing moves.
    (Without it two runs replacing one folder at once fail now and then: 3 of 400 swaps, measured.)"""
    import fcntl
    import threading

    dest = tmp_path / "report"
    staging = atomic.new_staging_folder(dest)
    (staging / "f").write_text("new")
    held = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    publisher = threading.Thread(target=atomic.publish_folder, args=(staging, dest))
    publisher.start()
    publisher.join(0.5)
    assert publisher.is_alive() and not dest.exists()
    os.close(held)
    publisher.join(10)
    assert not publisher.is_alive() and (dest / "f").read_text() == "new"
    assert _hidden(tmp_path) == []
