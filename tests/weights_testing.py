"""Helpers of the weight-file tests: torch.save in either of its formats, a payload that
would run a command if unpickled."""

import os
import shlex
from pathlib import Path

import pytest

# Both of torch.save's formats: the zip (torch >= 1.6) and the legacy pickle.
FORMATS = pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])


def save_torch(obj, path: Path, zip_format: bool) -> Path:
    """`torch.save(obj, path)` in the zip or the legacy format; returns `path`."""
    import torch

    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    return path


class Payload:
    """Would run a shell command when unpickled by an unrestricted unpickler."""

    def __init__(self, marker: Path):
        self.command = f"touch {shlex.quote(str(marker))}"

    def __reduce__(self):
        return (os.system, (self.command,))
