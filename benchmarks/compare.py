r"""Compares a benchmark selection between two checkouts, in one session.

Usage::

    python -m benchmarks.compare --base DIR --runs 3 --name NAME [--out benchmarks/results] \
        -- PYTEST_ARGS...

runs ``pytest --benchmark-only PYTEST_ARGS`` in the checkout ``DIR`` (the base: a worktree of
the commit before a change, with its extension built) and in this one, ``--runs`` rounds of one
run each, one process per run, the side that goes first alternating from round to round, and
writes ``<out>/<name>.json`` (every run's pytest-benchmark JSON of both sides) and
``<out>/<name>.md``: for each benchmark, its median on each side (the median over the runs of
each run's median) and the ratio this/base, taken between the runs of the same round and then
their median, with their range; and where the group has a ``plain`` contender (the unwrapped
model, which the change does not touch), the same ratio over ``plain``'s in the same run, which
takes out the machine's drift between the two runs of a round.
"""

from __future__ import annotations

import json
import statistics

from pathlib import Path

from .report import fmt_time
from .runs import medians, record_arguments, run_once, spread


def render(base: list[dict], this: list[dict], title: str, command: str) -> str:
    r"""The markdown record of the paired runs."""

    base_medians = [medians(run) for run in base]
    this_medians = [medians(run) for run in this]
    machine = this[0].get("fastbnf", {}).get("machine", {})
    lines = [
        f"# {title}",
        "",
        f"- Command, {len(this)} rounds: `python -m benchmarks.compare {command}`.",
        f"- Machine: {machine.get('cpu')}, {machine.get('cores')} cores, torch "
        f"{machine.get('torch')}, zuko {machine.get('zuko')}, GPU {machine.get('gpu')}.",
        "- Time: the median over the runs of each run's median. This / base: within each "
        "round (one run of each side), then their median (range in brackets); below 1 is "
        "faster than the base.",
        "",
        "| group | contender | base | this | this / base | this / base, over plain |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    groups = sorted({g for m in this_medians for g in m})
    for group in groups:
        contenders = sorted({c for m in this_medians for c in m.get(group, {})})
        for c in contenders:
            pairs = [
                (b[group][c], t[group][c])
                for b, t in zip(base_medians, this_medians)
                if c in b.get(group, {}) and c in t.get(group, {})
            ]
            if not pairs:
                continue
            base_time = statistics.median(b for b, _ in pairs)
            this_time = statistics.median(t for _, t in pairs)
            ratio = spread([t / b for b, t in pairs])
            controlled = spread(
                [
                    (t[group][c] / t[group]["plain"]) / (b[group][c] / b[group]["plain"])
                    for b, t in zip(base_medians, this_medians)
                    if c != "plain"
                    and all(k in m.get(group, {}) for m in (b, t) for k in (c, "plain"))
                ]
            )
            lines.append(
                f"| {group} | {c} | {fmt_time(base_time)} | {fmt_time(this_time)} | {ratio} "
                f"| {controlled} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = record_arguments(__doc__.splitlines()[0], runs=5)
    parser.add_argument("--base", type=Path, required=True, help="the base checkout")
    args = parser.parse_args(argv)
    pytest_args = [a for a in args.pytest_args if a != "--"]

    base, this = [], []
    for round_ in range(args.runs):
        # The first run of a round and the second meet the machine differently (caches, load):
        # each side goes first every other round.
        if round_ % 2 == 0:
            base.append(run_once(pytest_args, cwd=args.base))
            this.append(run_once(pytest_args))
        else:
            this.append(run_once(pytest_args))
            base.append(run_once(pytest_args, cwd=args.base))
    command = f"--base BASE --runs {args.runs} --name {args.name} -- " + " ".join(pytest_args)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "base": base, "this": this}
    (args.out / f"{args.name}.json").write_text(json.dumps(record))
    text = render(base, this, args.title or args.name, command)
    (args.out / f"{args.name}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
