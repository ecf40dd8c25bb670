#!/usr/bin/env bash
# Install the system packages the data tools and the evaluation baseline need
# (Debian / Ubuntu, apt). Idempotent: packages already present are left alone.
#
#   sudo bash launch/install_system_deps.sh          # or run as root (CI does)
#   SKIP_TESSERACT=1 bash launch/install_system_deps.sh   # fonts only
#
# What and why:
#   fonts-noto-core      Noto Sans/Serif (Latin, Cyrillic) and Noto Sans/Naskh Arabic
#                        (Arabic + Persian) for data_tools.synth (font variety beyond the
#                        DejaVu fonts that ship inside matplotlib).
#   fonts-noto-cjk       Noto Sans/Serif CJK: the only Chinese fonts data_tools.synth uses.
#   fonts-hosny-amiri    Amiri (Naskh) for Arabic/Persian variety.
#   fonts-liberation2    Liberation Sans/Serif/Mono (Latin, Cyrillic).
#   fonts-freefont-ttf   FreeMono (a typewriter face), FreeSerif, FreeSans for the synthetic scans.
#   libraqm0 libfribidi0 libharfbuzz0b
#                        Pillow's raqm layout engine (complex-script shaping and bidi for
#                        Arabic/Persian); the Pillow wheel loads these at run time.
#   tesseract-ocr (+ eng, fra, fas, ara, chi-sim)
#                        the classical OCR baseline of the evaluation scripts.
set -euo pipefail

if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo -E bash "$0" "$@"
    fi
    echo "install_system_deps.sh: run as root or install sudo" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_system_deps.sh: apt-get not found; this script supports Debian/Ubuntu only." >&2
    echo "Install the equivalents of: Noto (core + CJK) fonts, Amiri, Liberation, libraqm," >&2
    echo "libfribidi, harfbuzz, FreeFont, tesseract with eng/fra/fas/ara/chi_sim data." >&2
    exit 1
fi

packages=(
    fonts-noto-core
    fonts-noto-cjk
    fonts-hosny-amiri
    fonts-liberation2
    fonts-freefont-ttf
    libraqm0
    libfribidi0
    libharfbuzz0b
    fontconfig
)
if [[ "${SKIP_TESSERACT:-0}" != "1" ]]; then
    packages+=(tesseract-ocr tesseract-ocr-eng tesseract-ocr-fra tesseract-ocr-fas tesseract-ocr-ara tesseract-ocr-chi-sim)
fi

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install_system_deps.sh: all ${#packages[@]} packages already installed"
    exit 0
fi

echo "install_system_deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "install_system_deps.sh: done"
