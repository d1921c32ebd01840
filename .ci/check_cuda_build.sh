#!/usr/bin/env bash
# CI, no GPU needed: the CUDA build of the extension compiles, links and imports, and every
# kernel op gets a CUDA kernel; each torch-free .cu compiles with plain nvcc for sm_80 and sm_90.
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

echo "== torch-free .cu files with plain nvcc (sm_80, sm_90)"
t=$(date +%s)
# The toolkit's include folder, for a nvcc on the path that is a wrapper script.
mapfile -t includes < <(PYTHONPATH="$repo" "$py" -c "
from fastbnf import _build_cuda as b
root = b.cuda_toolkit_root()
print(root / 'include' if root else '')" 2>/dev/null | sed '/^$/d')
inc_flags=(-I"$repo/csrc")
for d in "${includes[@]}"; do inc_flags+=(-I"$d"); done
mapfile -t cu_files < <(find csrc -name '*.cu' | sort)
pids=()
for f in "${cu_files[@]}"; do
  for arch in 80 90; do
    obj="$build_dir/nvcc-check-$(basename "$f" .cu)-sm$arch.o"
    nvcc -std=c++17 -O3 "${inc_flags[@]}" -gencode "arch=compute_$arch,code=sm_$arch" \
      -Werror all-warnings -c "$f" -o "$obj" &
    pids+=($!)
  done
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
if [[ $status != 0 ]]; then
  echo "check_cuda_build: nvcc failed" >&2
  exit 1
fi
echo "nvcc ${#cu_files[@]} file(s) x 2 archs: $(elapsed "$t")"
echo "check_cuda_build: ok in $(elapsed "$t0")"
