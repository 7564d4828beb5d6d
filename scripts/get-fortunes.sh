#!/usr/bin/env bash
# Installs a real English corpus for the README's real-data example: the
# text of Debian's `fortunes-min` and `fortunes` packages (the BSD fortune
# cookie files, about 2.6 MB of quotations, jokes and poems), into
# data/fortunes/ (git-ignored), with the packages' licence as
# data/fortunes/.COPYRIGHT.
#
#   scripts/get-fortunes.sh [DEST]      # DEST defaults to data/fortunes
#   mhc-train --data data/fortunes ...
#
# Needs apt-get and dpkg-deb (Debian, Ubuntu); no root: the packages are
# downloaded and unpacked into a temporary folder, never installed. Only
# the plain-text cookie files are kept: not the `.dat` indexes, not the
# `.u8` symlinks, and not the offensive set (a separate package). Running it
# again does nothing once DEST is complete.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/data/fortunes}"
packages=(fortunes-min fortunes)

report() {
    local bytes files
    bytes=$(find "$dest" -maxdepth 1 -type f ! -name .COPYRIGHT -printf '%s\n' | awk '{s += $1} END {print s + 0}')
    files=$(find "$dest" -maxdepth 1 -type f ! -name .COPYRIGHT | wc -l)
    echo "fortunes: $files text files, $bytes bytes in $dest"
    echo "licence: BSD (University of California; see $dest/.COPYRIGHT, from Debian's ${packages[*]})"
}

if [[ -f "$dest/.COPYRIGHT" ]] && [[ -n "$(find "$dest" -maxdepth 1 -type f ! -name .COPYRIGHT -print -quit)" ]]; then
    echo "already installed; remove $dest to fetch again"
    report
    exit 0
fi

for tool in apt-get dpkg-deb; do
    if ! command -v "$tool" >/dev/null; then
        echo "error: $tool not found; this script needs a Debian or Ubuntu system" >&2
        exit 1
    fi
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# apt drops privileges to the `_apt` user when run as root; let it write here.
chmod a+rwx "$work"

download() {
    (cd "$work" && apt-get download -q "${packages[@]}")
}
if ! download; then
    echo "apt-get download failed; refreshing the package lists (apt-get update) and retrying" >&2
    if [[ $(id -u) -eq 0 ]]; then apt-get update -q; else sudo apt-get update -q; fi
    download
fi

for deb in "$work"/*.deb; do
    dpkg-deb -x "$deb" "$work/root"
done

source_dir="$work/root/usr/share/games/fortunes"
licence="$work/root/usr/share/doc/fortunes/copyright"
if [[ ! -d "$source_dir" || ! -f "$licence" ]]; then
    echo "error: the packages did not hold usr/share/games/fortunes and its copyright file" >&2
    exit 1
fi

# Fill a sibling folder and move it into place, so an interrupted run never
# leaves a half-filled DEST that would count as installed.
staging="$dest.partial.$$"
rm -rf "$staging"
mkdir -p "$staging"
find "$source_dir" -maxdepth 1 -type f ! -name '*.dat' -exec cp {} "$staging/" \;
cp "$licence" "$staging/.COPYRIGHT"
rm -rf "$dest"
mv "$staging" "$dest"

report
