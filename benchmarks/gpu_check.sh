#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, a CUDA build of PyTorch, nvcc,
# ninja, pybind11 and pytest, and no network:
#   1. installs zuko from .wheels/ when it is missing;
#   2. builds the extension for the GPU it finds (TORCH_CUDA_ARCH_LIST from the device,
#      MAX_JOBS = all cores);
#   3. runs the CUDA tests (pytest -m cuda) and the GPU benchmarks (pytest benchmarks -k cuda);
#   4. writes a markdown record (device, versions, tests, figures) into the folder $1.
# Usage: bash benchmarks/gpu_check.sh OUT_DIR      (PYTHON=... picks the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
t0=$(date +%s)
log="$out/gpu_check.log"
: >"$log"
say() { echo "$*" | tee -a "$log"; }
elapsed() { echo "$(( $(date +%s) - $1 ))"; }

"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'" || exit 1

# 1. zuko, offline
if ! "$py" -c "import zuko" 2>/dev/null; then
  wheel=$(ls .wheels/zuko-*.whl 2>/dev/null | head -n 1)
  if [[ -n "$wheel" ]]; then
    say "== installing $wheel"
    "$py" -m pip install --no-index --no-deps --quiet "$wheel" >>"$log" 2>&1 || say "zuko install failed"
  else
    say "zuko missing and no wheel in .wheels/: the zuko comparisons will skip"
  fi
fi

# 2. build for this GPU
arch=$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=$arch
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
say "== building the extension for sm_${arch/./} with MAX_JOBS=$MAX_JOBS"
t=$(date +%s)
build_status=ok
if ! "$py" -m pip install --no-build-isolation --no-deps --no-index -e . >>"$log" 2>&1; then
  say "pip install -e . failed, trying setup.py build_ext --inplace"
  "$py" setup.py build_ext --inplace >>"$log" 2>&1 || build_status=FAILED
fi
build_s=$(elapsed "$t")
say "build: $build_status in ${build_s} s"

