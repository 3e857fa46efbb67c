"""Validating the DICOM objects medclf writes with dciodvfy (Debian package dicom3tools).

dciodvfy checks an object against the IOD it claims (modules, attributes, value multiplicity and
conditions). Its ``Error`` lines fail a test; its ``Warning`` lines are returned for the note but
do not. Missing dciodvfy fails loudly: ``scripts/setup.sh`` installs it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) that dciodvfy reports for one file."""
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy not found: install Debian package dicom3tools (scripts/setup.sh does it when it can)"
    proc = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    return errors, warnings


def assert_valid(path: Path) -> list[str]:
    """Fail on dciodvfy errors; return its warnings."""
    errors, warnings = dciodvfy(path)
    assert not errors, f"dciodvfy errors in {path}:\n" + "\n".join(errors)
    return warnings
