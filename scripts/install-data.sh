#!/usr/bin/env bash
# Install the Debian packages that carry Imagen's real datasets (see README, "Data"):
#   dataset-fashion-mnist   Fashion-MNIST IDX files under /usr/share/datasets/fashion-mnist/
#   fonts-noto-color-emoji  the Noto Color Emoji font that the emoji dataset is rendered from
# and one that is not data but is only a Debian package too:
#   chromium                the headless browser that tests/test_serve_page.py drives (through Playwright's Python
#                           package and /usr/bin/chromium: Playwright's own browser download is not reachable), so
#                           `make test` in CI (.ci/run) checks the `imagen serve` page in a real browser
set -euo pipefail
packages=(dataset-fashion-mnist fonts-noto-color-emoji chromium)
missing=()
for p in "${packages[@]}"; do
  # "install ok installed" only: a removed package whose config files remain still answers `dpkg -s`
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-data: no apt-get here; install ${missing[*]} (or their files) yourself; tests that need them are skipped" >&2
  exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y --no-install-recommends "${missing[@]}" || { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends "${missing[@]}"; }
