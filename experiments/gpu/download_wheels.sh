#!/usr/bin/env bash
# Download the wheels of experiments/gpu/wheels.txt into .whl/ (git-ignored) for the GPU machine:
# Python 3.12, CPython, manylinux x86_64, no dependencies (each needed one is named in wheels.txt).
#
#   bash experiments/gpu/download_wheels.sh        # run in the repository root, where pip reaches PyPI
#
# Prints each wheel's Requires-Dist (to check against the machine's package list) and the total size of
# what a device call carries: the tracked files plus .whl/ (limit 64 MiB).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
mapfile -t WANTED < <(grep -v '^\s*#' experiments/gpu/wheels.txt | grep -v '^\s*$')
mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WANTED[@]}"
# exactly the pinned versions, one wheel per project: two versions of one stop the whole install there
for spec in "${WANTED[@]}"; do
  name=${spec%%==*}; version=${spec##*==}
  file_name=$(echo "$name" | tr '-' '_')
  matches=(.whl/"$file_name"-*.whl)
  if [ "${#matches[@]}" -ne 1 ] || [[ "${matches[0]}" != .whl/"$file_name-$version-"* ]]; then
    echo "download_wheels.sh: .whl/ must hold exactly $file_name-$version-*.whl, found: ${matches[*]}" >&2
    exit 1
  fi
done
extra=$(ls .whl/*.whl | wc -l)
if [ "$extra" -ne "${#WANTED[@]}" ]; then
  echo "download_wheels.sh: .whl/ holds $extra wheels, wheels.txt names ${#WANTED[@]}; remove the others" >&2
  exit 1
fi
for f in .whl/*.whl; do
  echo "$(basename "$f"): $(unzip -p "$f" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
    | sed 's/^Requires-Dist: //' | tr '\n' ';' )"
done
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "wheels: $((wheels / 1024)) KiB; tracked files: $((tree / 1024)) KiB; together $(((wheels + tree) / 1048576)) MiB of 64"