backend=$("$py" -c "
import fastbnf
from fastbnf._backend import has_kernel
print(fastbnf.backend('cuda') if has_kernel('cuda') else 'missing')" 2>>"$log" | tail -n 1)
say "backend on cuda: $backend"

# 3. tests and benchmarks
export FASTBNF_REQUIRE_KERNEL=cuda
say "== pytest tests -m cuda"
t=$(date +%s)
# With pytest-xdist, a test that crashes the interpreter is reported as failed and the others
# still run (one worker, so the GPU is never shared).
isolate=()
"$py" -c "import xdist" 2>/dev/null && isolate=(-n 1)
timeout -s INT 150 "$py" -m pytest tests -m cuda -q -rfE -p no:cacheprovider "${isolate[@]}" \
  --junitxml="$out/cuda-tests.xml" >"$out/cuda-tests.txt" 2>&1
test_rc=$?
tests_s=$(elapsed "$t")
tail -n 25 "$out/cuda-tests.txt" | tee -a "$log"
unset FASTBNF_REQUIRE_KERNEL

bench_rc=skipped
bench_json="$out/benchmarks-cuda.json"
if [[ -d benchmarks ]] && ls benchmarks/*.py >/dev/null 2>&1 && "$py" -c "import pytest_benchmark" 2>/dev/null; then
  say "== pytest benchmarks -k cuda"
  t=$(date +%s)
  # The cases the GPU record needs (the whole GPU sweep, 1B parameters included, takes far
  # longer); BENCH_K picks others, BENCH_TIMEOUT their limit in seconds. SIGINT at the limit
  # still writes the JSON of what ran.
  # size-1e+08 holds the seed-style step of fastbnf against zuko's at 100M parameters.
  # test_captured: the same steps captured in a CUDA graph (bench_graph.py).
  bench_k=${BENCH_K:-"(cuda and (copy_bandwidth or (step and (tutorial-mlp or tensors-500x1000 or size-1e+08)))) or test_captured"}
  timeout -s INT "${BENCH_TIMEOUT:-100}" "$py" -m pytest benchmarks -k "$bench_k" -q -p no:cacheprovider \
    --benchmark-json="$bench_json" >"$out/benchmarks-cuda.txt" 2>&1
  bench_rc=$?
  [[ $bench_rc == 5 ]] && bench_rc="none collected"
  say "benchmarks: rc=$bench_rc in $(elapsed "$t") s"
fi

# 4. the record
say "== writing the record"
OUT="$out" BUILD_STATUS="$build_status" BUILD_S="$build_s" TESTS_S="$tests_s" TEST_RC="$test_rc" \
  BENCH_RC="$bench_rc" BENCH_JSON="$bench_json" BACKEND="$backend" TOTAL_S="$(elapsed "$t0")" \
  timeout 180 "$py" - <<'EOF' 2>&1 | tee -a "$log"
import datetime
import json
import os
import re
import subprocess
import time
import xml.etree.ElementTree as ET

import torch

env = os.environ
out = env["OUT"]
props = torch.cuda.get_device_properties(0)
name = torch.cuda.get_device_name(0)
try:
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    nvcc = re.findall(r"release [\d.]+", nvcc)[0]
except Exception:  # noqa: BLE001
    nvcc = "?"
try:
    driver = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
        capture_output=True, text=True,
    ).stdout.strip().splitlines()[0]
except Exception:  # noqa: BLE001
    driver = "?"

lines = [
    f"# fastbnf GPU check: {name}, {datetime.date.today().isoformat()}",
    "",
    "| | |",
    "| --- | --- |",
    f"| device | {name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
    f"{props.multi_processor_count} SMs |",
    f"| torch | {torch.__version__} (CUDA {torch.version.cuda}) |",
    f"| nvcc / driver | {nvcc} / {driver} |",
    f"| build | {env['BUILD_STATUS']} in {env['BUILD_S']} s (TORCH_CUDA_ARCH_LIST="
    f"{env.get('TORCH_CUDA_ARCH_LIST', '')}) |",
    f"| backend on cuda | {env['BACKEND']} |",
    f"| whole check | {env['TOTAL_S']} s before this record |",
    "",
    "## CUDA tests (`pytest tests -m cuda`)",
    "",
]
xml = os.path.join(out, "cuda-tests.xml")
failed_names = []
if os.path.exists(xml):
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total = int(suite.get("tests", 0))
    failures = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    passed = total - failures - skipped
    lines.append(
        f"{total} run: **{passed} passed**, {failures} failed, {skipped} skipped "
        f"in {env['TESTS_S']} s (pytest exit code {env['TEST_RC']})."
    )
    for case in suite.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed_names.append(f"{case.get('classname')}::{case.get('name')}")
        skip = case.find("skipped")
        if skip is not None:
            failed_names.append(f"(skipped) {case.get('name')}: {skip.get('message', '')[:100]}")
else:
    lines.append(f"no result (pytest exit code {env['TEST_RC']}).")
lines += [f"- {n}" for n in failed_names]
lines.append("")

# Figures measured here (benchmarks/bench_kernels.py): the fused kernel ops alone (CUDA graph
# replays) on fp32 groups of 1e7, 1e8 and 1e9 parameters, in tensors of 1M elements and of
# 1,000 elements, against a device-to-device copy of as many floats.
lines += ["## Fused kernel ops against the copy bandwidth (fp32)", ""]
try:
    import fastbnf  # noqa: F401
    from fastbnf._backend import has_kernel

    if not has_kernel("cuda"):
        raise RuntimeError("CUDA kernel not built")
    import sys

    sys.path.insert(0, os.getcwd())
    from benchmarks import bench_kernels

    lines += bench_kernels.table(budget_s=float(env.get("KERNEL_TABLE_S", "100")))
    lines.append("")
    K = torch.ops.fastbnf

    def timed(fn, reps):
        fn()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps  # ms

    # Launch-bound regime: 500 small tensors, eager (host work included).
    small = [torch.randn(64, device="cuda") for _ in range(500)]
    small_lv = [torch.full((64,), -9.0, device="cuda") for _ in range(500)]
    small_ms = timed(
        lambda: K.sample_kernel(small, small_lv, None, None, True, 1.0, None, None, 0), reps=200
    )
    lines += [f"500 tensors of 64 elements, forward, eager: {1000 * small_ms:.1f} µs per call.", ""]
except Exception as error:  # noqa: BLE001
    lines += [f"not measured: {error!r}", ""]

lines += ["## GPU benchmarks (`pytest benchmarks -k cuda`)", ""]
bench = env["BENCH_JSON"]
if os.path.exists(bench) and os.path.getsize(bench) > 0:
    data = json.load(open(bench))
    rows = data.get("benchmarks", [])
    if rows:
        lines += [
            "| benchmark | median (ms) | mean (ms) | stddev (ms) | rounds |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in rows:
            s = row["stats"]
            lines.append(
                f"| {row['fullname']} | {1e3 * s['median']:.3f} | {1e3 * s['mean']:.3f} "
                f"| {1e3 * s['stddev']:.3f} | {s['rounds']} |"
            )
    else:
        lines.append("no benchmark collected.")
else:
    lines.append(f"not run ({env['BENCH_RC']}).")
lines.append("")

slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
path = os.path.join(out, f"gpu-check-{slug}-{time.strftime('%Y-%m-%d')}.md")
with open(path, "w") as f:
    f.write("\n".join(lines))
print("\n".join(lines))
print(f"record: {path}")
EOF
say "gpu_check: done in $(elapsed "$t0") s"
[[ "$build_status" == ok && "$test_rc" == 0 ]]
