"""Atomic writes: a full disk is one clear error with the old file intact, and files get the usual mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from safetensors import SafetensorError

from resfit.errors import StorageError
from resfit.fileio import atomic_write, atomic_write_text


def _fill_a_full_disk(tmp: str) -> None:
    """Write as a writer would, onto /dev/full: the kernel's real ENOSPC, as on a full disk."""
    Path(tmp).write_bytes(b"half")
    with open("/dev/full", "wb") as device:
        device.write(b"x" * 4096)
        device.flush()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_is_a_storage_error_and_the_old_file_is_intact(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"the previous epoch")
    with pytest.raises(StorageError) as caught:
        atomic_write(target, _fill_a_full_disk)
    message = str(caught.value)
    assert str(target) in message and "no space left" in message and "free" in message
    assert caught.value.exit_code == 8
    assert target.read_bytes() == b"the previous epoch"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left behind


def test_a_writer_that_only_keeps_the_text_of_enospc_is_a_storage_error_too(tmp_path):
    """safetensors' Rust writer raises its own exception type with the OS error in its text."""

    def safetensors_on_a_full_disk(tmp: str) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(StorageError):
        atomic_write(tmp_path / "x.safetensors", safetensors_on_a_full_disk)


def test_other_write_errors_are_not_called_a_full_disk(tmp_path):
    def broken(tmp: str) -> None:
        raise ValueError("tensor is not contiguous")

    with pytest.raises(ValueError, match="contiguous"):
        atomic_write(tmp_path / "x.bin", broken)
    assert list(tmp_path.iterdir()) == []


def test_written_files_have_the_mode_the_umask_gives_not_mkstemps_0600(tmp_path):
    """A model trained by one user and served by another must be readable, as any file they write is."""
    atomic_write_text(tmp_path / "model.json", "{}")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "model.json").stat().st_mode) == 0o666 & ~mask
