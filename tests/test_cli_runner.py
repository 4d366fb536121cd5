"""The one CLI runner (m2diff_monai.cli_runner): exit codes and the one line every command ends with."""

import argparse
import subprocess
import sys

import pytest

from m2diff_monai import cli_runner
from m2diff_monai.errors import InputError


@pytest.fixture(autouse=True)
def _log_here(tmp_path, monkeypatch):
    monkeypatch.setenv("M2DIFF_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("M2DIFF_DEBUG", raising=False)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2diff-x")
    parser.add_argument("--n", type=int, default=0)
    return parser


def _run(command, *argv: str) -> int:
    return cli_runner.run_cli(_parser(), command, list(argv), interrupted="nothing written")


def test_success_returns_the_commands_status(capsys):
    assert _run(lambda args: args.n, "--n", "3") == 3
    assert _run(lambda args: None) == 0
    assert capsys.readouterr().err == ""


def test_our_warnings_are_one_line_and_library_warnings_keep_their_format(capsys):
    import warnings

    from m2diff_monai.checkpoint import LoadedModel
    from m2diff_monai.inference.api import warn_if_untrained_start
    from m2diff_monai.inference.settings import InferenceSettings

    model = LoadedModel(None, {}, {}, {}, "ema", path="demo.pt", training={"train_max_timestep": 200})

    def command(args):
        warn_if_untrained_start(model, InferenceSettings())  # a UserFacingWarning
        warnings.warn("a library's own warning", UserWarning, stacklevel=1)

    passed_on = []  # what reaches the handler that was installed before the command ran

    def recorder(message, category, *args, **kwargs):
        passed_on.append((category, str(message)))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = recorder
        assert _run(command) == 0
        err = capsys.readouterr().err
        ours = "m2diff-x: warning: demo.pt was trained only on timesteps 0..200 (train_max_timestep)"
        assert ours in err and "UserFacingWarning" not in err and err.count("\n") == 1
        assert passed_on == [(UserWarning, "a library's own warning")]  # other warnings: Python's handling
        assert _run(command, "--debug") == 0  # --debug: every warning goes to Python's handling
        assert capsys.readouterr().err == "" and len(passed_on) == 3
        assert warnings.showwarning is recorder  # restored


def test_input_error_is_its_one_line_and_exit_2(capsys, tmp_path):
    def bad(args):
        raise InputError("not a NIfTI file", subject="s01", path="/d/ld.nii.gz")

    assert _run(bad) == 2
    assert capsys.readouterr().err == "m2diff-x: error: subject s01, file /d/ld.nii.gz: not a NIfTI file\n"
    assert not (tmp_path / "logs").exists()  # bad input is not a bug: no log


def test_input_error_wrapped_by_a_library_is_still_bad_input(capsys):
    def wrapped(args):
        try:
            raise InputError("manifest not found", path="m.json")
        except InputError as err:
            raise RuntimeError("Failed to instantiate component") from err

    assert _run(wrapped) == 2
    assert capsys.readouterr().err == "m2diff-x: error: file m.json: manifest not found\n"


def test_unexpected_error_is_one_line_naming_the_log_that_holds_the_traceback(capsys, tmp_path):
    def bug(args):
        {}["missing"]

    assert _run(bug) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith("m2diff-x: internal error: KeyError: 'missing' (traceback in ")
    assert "--debug" in err and "Traceback" not in err
    (log,) = (tmp_path / "logs").glob("m2diff-x-*.log")
    assert str(log) in err
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and ", in bug" in text and "KeyError: 'missing'" in text


def test_debug_flag_and_variable_print_the_traceback(capsys, tmp_path, monkeypatch):
    def bug(args):
        raise ValueError("multi\nline message")

    assert _run(bug, "--debug") == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and ", in bug" in err
    assert err.splitlines()[-1] == "m2diff-x: internal error: ValueError: multi line message (traceback above)"
    monkeypatch.setenv("M2DIFF_DEBUG", "1")
    assert _run(bug) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_debug_variable_zero_means_off(monkeypatch):
    monkeypatch.setenv("M2DIFF_DEBUG", "0")
    assert not cli_runner.debug_requested()
    monkeypatch.setenv("M2DIFF_DEBUG", "1")
    assert cli_runner.debug_requested()


def test_argument_errors_exit_2_with_the_same_prefix(capsys):
    with pytest.raises(SystemExit) as exited:
        _run(lambda args: 0, "--n", "three")
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("m2diff-x: error: argument --n")

    def refuses(args):
        _parser().error("--n must be >= 1")

    with pytest.raises(SystemExit) as exited:  # parser.error inside a command is an argument error too
        _run(refuses)
    assert exited.value.code == 2


def test_interrupt_is_130_and_one_line(capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    assert _run(interrupted) == 130
    assert capsys.readouterr().err == "m2diff-x: interrupted; nothing written\n"


def test_unwritable_log_folder_still_gives_one_line(capsys, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("M2DIFF_LOG_DIR", str(blocker / "logs"))
    assert _run(lambda args: 1 / 0) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "ZeroDivisionError" in err and "no log could be written" in err


@pytest.mark.parametrize(
    "module",
    ["preprocessing.cli", "m2diff_monai.inference.cli", "m2diff_monai.evaluation.cli", "m2diff_monai.export.cli"],
)
def test_every_command_has_debug_and_the_same_prefix(module, tmp_path):
    """All four console scripts go through the runner: --debug in their help, ``PROG: error:`` on bad options."""
    argv = ["validate", "--help"] if module == "preprocessing.cli" else ["--help"]
    helped = subprocess.run(
        [sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert helped.returncode == 0 and "--debug" in helped.stdout
    bad = ["validate", "--no-such-option"] if module == "preprocessing.cli" else ["--no-such-option"]
    refused = subprocess.run(
        [sys.executable, "-m", module, *bad], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    prog = {
        "preprocessing.cli": "m2diff-preprocess validate",
        "m2diff_monai.inference.cli": "m2diff-infer",
        "m2diff_monai.evaluation.cli": "m2diff-evaluate",
        "m2diff_monai.export.cli": "m2diff-export",
    }[module]
    assert refused.returncode == 2 and f"{prog}: error: " in refused.stderr.splitlines()[-1]
