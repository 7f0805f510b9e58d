#!/usr/bin/env bash
# Build detr_fast._C on this (GPU-less) machine for the lent GPU machine, so that gpu_check.sh need not spend a
# minute or two of the lease compiling it there:
#
#   bash benchmarks/prebuild_device_ext.sh          # -> .device_ext/_C.so and .device_ext/stamp.json
#   then: run(command="PROFILE=first bash benchmarks/gpu_check.sh", carry=[".device_ext"])
#
# The extension uses Python's limited API (setup.py), so a build against the machine's torch (DEVICE_TORCH, the
# same release and commit; a different Python) loads there. The build runs in its own venv (.venv-device) with that
# torch; the CUDA libraries torch loads at import are borrowed from the project's .venv when it has them (`make
# venv`), else installed with torch. gpu_check.sh's build stage uses .device_ext only when its stamp
# (benchmarks/ext_stamp.py) matches that machine's torch, the architectures and the sources, and builds otherwise
# (PREBUILT=0 forces a build there).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE_TORCH=${DEVICE_TORCH:-2.11.0}  # what the lent machines had when last seen (../shared/GPU.md)
ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}
VENV=${DEVICE_VENV:-.venv-device}
DEST=.device_ext
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

has_torch() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$DEVICE_TORCH" <<'EOF'
import sys
import torch
sys.exit(torch.__version__.split("+")[0] != sys.argv[1] or torch.version.cuda is None)
EOF
}

if ! has_torch 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  borrow=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" 2>/dev/null || true)
  if [ -n "$borrow" ] && [ -d "$borrow/nvidia" ]; then
    # torch without its CUDA wheels (gigabytes); its libraries find the project venv's through these links
    "$VENV/bin/python" -m pip install -q --no-deps "torch==$DEVICE_TORCH"
    "$VENV/bin/python" -m pip install -q filelock typing-extensions "sympy>=1.13.3" networkx jinja2 fsspec \
      "setuptools<82" numpy
    for pkg in nvidia cuda; do [ -e "$borrow/$pkg" ] && ln -sfn "$borrow/$pkg" "$site/$pkg"; done
  else
    "$VENV/bin/python" -m pip install -q "torch==$DEVICE_TORCH" "setuptools<82" numpy
  fi
  "$VENV/bin/python" -m pip install -q pybind11 ninja
  has_torch || { echo "could not set up torch $DEVICE_TORCH with CUDA in $VENV"; exit 1; }
fi

echo "building detr_fast._C against torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') for" \
  "TORCH_CUDA_ARCH_LIST=$ARCH"
# its own build folders: the project's build/ and detr_fast/_C.so (this machine's torch) stay as they are
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-$(nproc)} PATH="$VENV/bin:$PATH" \
  "$VENV/bin/python" setup.py -q build_ext --build-temp build/device-temp --build-lib build/device-lib
mkdir -p "$DEST"
cp build/device-lib/detr_fast/_C.so "$DEST/_C.so"
# the operators register on load (no GPU needed), with their CUDA kernels
"$VENV/bin/python" - "$DEST/_C.so" <<'EOF'
import sys
import torch
torch.ops.load_library(sys.argv[1])
missing = [op for op in ("matching_cost", "box_loss", "linear_assignment", "attention", "add_dropout_layernorm",
                         "relu_dropout", "bias_act")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"detr_fast::{op}", "CUDA")]
if missing:
    sys.exit(f"the prebuilt extension lacks CUDA kernels for {missing}")
EOF
TORCH_CUDA_ARCH_LIST=$ARCH "$VENV/bin/python" benchmarks/ext_stamp.py write "$DEST" --arch "$ARCH"
ls -l "$DEST"
