"""launch/install_system_deps.sh: valid bash, and it installs every font package data_tools.synth looks for."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from data_tools.synth import fonts

pytestmark = pytest.mark.unit

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "install_system_deps.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_script_installs_every_font_package_and_tesseract_languages():
    text = SCRIPT.read_text()
    wanted = {pkg for cands in fonts._CANDIDATES.values() for *_, pkg in cands if pkg != "matplotlib"}
    wanted |= {"libraqm0", "libfribidi0", "tesseract-ocr"}
    wanted |= {f"tesseract-ocr-{lang}" for lang in ("eng", "fas", "ara", "chi-sim")}
    missing = sorted(p for p in wanted if not re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", text))
    assert not missing, f"install_system_deps.sh does not install {missing}"
