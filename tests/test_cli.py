"""The CLI turns library errors into one line on stderr and a non-zero exit code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from resfit.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "resfit", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["train", "/no/such/folder", "--weights", "none"], 3, "/no/such/folder"),
        (["train", "{data}", "--model", "resnet9"], 2, "resnet9"),
        (["train", "{data}", "--weights", "/no/such/weights.pth"], 5, "weights.pth"),
        (["evaluate", "/no/such/run", "{data}"], 6, "/no/such/run"),
        (["predict", "/no/such/run", "{data}"], 6, "/no/such/run"),
        (["train", "--resume", "/no/such/run"], 6, "/no/such/run"),
    ],
)
def test_errors_are_one_line_with_exit_code(args, code, fragment, tiny_imagefolder, tmp_path, capsys):
    args = [a.replace("{data}", str(tiny_imagefolder)) for a in args]
    if args[0] == "train" and "--out" not in args and "--resume" not in args:
        args += ["--out", str(tmp_path / "run")]
    assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("resfit: error:") and fragment in err


def test_python_dash_m_is_the_same_cli():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("resfit ")
    result = run_cli("scan", "/no/such/data")
    assert result.returncode == 3 and len(result.stderr.strip().splitlines()) == 1
