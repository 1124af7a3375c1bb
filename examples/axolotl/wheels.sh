#!/usr/bin/env bash
# Downloads into $REPO/.whl (ignored by git) exactly the wheels that `axolotl train` (axolotl 0.19.0)
# needs for the example configs on the GPU machine, beyond what that machine has preinstalled (torch
# 2.11 cu130, transformers 5.17.0, accelerate, peft, huggingface-hub, datasets' and wandb's other deps...).
# The list was found by running `axolotl train` (full fine-tuning and LoRA) with PYTHONPROFILEIMPORTTIME=1
# and keeping every distribution that was actually imported (see examples/README.md). All are installed
# with --no-deps, so their declared pins (transformers==5.16.1, ...) are not enforced.
#
# Two are imported unconditionally by axolotl 0.19 although these configs never use them, and no config
# option or environment variable avoids the import:
#   bitsandbytes  axolotl/loaders/adapter.py:9 `import bitsandbytes as bnb` (imported by loaders/model.py)
#   wandb         axolotl/utils/callbacks/__init__.py:18 `import wandb` (imported by core/builders/base.py)
# bitsandbytes' official wheel is 41 MiB, 37 of them native libraries for CUDA/ROCm/XPU versions other
# than the GPU machine's CUDA 13.0. By default this script writes a reduced copy beside it,
# bitsandbytes-0.50.2-1cu130-..., which keeps all Python files, libbitsandbytes_cpu.so and
# libbitsandbytes_cuda130.so (the library bitsandbytes picks under torch cu130) and drops the other
# libraries and their RECORD lines. BNB_FULL=1 keeps the official wheel instead (then the set is about
# 70 MiB, over the 64 MiB limit of what travels to the GPU machine).
#
#   examples/axolotl/wheels.sh            # then, on the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
W=$REPO/.whl
PY=${PYTHON:-python3}

WHEELS=(
  axolotl==0.19.0
  addict==2.4.0 annotated-types==0.7.0 backoff==2.2.1 bitsandbytes==0.50.2 datasets==4.8.4 dill==0.4.1
  distro==1.9.0 evaluate==0.4.1 fastcore==2.2.41 fire==0.7.1 multiprocess==0.70.19
  opentelemetry-api==1.45.2 platformdirs==4.9.6 posthog==6.7.11 pydantic==2.12.5 pydantic-core==2.41.5
  python-dotenv==1.0.1 termcolor==3.3.0 trl==1.9.0 typing-inspection==0.4.2 wandb==0.31.0
)
# published as source only (pure Python): built into wheels here
SDISTS=(axolotl-contribs-lgpl==0.0.7 axolotl-contribs-mit==0.0.6)

mkdir -p "$W"
grep -qxF '/.whl/' "$REPO/.git/info/exclude" 2>/dev/null || echo '/.whl/' >> "$REPO/.git/info/exclude"
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
    -d "$W" "${WHEELS[@]}"
tmp=$(mktemp -d)
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "${SDISTS[@]}"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$W" "$tmp"/*.tar.gz 2>/dev/null \
  || "$PY" -m pip wheel -q --no-deps -w "$W" "$tmp"/*.tar.gz
rm -rf "$tmp"

if [ -z "${BNB_FULL:-}" ]; then
  "$PY" - "$W" <<'EOF'
import glob, os, sys, zipfile
w = sys.argv[1]
src = [p for p in glob.glob(os.path.join(w, "bitsandbytes-0.50.2-py3-*.whl"))]
assert len(src) == 1, src
src = src[0]
keep = {"bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so"}
dst = src.replace("bitsandbytes-0.50.2-py3-", "bitsandbytes-0.50.2-1cu130-py3-")
def dropped(name):
    return name.startswith("bitsandbytes/libbitsandbytes_") and name not in keep
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if dropped(info.filename):
            continue
        data = zin.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(keepends=True) if not dropped(l.split(b",")[0].decode()))
        zout.writestr(info, data)
os.remove(src)
print(f"bitsandbytes: wrote {os.path.basename(dst)} ({os.path.getsize(dst) / 2**20:.1f} MiB; kept cpu + cuda130 libraries)")
EOF
fi

echo "wheels in $W:"
( cd "$W" && ls -l *.whl | awk '{printf "  %8.2f MiB  %s\n", $5 / 1048576, $9; s += $5} END {printf "  %8.2f MiB  total\n", s / 1048576}' )
n=$(ls "$W" | sed 's/-[0-9].*//' | tr 'A-Z_' 'a-z-' | sort | uniq -d | wc -l)
[ "$n" -eq 0 ] || { echo "wheels.sh: several versions of one package in $W: remove the old ones" >&2; exit 1; }
echo "install on the GPU machine (repo root, .whl carried):"
echo "  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site"
