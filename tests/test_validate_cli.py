"""``m2diff-preprocess validate`` and the dispatcher, run as users run them (a subprocess)."""

import csv
import subprocess
import sys
import types
from pathlib import Path

import pytest

from badinputs import BAD_CASES, CASE_CLI_ARGS, GOOD_CASES, make_bad_input_corpus, make_good_input_corpus
from m2diff_monai.errors import InputError
from preprocessing import cli


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "preprocessing.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("corpus")
    return root, make_bad_input_corpus(root / "bad"), make_good_input_corpus(root / "good")


@pytest.mark.parametrize("case", BAD_CASES)
def test_each_bad_input_exits_2_with_its_reason_and_writes_nothing(corpus, case):
    root, bad, _ = corpus
    csv_path, fragment = bad[case]
    before = _snapshot(root)
    result = _run("validate", "--subjects", str(csv_path), *CASE_CLI_ARGS.get(case, []), cwd=root)
    assert result.returncode == 2, result.stdout + result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("m2diff-preprocess: error: ")]
    assert len(error_lines) == 1, result.stderr  # one failing subject (or one table problem), one line
    assert fragment in error_lines[0]
    assert "Traceback" not in result.stderr
    if case not in ("duplicate_id", "malformed_id"):
        assert "bad01" in error_lines[0]
    assert _snapshot(root) == before


@pytest.mark.parametrize("case", GOOD_CASES)
def test_good_inputs_exit_0(corpus, case):
    root, _, good = corpus
    result = _run("validate", "--subjects", str(good[case]), cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error" not in result.stderr
    assert "0 with errors" in result.stdout and "ld_pet.nii.gz" in result.stdout


def test_qform_sform_only_warns_under_the_default_policy_and_csv_report(corpus, tmp_path):
    root, bad, _ = corpus
    report = tmp_path / "report" / "findings.csv"
    result = _run("validate", "--subjects", str(bad["qform_sform"][0]), "--csv", str(report), cwd=root)
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stdout and "qform and sform disagree" in result.stdout
    rows = list(csv.DictReader(report.open()))
    assert {r["level"] for r in rows} == {"ok", "warning"}
    assert {r["subject"] for r in rows} == {"good01", "bad01"}
    assert all(Path(r["file"]).is_absolute() for r in rows if r["file"])


def test_csv_report_is_written_for_a_failing_table_too(corpus, tmp_path):
    root, bad, _ = corpus
    report = tmp_path / "nan.csv"
    result = _run("validate", "--subjects", str(bad["nan"][0]), "--csv", str(report), cwd=root)
    assert result.returncode == 2
    rows = list(csv.DictReader(report.open()))
    errors = [r for r in rows if r["level"] == "error"]
    assert len(errors) == 1 and errors[0]["subject"] == "bad01" and "2 NaN" in errors[0]["message"]


def test_frame_options_reach_intake(corpus):
    root, bad, _ = corpus
    csv_path = str(bad["4d_no_frame"][0])
    assert _run("validate", "--subjects", csv_path, "--frame", "2", cwd=root).returncode == 0
    assert _run("validate", "--subjects", csv_path, "--sum-frames", cwd=root).returncode == 0
    out_of_range = _run("validate", "--subjects", csv_path, "--frame", "3", cwd=root)
    assert out_of_range.returncode == 2 and "--frame 3 is out of range" in out_of_range.stderr


def test_argument_errors_exit_2(capsys):
    for argv in (
        ["validate", "--subjects", "s.csv", "--frame", "0", "--sum-frames"],
        ["validate", "--subjects", "s.csv", "--frame", "-1"],
        ["validate", "--subjects", "s.csv", "--min-overlap", "2"],
        ["validate", "--subjects", "s.csv", "--require", "ld_pet,age"],
        ["validate"],
        [],
        ["frobnicate"],
    ):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2, argv
    err = capsys.readouterr().err
    assert "not allowed with argument" in err and "not a frame number" in err and "invalid choice" in err


def test_top_level_help_lists_every_command_and_a_missing_table_exits_2(tmp_path):
    result = _run("--help", cwd=tmp_path)
    assert result.returncode == 0
    for name in cli.COMMANDS:
        assert name in result.stdout
    missing = _run("validate", "--subjects", str(tmp_path / "none.csv"), cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("m2diff-preprocess: error: file ")
    assert "subjects table does not exist" in missing.stderr


def test_only_the_chosen_subcommand_is_imported(corpus):
    root, _, good = corpus
    code = (
        "import sys; from preprocessing import cli; rc = cli.main(['validate', '--subjects', sys.argv[1]]);"
        "heavy = [m for m in ('preprocessing.pipeline', 'preprocessing.simulate', 'preprocessing.demo',"
        " 'preprocessing.merge', 'torch', 'ants', 'SimpleITK') if m in sys.modules];"
        "print('HEAVY', heavy); sys.exit(rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(good["basic"])], capture_output=True, text=True, cwd=root, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def _fake_command(monkeypatch, behaviour):
    module = types.ModuleType("fake_m2diff_command")
    module.configure = lambda parser: parser.add_argument("--x", default="1")
    module.main = behaviour
    monkeypatch.setitem(sys.modules, "fake_m2diff_command", module)
    monkeypatch.setitem(cli.COMMANDS, "validate", ("fake_m2diff_command", "fake"))


def test_dispatcher_maps_input_errors_and_interrupts_to_exit_codes(monkeypatch, capsys, tmp_path):
    def input_error(args):
        raise InputError("broken thing", subject="s1", path="/x/y.nii.gz")

    _fake_command(monkeypatch, input_error)
    assert cli.main(["validate"]) == 2
    assert capsys.readouterr().err == "m2diff-preprocess: error: subject s1, file /x/y.nii.gz: broken thing\n"

    def interrupted(args):
        raise KeyboardInterrupt

    _fake_command(monkeypatch, interrupted)
    assert cli.main(["validate"]) == 130
    assert capsys.readouterr().err == "m2diff-preprocess: interrupted\n"

    def bug(args):
        raise RuntimeError("a bug must leave its traceback")

    _fake_command(monkeypatch, bug)
    monkeypatch.setenv("M2DIFF_LOG_DIR", str(tmp_path))
    monkeypatch.delenv("M2DIFF_DEBUG", raising=False)
    assert cli.main(["validate"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("m2diff-preprocess: internal error: RuntimeError: a bug must leave its traceback (")
    assert len(err.splitlines()) == 1
    (log,) = tmp_path.glob("m2diff-preprocess-*.log")
    assert str(log) in err and "Traceback" in log.read_text() and ", in bug" in log.read_text()
    for argv in (["--debug", "validate"], ["validate", "--debug"]):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and err.splitlines()[-1].endswith("(traceback above)")

    _fake_command(monkeypatch, lambda args: int(args.x) + 2)
    assert cli.main(["validate", "--x", "5"]) == 7


def test_a_missing_subcommand_module_is_reported_not_crashed(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "merge", ("preprocessing.no_such_module_xyz", "missing"))
    assert cli.main(["merge"]) == 1
    assert "not available" in capsys.readouterr().err
