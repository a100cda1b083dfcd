"""The CLI turns library errors into one line on stderr and a non-zero exit code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_export import train_tiny_run

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


@pytest.fixture(scope="module")
def tiny_run(tiny_imagefolder, tmp_path_factory) -> Path:
    return train_tiny_run(tiny_imagefolder, tmp_path_factory.getbasetemp() / "deploy-tiny-run")


def test_user_fixable_evaluate_errors_have_documented_codes(tiny_run, tiny_imagefolder, tmp_path, capsys):
    other = tmp_path / "other-classes"
    shutil.copytree(tiny_imagefolder, other)
    for split in ("train", "val"):
        (other / split / "red").rename(other / split / "green")
    cases = [
        (["evaluate", str(tiny_run), str(other), "--backend", "torch"], 3, "differ from the model's"),
        (
            ["evaluate", str(tiny_run), str(tiny_imagefolder), "--split", "test", "--backend", "torch"],
            3,
            "no test",
        ),
        (["train"], 2, "needs DATA"),
        (["predict", str(tiny_run), str(tmp_path / "empty-folder")], 3, "no files to predict"),
    ]
    (tmp_path / "empty-folder").mkdir()
    for args, code, fragment in cases:
        assert main(args) == code, args
        err = capsys.readouterr().err.strip().splitlines()
        assert fragment in err[-1] and err[-1].startswith("resfit: error:"), err


def test_scan_writes_the_report_it_names(tiny_imagefolder, tmp_path, capsys):
    assert main(["scan", str(tiny_imagefolder)]) == 0
    assert "data_report.json" not in capsys.readouterr().out  # nothing written, so no file named
    report = tmp_path / "reports" / "tiny.json"
    assert main(["scan", str(tiny_imagefolder), "--report", str(report)]) == 0
    assert f"see {report}" in capsys.readouterr().out.splitlines()[0]
    written = json.loads(report.read_text())
    assert written["class_counts"]["train"] == {"blue": 12, "red": 12} and written["skipped"] == []
