#!/usr/bin/env bash
# Downloads the wheels the lent GPU machine lacks (Python 3.12, x86-64, no network there) into
# .whl/ (git-ignored locally), at the versions pinned in requirements/constraints.txt, and checks
# that the tree that travels stays under the 64 MiB limit. See docs/gpu.md.
#   bash scripts/gpu-wheels.sh            # pydantic (+ its parts), torchao, megatron-core
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -i "^$1==" requirements/constraints.txt | head -1; }
packages=(pydantic pydantic_core annotated-types typing-inspection typing_extensions torchao megatron-core)
specs=()
for p in "${packages[@]}"; do
  spec=$(pin "$p") || { echo "gpu-wheels: $p is not pinned in requirements/constraints.txt" >&2; exit 1; }
  specs+=("$spec")
done
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${specs[@]}"
ls -l .whl
wheels_kib=$(du -sk .whl | cut -f1)
tree_kib=$(git ls-files -co --exclude-standard -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
echo "gpu-wheels: .whl ${wheels_kib} KiB, tracked+untracked tree ${tree_kib} KiB, limit 65536 KiB"
(( wheels_kib + tree_kib < 65536 )) || { echo "gpu-wheels: over the 64 MiB the device tool carries" >&2; exit 1; }
