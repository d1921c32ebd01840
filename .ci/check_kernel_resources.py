r"""Static check of the CUDA kernels' resources, no GPU needed.

Compiles every ``csrc/**/*.cu`` with plain nvcc for sm_80 and sm_90 (``--resource-usage``, the
PTX kept), prints one row per kernel and architecture (registers, stack frame, spill stores and
loads, f64 instructions of the PTX) and fails unless:

- every kernel whose arithmetic is float32 (no ``double`` among its template arguments: the fp32,
  fp16 and bf16 groups) uses at most 64 registers (``REGISTER_BUDGETS`` names the kernels that
  ask for more in their ``__launch_bounds__``, and why), no stack frame and no spills, and its f64
  instructions are only the adds (and conversions, moves, loads and stores) that combine the
  KL's partial sums, at most ``MAX_F64_ADDS`` adds in its PTX;
- the PTX holds no ``.func``: the RNG and the maths are inlined (no call, no local arrays).

fp64 kernels (``double`` among the template arguments) are exempt (their rows are printed).
The compile doubles as the ``-Werror all-warnings`` check of each .cu.

Usage: python .ci/check_kernel_resources.py [--root DIR] [--report-only] [--jobs N]
  --root DIR      the repository whose csrc/ is compiled (default: this one)
  --report-only   print the table, never fail (the "before" table of an older tree)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = ("80", "90")
MAX_REGISTERS = 64
# Kernels with a larger budget: the fused Adam step keeps the gradients, the posterior, its
# moments and two keys live at once and asks for 2 resident blocks of 256 threads (128
# registers), not 4 (64 spill, and 80 do on sm_90).
REGISTER_BUDGETS = {"adam_step_kernel": 128}
MAX_F64_ADDS = 64
# f64 instructions that move or convert values, not arithmetic.
F64_DATA = {"mov", "ld", "st", "cvt", "selp", "shfl", "cvta"}


def toolkit_includes(root: Path) -> list[str]:
    """The include flags of the build (fastbnf/_build_cuda.py, loaded by path: no torch
    needed), which finds the toolkit's headers also for a nvcc on the path that is a wrapper."""

    spec = importlib.util.spec_from_file_location(
        "_build_cuda", root / "fastbnf" / "_build_cuda.py"
    )
    build_cuda = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_cuda)
    return [f"-I{d}" for d in build_cuda.cuda_include_dirs()]


def compile_one(nvcc: str, includes: list[str], root: Path, cu: Path, arch: str, work: Path):
    keep = work / f"{cu.stem}-sm{arch}"
    keep.mkdir(parents=True, exist_ok=True)
    cmd = [
        nvcc,
        "-std=c++17",
        "-O3",
        f"-I{root / 'csrc'}",
        *includes,
        "-gencode",
        f"arch=compute_{arch},code=sm_{arch}",
        "-Werror",
        "all-warnings",
        "--resource-usage",
        "--keep",
        "--keep-dir",
        str(keep),
        "-c",
        str(cu),
        "-o",
        str(keep / f"{cu.stem}.o"),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=keep)
    ptx = sorted(keep.glob("*.ptx"))
    ptx_text = ptx[0].read_text() if ptx else ""
    return (
        cu,
        arch,
        proc.returncode,
        proc.stdout + proc.stderr,
        ptx_text,
        time.perf_counter() - start,
    )


def parse_resources(text: str) -> dict[str, dict]:
    """ptxas' --resource-usage lines: registers, stack and spills per function."""

    funcs: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?", line)
        if m:
            current = funcs.setdefault(m.group(1), {})
            if "Compiling entry" in line:
                current["entry"] = True
            continue
        if current is None:
            continue
        m = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        )
        if m:
            current["stack"], current["spill_st"], current["spill_ld"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
    return funcs


HEADER = re.compile(
    r"^\s*(?:\.visible\s+|\.weak\s+|\.extern\s+)*\.(entry|func)\s+(?:\([^)]*\)\s*)?([\w$.]+)"
)
OPCODE = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)[\s;]")


def parse_ptx(text: str) -> tuple[dict[str, dict], list[str]]:
    """f64 instructions of each .entry; the names of the .func bodies (calls)."""

    kernels: dict[str, dict] = {}
    funcs: list[str] = []
    current = None
    for line in text.splitlines():
        m = HEADER.match(line)
        if m:
            kind, name = m.groups()
            if kind == "entry":
                current = kernels.setdefault(name, {"add": 0, "other": 0, "data": 0, "ops": set()})
            else:
                if not line.rstrip().endswith(";"):  # a declaration ends with ';'
                    funcs.append(name)
                current = None
            continue
        if current is None:
            continue
        m = OPCODE.match(line)
        if not m or ".f64" not in m.group(1):
            continue
        op = m.group(1)
        base = op.split(".")[0]
        if base == "add":
            current["add"] += 1
        elif base in F64_DATA:
            current["data"] += 1
        else:
            current["other"] += 1
            current["ops"].add(op)
    return kernels, funcs


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    lines = out.splitlines()
    return dict(zip(names, lines)) if len(lines) == len(names) else {n: n for n in names}


