r"""Runs a benchmark selection several times and records the medians over the runs.

Usage::

    python -m benchmarks.runs --runs 5 --name NAME [--out benchmarks/results] -- PYTEST_ARGS...

runs ``pytest --benchmark-only PYTEST_ARGS`` ``--runs`` times, one process each, and writes
``<out>/<name>.json`` (every run's pytest-benchmark JSON, without the per-round samples) and
``<out>/<name>.md``: for each group, each contender's median over the runs of its per-run
median, and its ratios to zuko (zuko's time over the contender's) and to ``leaves`` (the
contender's over the floor's), taken within each run and then their median, with their range.
Single runs on a shared machine swing by tens of percent; ratios within a run swing less.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

from collections import defaultdict
from pathlib import Path

from .report import fmt_time, order


def run_once(pytest_args: list[str], cwd: Path | None = None) -> dict:
    r"""One ``pytest --benchmark-only`` run, in its own process, in the checkout ``cwd`` (by
    default the current one), and its JSON without the per-round samples."""

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.json"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        command += ["--benchmark-only", f"--benchmark-json={path}", *pytest_args]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=cwd)
        data = json.loads(path.read_text())
    for row in data["benchmarks"]:
        row["stats"].pop("data", None)
    return data


def medians(run: dict, field: str | None = None) -> dict[str, dict[str, float]]:
    r"""``{group: {contender: median seconds}}`` of one run, or ``extra_info[field]``."""

    out: dict[str, dict[str, float]] = defaultdict(dict)
    for row in run["benchmarks"]:
        contender = row["extra_info"].get("contender", row["name"])
        value = row["stats"]["median"] if field is None else row["extra_info"].get(field)
        if value is not None:
            out[row["group"]][contender] = value
    return out


def spread(values: list[float]) -> str:
    if not values:
        return ""
    return f"{statistics.median(values):.2f}x ({min(values):.2f}–{max(values):.2f})"


def render(runs: list[dict], title: str, command: str) -> str:
    r"""The markdown record of the runs."""

    per_run = [medians(run) for run in runs]
    compile_s = [medians(run, "compile_s") for run in runs]
    machine = runs[0].get("fastbnf", {}).get("machine", {})
    groups = sorted({g for m in per_run for g in m})
    lines = [
        f"# {title}",
        "",
        f"- Command, {len(runs)} runs: `python -m benchmarks.runs {command}`.",
        f"- Machine: {machine.get('cpu')}, {machine.get('cores')} cores, torch "
        f"{machine.get('torch')}, zuko {machine.get('zuko')}, GPU {machine.get('gpu')}.",
        "- Time: the median over the runs of each run's median. Ratios: within each run, then "
        "their median (range in brackets); vs zuko is zuko's time over the contender's, over "
        "leaves the contender's over the floor's. Compile: the first step of a compiled "
        "contender (tracing, compiling, running once), median over the runs.",
        "",
    ]
    for group in groups:
        contenders = order({c for m in per_run for c in m.get(group, {})})
        lines += [
            f"## {group}",
            "",
            "| contender | time | vs zuko | over leaves | compile |",
            "| --- | --- | --- | --- | --- |",
        ]
        for c in contenders:
            times = [m[group][c] for m in per_run if c in m.get(group, {})]
            vs_zuko = [
                m[group]["zuko"] / m[group][c]
                for m in per_run
                if c in m[group] and "zuko" in m[group]
            ]
            over = [
                m[group][c] / m[group]["leaves"]
                for m in per_run
                if c in m[group] and "leaves" in m[group]
            ]
            compiles = [m[group][c] for m in compile_s if c in m.get(group, {})]
            compile_time = f"{statistics.median(compiles):.1f} s" if compiles else ""
            lines.append(
                f"| {c} | {fmt_time(statistics.median(times))} | {spread(vs_zuko)} "
                f"| {spread(over)} | {compile_time} |"
            )
        lines.append("")
    return "\n".join(lines)


def record_arguments(description: str, runs: int) -> argparse.ArgumentParser:
    r"""The command line of a record: ``--runs``, ``--name``, ``--out``, ``--title``, then the
    pytest arguments after ``--`` (``pytest_args``)."""

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--name", required=True, help="file stem of the record")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--title", default=None)
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER)
    return parser


def main(argv=None) -> None:
    args = record_arguments(__doc__.splitlines()[0], runs=5).parse_args(argv)
    pytest_args = [a for a in args.pytest_args if a != "--"]

    runs = [run_once(pytest_args) for _ in range(args.runs)]
    command = f"--runs {args.runs} --name {args.name} -- " + " ".join(pytest_args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"command": command, "runs": runs}))
    text = render(runs, args.title or args.name, command)
    (args.out / f"{args.name}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
