#!/usr/bin/env bash
# CI, no GPU needed: the CUDA build of the extension compiles, links and imports, and every
# kernel op gets a CUDA kernel; each torch-free .cu compiles with plain nvcc for sm_80 and sm_90,
# within the kernels' register, stack, spill and f64 budget (.ci/check_kernel_resources.py).
#
# Uses (or creates) a venv with the CUDA build of torch, ${FASTBNF_CUDA_VENV:-.venv-cuda}; builds
# in a scratch folder (${FASTBNF_CUDA_BUILD_DIR:-a temporary one}). The package is not installed:
# fastbnf is imported from the tree. Skipped (exit 0) when nvcc is missing, unless
# FASTBNF_REQUIRE_CUDA_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

t0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - $1 )) s"; }

if ! command -v nvcc >/dev/null 2>&1; then
  if [[ "${FASTBNF_REQUIRE_CUDA_BUILD:-0}" == 1 ]]; then
    echo "check_cuda_build: nvcc not found" >&2
    exit 1
  fi
  echo "check_cuda_build: nvcc not found, skipping the CUDA build check"
  exit 0
fi

venv=${FASTBNF_CUDA_VENV:-.venv-cuda}
py="$venv/bin/python"
torch_version=2.14.1
if ! "$py" -c "import torch, ninja, pybind11, numpy; assert torch.__version__.split('+')[0] == '$torch_version' and torch.version.cuda" 2>/dev/null; then
  echo "== creating $venv (torch==$torch_version)"
  t=$(date +%s)
  python3 -m venv "$venv"
  "$py" -m pip install --quiet "torch==$torch_version" ninja pybind11 numpy
  echo "venv: $(elapsed "$t")"
fi
"$py" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

build_dir=${FASTBNF_CUDA_BUILD_DIR:-}
if [[ -z "$build_dir" ]]; then
  build_dir=$(mktemp -d -t fastbnf-cuda-build.XXXXXX)
  trap 'rm -rf "$build_dir"' EXIT
fi

echo "== building the extension with CUDA for sm_90 in $build_dir"
t=$(date +%s)
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" FASTBNF_BUILD_EXT=0 TORCH_CUDA_ARCH_LIST=9.0 \
  MAX_JOBS=${MAX_JOBS:-2} "$py" .ci/check_cuda_ext.py "$build_dir"
echo "extension build + kernel check: $(elapsed "$t")"

echo "== torch-free .cu files with plain nvcc (sm_80, sm_90): warnings, registers, spills, f64"
t=$(date +%s)
# Compiles each .cu with -Werror all-warnings and --resource-usage, prints the table of every
# kernel and fails on a float kernel over 64 registers, with a stack frame or spills, or with
# f64 arithmetic besides the adds of the KL's partial sums.
if ! MAX_JOBS=${MAX_JOBS:-2} python3 .ci/check_kernel_resources.py; then
  echo "check_cuda_build: the kernel resource check failed" >&2
  exit 1
fi
echo "kernel resource check: $(elapsed "$t")"
echo "check_cuda_build: ok in $(elapsed "$t0")"
