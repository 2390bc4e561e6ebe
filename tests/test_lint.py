"""The code passes ruff with the settings in pyproject.toml (pyflakes, pycodestyle, bugbear,
pyupgrade): unused imports and names, undefined names and likely bugs fail the suite."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_passes():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "unimm", "tests", "configs"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
