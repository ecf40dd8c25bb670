"""Classical OCR baseline: the tesseract binary run on the same pages, scored by the same code.

Runs `tesseract <image> stdout -l <langs> --psm <n>` through subprocess (no Python wrapper
needed). Languages are tesseract traineddata names (eng, fas, ara, chi_sim, ...; several are
joined with '+'). The binary and its language data come from launch/install_system_deps.sh. A page
tesseract cannot read (bad image, non-zero exit, timeout) becomes a failed SampleRecord with its
reason; a missing binary or language is a setup error raised before any page is processed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pipeline.eval.data import EvalSample
from pipeline.eval.report import SampleRecord

INSTALL_HINT = (
    "install it with `sudo bash launch/install_system_deps.sh` "
    "(Debian/Ubuntu packages tesseract-ocr and tesseract-ocr-<lang>)"
)
_LANG_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class TesseractNotFoundError(RuntimeError):
    """The tesseract binary is not installed or not on PATH."""


@dataclass(frozen=True)
class TesseractConfig:
    """How tesseract is run.

    languages: traineddata names joined with '+'. psm: page segmentation mode 0-13 (3 = fully
    automatic, tesseract's default). oem: engine mode 0-3 or None (tesseract's default).
    threads: OMP_THREAD_LIMIT per process; workers: pages processed in parallel.
    """

    languages: tuple[str, ...] = ("eng",)
    psm: int = 3
    oem: int | None = None
    binary: str = "tesseract"
    timeout_s: float = 300.0
    threads: int = 1
    workers: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.languages, str):
            raise TypeError("TesseractConfig.languages must be a tuple of names, e.g. ('eng', 'fas')")
        if not self.languages or not all(_LANG_NAME.match(lang) for lang in self.languages):
            raise ValueError(
                f"TesseractConfig.languages must be non-empty names like 'eng', got {self.languages!r}"
            )
        if not 0 <= self.psm <= 13:
            raise ValueError(f"TesseractConfig.psm must be in 0..13, got {self.psm}")
        if self.oem is not None and not 0 <= self.oem <= 3:
            raise ValueError(f"TesseractConfig.oem must be in 0..3 or None, got {self.oem}")
        if self.timeout_s <= 0 or self.threads < 1 or self.workers < 1:
            raise ValueError("TesseractConfig.timeout_s must be > 0 and threads, workers >= 1")


def find_tesseract(binary: str = "tesseract") -> str:
    """Full path of the tesseract binary; TesseractNotFoundError naming the install script."""
    path = shutil.which(binary)
    if path is None:
        raise TesseractNotFoundError(f"tesseract binary {binary!r} not found on PATH; {INSTALL_HINT}")
    return path


def installed_languages(binary: str = "tesseract") -> set[str]:
    """Language data tesseract can load (`tesseract --list-langs`)."""
    out = subprocess.run([find_tesseract(binary), "--list-langs"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"`{binary} --list-langs` failed ({out.returncode}): {out.stderr.strip()}")
    lines = (out.stdout + out.stderr).splitlines()
    return {line.strip() for line in lines if _LANG_NAME.match(line.strip())}


def check_setup(config: TesseractConfig) -> str:
    """The binary's path, after checking that every requested language is installed."""
    path = find_tesseract(config.binary)
    missing = sorted(set(config.languages) - installed_languages(config.binary))
    if missing:
        packages = " ".join("tesseract-ocr-" + lang.replace("_", "-").lower() for lang in missing)
        raise ValueError(f"tesseract has no language data for {missing} (apt: {packages}); {INSTALL_HINT}")
    return path


def ocr_bytes(image: bytes, config: TesseractConfig, binary_path: str | None = None) -> str:
    """Text of one encoded image file. RuntimeError with tesseract's message on failure."""
    binary_path = binary_path or find_tesseract(config.binary)
    with tempfile.NamedTemporaryFile(suffix=".img") as tmp:
        tmp.write(image)
        tmp.flush()
        cmd = [binary_path, tmp.name, "stdout", "-l", "+".join(config.languages), "--psm", str(config.psm)]
        if config.oem is not None:
            cmd += ["--oem", str(config.oem)]
        env = {**os.environ, "OMP_THREAD_LIMIT": str(config.threads)}
        out = subprocess.run(cmd, capture_output=True, timeout=config.timeout_s, env=env)
    if out.returncode != 0:
        message = out.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError(f"tesseract exited with {out.returncode}: {' | '.join(message[-3:])}")
    # tesseract ends a page with a form feed
    return out.stdout.decode("utf-8", "replace").replace("\f", "").strip()


def run_tesseract(
    samples: Sequence[EvalSample],
    config: TesseractConfig | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> list[SampleRecord]:
    """OCR every sample with tesseract; failures are recorded per sample, never dropped.

    Records carry tokens=0 (tesseract has no tokens) and hit_eos=True (it cannot loop).
    """
    config = config or TesseractConfig()
    binary_path = check_setup(config)

    def one(sample: EvalSample) -> SampleRecord:
        start = time.perf_counter()
        try:
            text, error = ocr_bytes(sample.image_bytes(), config, binary_path), None
        except (ValueError, OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            text, error = "", f"tesseract failed: {type(exc).__name__}: {exc}"
        return SampleRecord(sample.key, sample.reference, text, True, error, 0, time.perf_counter() - start)

    records: list[SampleRecord] = []
    with ThreadPoolExecutor(max_workers=config.workers) as pool:
        for record in pool.map(one, samples):
            records.append(record)
            if progress is not None:
                progress(len(records), len(samples))
    return records