def short_name(demangled: str) -> str:
    """fastbnf::cuda::(anonymous namespace)::sample_forward_kernel<float, __half>(...) ->
    sample_forward_kernel<float, __half>."""

    head = demangled.replace("(anonymous namespace)::", "")
    head = head.split("(", 1)[0] if "(" in head else head
    if head.startswith("void "):
        head = head[len("void ") :]
    # Drop the namespaces outside the template arguments.
    depth, cut = 0, 0
    for i, ch in enumerate(head):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == ":" and depth == 0:
            cut = i + 1
    return head[cut:]


def template_args(name: str) -> str:
    return name[name.index("<") :] if "<" in name else ""


def is_double(name: str, mangled: str) -> bool:
    args = template_args(name)
    if args:
        return re.search(r"\bdouble\b", args) is not None
    # Not demangled: 'd' as a template argument of the Itanium mangling (I...d...E).
    m = re.search(r"I(.*)E", mangled)
    return bool(m and re.search(r"(?<![A-Za-z0-9_])d", m.group(1)))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    args = parser.parse_args()
    root = Path(args.root).resolve()
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("check_kernel_resources: nvcc not found", file=sys.stderr)
        return 1
    includes = toolkit_includes(root)
    sources = sorted((root / "csrc").rglob("*.cu"))
    if not sources:
        print("check_kernel_resources: no .cu files", file=sys.stderr)
        return 1

    failures: list[str] = []
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastbnf-resources-") as tmp:
        jobs = [(cu, arch) for cu in sources for arch in ARCHS]
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = list(
                pool.map(
                    lambda job: compile_one(nvcc, includes, root, job[0], job[1], Path(tmp)), jobs
                )
            )
    for cu, arch, rc, log, ptx_text, seconds in results:
        rel = cu.relative_to(root)
        print(f"nvcc {rel} sm_{arch}: rc={rc} in {seconds:.0f} s")
        if rc != 0:
            print(log, file=sys.stderr)
            failures.append(f"{rel} sm_{arch}: nvcc failed")
            continue
        resources = parse_resources(log)
        ptx, funcs = parse_ptx(ptx_text)
        for f in sorted(set(funcs)):
            failures.append(f"{rel} sm_{arch}: the PTX holds a call target .func {f}")
        names = sorted(n for n, r in resources.items() if r.get("entry"))
        pretty = demangle(names)
        for mangled in names:
            r = resources[mangled]
            name = short_name(pretty[mangled])
            f64 = ptx.get(mangled, {"add": 0, "other": 0, "data": 0, "ops": set()})
            fp64 = is_double(name, mangled)
            rows.append(
                (
                    name,
                    arch,
                    r.get("registers", -1),
                    r.get("stack", -1),
                    r.get("spill_st", -1),
                    r.get("spill_ld", -1),
                    f64,
                    fp64,
                )
            )
            where = f"{name} sm_{arch}"
            if not fp64:
                if r.get("stack", 0) or r.get("spill_st", 0) or r.get("spill_ld", 0):
                    failures.append(
                        f"{where}: stack frame {r.get('stack')} B, spills "
                        f"{r.get('spill_st')}/{r.get('spill_ld')} B"
                    )
                budget = REGISTER_BUDGETS.get(name.split("<")[0], MAX_REGISTERS)
                if r.get("registers", 0) > budget:
                    failures.append(f"{where}: {r['registers']} registers > {budget}")
                if f64["other"]:
                    failures.append(
                        f"{where}: f64 arithmetic besides adds: {', '.join(sorted(f64['ops']))}"
                    )
                if f64["add"] > MAX_F64_ADDS:
                    failures.append(f"{where}: {f64['add']} f64 adds > {MAX_F64_ADDS}")

    rows.sort(key=lambda r: (r[0], r[1]))
    width = max([len(r[0]) for r in rows] + [6])
    print()
    print(
        f"{'kernel':{width}}  arch   regs  stack  spill st/ld  f64 add  f64 other  f64 data  fp64"
    )
    for name, arch, regs, stack, st, ld, f64, fp64 in rows:
        print(
            f"{name:{width}}  sm_{arch}  {regs:4d}  {stack:5d}  {st:5d}/{ld:<5d}  "
            f"{f64['add']:7d}  {f64['other']:9d}  {f64['data']:8d}  {'yes' if fp64 else 'no'}"
        )
    print(
        f"\n{len(rows)} kernel x arch rows from {len(sources)} file(s) in "
        f"{time.perf_counter() - start:.0f} s"
    )
    if failures:
        print(("report only, would fail:" if args.report_only else "FAILED:"), file=sys.stderr)
        for f in failures:
            print("  " + f, file=sys.stderr)
        return 0 if args.report_only else 1
    print("check_kernel_resources: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
