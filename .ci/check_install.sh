#!/usr/bin/env bash
# CI: fastbnf installs as the README says, in a fresh venv, from a clean copy of the tree.
#
# 1. The README's two commands (build requirements, then `pip install --no-build-isolation .`,
#    which builds a wheel and installs it); a smoke test of the installed package from outside
#    the tree: the C++ backend, a step, and the sources installed for FASTBNF_JIT=1.
# 2. The sdist carries the headers and the CUDA sources; installed with a compiler that fails,
#    it falls back to the pure-PyTorch package with one warning, and works.
#
# The venv is a fresh one: its own pip and setuptools, and the torch of the surrounding
# environment's version installed into it (the surrounding site-packages may hold fastbnf itself,
# in editable mode, whose import hook would answer for the installed package).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
t0=$(date +%s)

work=$(mktemp -d -t fastbnf-install.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir "$work/src"
git ls-files -z | xargs -0 tar -cf - | tar -xf - -C "$work/src"

python3 -m venv "$work/venv"
py="$work/venv/bin/python"
torch_version=$(python3 -c "import torch; print(torch.__version__.split('+')[0])")
"$py" -m pip install -q "torch==$torch_version" numpy

echo "== the README's install commands"
cd "$work/src"
"$py" -m pip install -q -U setuptools wheel ninja pybind11
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$py" -m pip install -q --no-build-isolation .

cd "$work"
"$py" - <<'PY'
import pathlib
import torch
import fastbnf
import fastbnf._build as build

import fastbnf._backend as loaded

assert "site-packages" in fastbnf.__file__, fastbnf.__file__
assert fastbnf.backend("cpu") == "cpp", fastbnf.backend("cpu")
assert "site-packages" in loaded.native_module().__file__, loaded.native_module().__file__
bm = fastbnf.BayesianModel(torch.nn.Linear(3, 2))
with bm.reparameterize(return_kl=True) as (model, kl):
    (model(torch.randn(4, 3)).square().mean() + kl).backward()
assert all(p.grad is not None for p in (*bm.means.values(), *bm.logvars.values()))
# FASTBNF_JIT=1 builds from the installed sources.
assert "site-packages" in str(build.CSRC), build.CSRC
for source in build.extension_kwargs(cuda=False)["sources"]:
    assert pathlib.Path(source).is_file(), source
assert (build.CSRC / "cuda" / "adam_step.cu").is_file()
print("installed package: backend", fastbnf.backend("cpu"), "from", fastbnf.__file__)
PY

echo "== the sdist, and a failed compile"
cd "$work/src"
FASTBNF_BUILD_EXT=0 "$py" setup.py -q sdist -d "$work/dist" >/dev/null 2>&1
sdist=$(ls "$work"/dist/fastbnf-*.tar.gz)
listing=$(tar -tzf "$sdist")
for path in csrc/common/philox.h csrc/cuda/adam_step.cu csrc/cuda/tile_walk.cuh \
    csrc/cpu/posterior_kernels.cpp csrc/group.h; do
  grep -q "/$path\$" <<<"$listing" || { echo "the sdist lacks $path" >&2; exit 1; }
done
"$py" -m pip uninstall -q -y fastbnf
cd "$work"
CXX=false CC=false "$py" -m pip install --no-build-isolation --no-deps -v "$sdist" \
  >"$work/fallback.log" 2>&1
grep -q "fastbnf: building the compiled kernels failed" "$work/fallback.log" || {
  tail -30 "$work/fallback.log" >&2
  echo "no fallback warning in the install's output" >&2
  exit 1
}
"$py" - <<'PY'
import warnings
import torch

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastbnf

    backend = fastbnf.backend("cpu")
assert backend == "torch", backend
assert any("compiled kernels are not available" in str(w.message) for w in caught)
bm = fastbnf.BayesianModel(torch.nn.Linear(3, 2))
with bm.reparameterize() as model:
    model(torch.randn(4, 3)).sum().backward()
print("the sdist without a compiler: backend", backend)
PY
echo "check_install: $(( $(date +%s) - t0 )) s"
