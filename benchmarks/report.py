r"""Turns a pytest-benchmark JSON into a markdown record and PNG plots.

Usage::

    python -m benchmarks.report BENCH_JSON [--out benchmarks/results] [--name NAME]

writes ``<out>/<name>.md`` and ``<out>/<name>-*.png``, where ``name`` defaults to
``cpu-<cores>core-<date>`` (or ``<gpu>-<date>`` when the run had CUDA cases). Ratios are
``zuko median / contender median``: above 1.0x the contender is faster than zuko.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

#: Bytes moved per fp32 parameter per step by the fused path (docs/design.md, the byte budget).
BYTES_PER_PARAM = 32

#: Targets of the issue "CPU kernels": fastbnf (compiled kernel) over zuko, medians.
TARGETS = {"tutorial-mlp": 3.0, "tensors-500x1000": 20.0, "stack-25M": 6.0}

CONTENDER_ORDER = [
    "zuko",
    "zuko-compile",
    "fastbnf-compile",
    "torch",
    "torch-fused",
    "cpp",
    "cpp-fused",
    "cuda",
    "cuda-fused",
    "plain",
    "leaves",
    "randn",
]
# Timed beside the contenders, without a ratio to zuko.
UNRATED = ("zuko", "plain", "leaves", "randn")
STYLE = {
    "zuko": {"color": "tab:red", "marker": "o"},
    "zuko-compile": {"color": "tab:pink", "marker": "o", "linestyle": "--"},
    "fastbnf-compile": {"color": "tab:olive", "marker": "^", "linestyle": "--"},
    "torch": {"color": "tab:blue", "marker": "s"},
    "torch-fused": {"color": "tab:blue", "marker": "s", "linestyle": "--"},
    "cpp": {"color": "tab:green", "marker": "^"},
    "cpp-fused": {"color": "tab:green", "marker": "^", "linestyle": "--"},
    "cuda": {"color": "tab:purple", "marker": "^"},
    "cuda-fused": {"color": "tab:purple", "marker": "^", "linestyle": "--"},
    "plain": {"color": "tab:gray", "marker": ".", "linestyle": ":"},
    "leaves": {"color": "black", "marker": ".", "linestyle": ":"},
    "randn": {"color": "tab:orange", "marker": "x", "linestyle": ":"},
}


def fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.1f}x"


def fmt_count(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.3g}M"
    if n >= 1e3:
        return f"{n / 1e3:.3g}k"
    return f"{n:.0f}"


def order(contenders) -> list[str]:
    known = [c for c in CONTENDER_ORDER if c in contenders]
    return known + sorted(c for c in contenders if c not in CONTENDER_ORDER)


def case_key(case: str):
    r"""Named cases first, then sizes and tensor counts in increasing order."""

    m = re.fullmatch(r"(size|tensors)-([0-9.e+]+)", case)
    if m:
        return (1 if m.group(1) == "size" else 2, float(m.group(2)), case)
    named = list(TARGETS)
    return (0, float(named.index(case)) if case in named else len(named), case)


class Results:
    def __init__(self, data: dict) -> None:
        self.data = data
        self.meta = data.get("fastbnf", {})
        self.machine = self.meta.get("machine", {})
        # rows[kind][device][case][contender] = benchmark entry
        self.rows = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
        for b in data["benchmarks"]:
            x = b.get("extra_info", {})
            if "contender" not in x:
                continue
            entry = dict(x, median=b["stats"]["median"], stats=b["stats"], name=b["name"])
            self.rows[x["kind"]][x.get("device", "cpu")][x.get("case", "")][x["contender"]] = entry

    def devices(self, kind: str) -> list[str]:
        return sorted(self.rows[kind], key=lambda d: d != "cpu")

    def bandwidth(self, device: str) -> float | None:
        r"""Copy bandwidth in bytes/s (read + write)."""

        for entry in self.rows["copy"][device].get("", {}).values():
            return entry["bytes_moved"] / entry["median"]
        return None

    def floor(self, device: str, n: int) -> float | None:
        bw = self.bandwidth(device)
        return None if bw is None else BYTES_PER_PARAM * n / bw

    def best_fastbnf(self, device: str, row: dict, fused: bool) -> str | None:
        r"""The compiled backend when it ran, else the torch backend."""

        suffix = "-fused" if fused else ""
        for backend in (["cpp"] if device == "cpu" else ["cuda"]) + ["torch"]:
            if backend + suffix in row:
                return backend + suffix
        return None


def ratio(row: dict, contender: str) -> float | None:
    if "zuko" not in row or contender not in row:
        return None
    return row["zuko"]["median"] / row[contender]["median"]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def machine_title(r: Results) -> str:
    m = r.machine
    if "cuda" in r.rows["step"] and m.get("gpu"):
        return f"{m['gpu']} (host: {m.get('cpu')}, {m.get('cores')} cores)"
    threads = m.get("torch_threads")
    return f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores (torch threads: {threads})"


def default_name(r: Results) -> str:
    date = r.data.get("datetime", "")[:10] or "undated"
    m = r.machine
    if "cuda" in r.rows["step"] and m.get("gpu"):
        gpu = re.sub(r"[^a-z0-9]+", "-", m["gpu"].lower()).strip("-")
        return f"{gpu}-{date}"
    return f"cpu-{m.get('cores', 0)}core-{date}"


# Sections -------------------------------------------------------------------------------------


def headline(r: Results) -> list[str]:
    rows = []
    for device in r.devices("step"):
        cases = r.rows["step"][device]
        for case, target in TARGETS.items():
            row = cases.get(case)
            if not row or "zuko" not in row:
                continue
            z = row["zuko"]
            seed = r.best_fastbnf(device, row, False)
            fused = r.best_fastbnf(device, row, True)
            rs, rf = ratio(row, seed) if seed else None, ratio(row, fused) if fused else None
            plain = row.get("plain", {}).get("median")
            leaves = row.get("leaves", {}).get("median")
            above = None
            if seed and plain is not None and row[seed]["median"] > plain:
                above = (z["median"] - plain) / (row[seed]["median"] - plain)
            ok = "–" if rs is None else ("yes" if rs >= target else "no")
            rows.append(
                [
                    f"{case} ({device})",
                    fmt_count(z["size"]),
                    str(z["tensors"]),
                    fmt_time(z["median"]),
                    fmt_time(plain),
                    fmt_time(leaves),
                    f"{fmt_time(row[seed]['median'])} ({seed})" if seed else "–",
                    fmt_ratio(rs),
                    fmt_ratio(above),
                    f"{fmt_time(row[fused]['median'])} ({fused})" if fused else "–",
                    fmt_ratio(rf),
                    f"{target:.0f}x",
                    ok,
                ]
            )
    if not rows:
        return []
    return [
        "## Headline: Bayesian overhead of one step",
        "",
        (
            "Medians of one step (KL + sample + a loss linear in the samples + backward). "
            "Ratio = zuko median / fastbnf median. `plain` is the same loss and backward on the "
            "plain parameters, a cost both sides pay; the ratio above plain compares what each "
            "adds to it, (zuko − plain) / (fastbnf − plain). `leaves` is the same loss with "
            "zuko's parameters (a mean and a log-variance per tensor) and sampling and KL that "
            "cost nothing: autograd's own work per tensor, below which no drop-in design goes. "
            'The targets (issue "CPU kernels") are for the seed-style step of the compiled '
            "kernel, whole step."
        ),
        "",
        *table(
            [
                "case",
                "params",
                "tensors",
                "zuko",
                "plain",
                "leaves",
                "fastbnf seed-style",
                "ratio",
                "ratio above plain",
                "fastbnf fused",
                "ratio",
                "target",
                "met",
            ],
            rows,
        ),
        "",
    ]


def step_section(r: Results) -> list[str]:
    out = []
    for device in r.devices("step"):
        cases = r.rows["step"][device]
        contenders = order({c for row in cases.values() for c in row})
        header = ["case", "params", "tensors"]
        for c in contenders:
            header += [c] if c in UNRATED else [c, "vs zuko"]
        header += ["32 B/param floor"]
        rows = []
        for case in sorted(cases, key=case_key):
            row = cases[case]
            any_entry = next(iter(row.values()))
            cells = [case, fmt_count(any_entry["size"]), str(any_entry["tensors"])]
            for c in contenders:
                cells.append(fmt_time(row[c]["median"]) if c in row else "–")
                if c not in UNRATED:
                    cells.append(fmt_ratio(ratio(row, c)))
            cells.append(fmt_time(r.floor(device, any_entry["size"])))
            rows.append(cells)
        out += [
            f"## Step overhead, all cases ({device})",
            "",
            (
                "Medians. `-fused` = `reparameterize(return_kl=True)`, otherwise seed-style "
                "(`kl_divergence()` + `reparameterize()`). `plain`: the same loss and backward "
                "on the plain parameters; `leaves`: the same with zuko's parameters and free "
                "sampling and KL; `randn`: `torch.randn` of as many numbers; floor: 32 bytes per "
                "parameter at the measured copy bandwidth (the fused path's memory traffic)."
            ),
            "",
            *table(header, rows),
            "",
        ]
        for compiled_name, title in (
            ("zuko-compile", "torch.compile of zuko"),
            ("fastbnf-compile", "torch.compile of fastbnf"),
        ):
            compiled = {c: row[compiled_name] for c, row in cases.items() if compiled_name in row}
            if compiled:
                rows = []
                for case, e in sorted(compiled.items(), key=lambda kv: case_key(kv[0])):
                    row = cases[case]
                    z = row["zuko"]["median"] if "zuko" in row else None
                    best = r.best_fastbnf(device, row, True)
                    fb = row[best]["median"] if best else None
                    gain = (z - e["median"]) if z else None
                    rows.append(
                        [
                            case,
                            fmt_time(e["compile_s"]),
                            fmt_time(e["median"]),
                            fmt_time(z),
                            fmt_time(fb),
                            (f"{e['compile_s'] / gain:.0f}" if gain and gain > 0 else "never"),
                            fmt_time(1000 * e["median"] + e["compile_s"]),
                            fmt_time(1000 * fb) if fb else "–",
                        ]
                    )
                out += [
                    f"### {title} ({device}), compile time included",
                    "",
                    *table(
                        [
                            "case",
                            "compile (first step)",
                            "compiled step",
                            "eager zuko",
                            "fastbnf fused",
                            "steps to amortize vs eager",
                            "1000 steps, compiled",
                            "1000 steps, fastbnf",
                        ],
                        rows,
                    ),
                    "",
                ]
    return out


def train_section(r: Results) -> list[str]:
    out = []
    for device in r.devices("train"):
        cases = r.rows["train"][device]
        contenders = [c for c in order({c for row in cases.values() for c in row}) if c != "plain"]
        header = ["case", "params (Bayesian)", "plain"]
        for c in contenders:
            header += [c, "overhead", "share"]
        rows = []
        for case in sorted(cases):
            row = cases[case]
            plain = row.get("plain", {}).get("median")
            some = next(iter(row.values()))
            bayes = next((e["bayesian_size"] for c, e in row.items() if c != "plain"), 0)
            cells = [case, f"{fmt_count(some['size'])} ({fmt_count(bayes)})", fmt_time(plain)]
            for c in contenders:
                if c not in row:
                    cells += ["–", "–", "–"]
                    continue
                t = row[c]["median"]
                vs = f" ({fmt_ratio(ratio(row, c))})" if c != "zuko" else ""
                cells.append(fmt_time(t) + vs)
                if plain is None:
                    cells += ["–", "–"]
                else:
                    cells += [fmt_time(max(t - plain, 0.0)), f"{max(t - plain, 0.0) / t:.0%}"]
            rows.append(cells)
        out += [
            f"## Full training steps ({device})",
            "",
            (
                "forward + loss + backward + Adam. `overhead` = step − the plain model's step "
                "(same model unwrapped, all parameters trained), `share` = overhead / step; the "
                "ratio in "
                "brackets is zuko's step over the contender's."
            ),
            "",
            *table(header, rows),
            "",
        ]
    return out


def memory_section(r: Results) -> list[str]:
    out = []
    for device in r.devices("memory"):
        cases = r.rows["memory"][device]
        contenders = order({c for row in cases.values() for c in row})
        header = ["params"] + [f"{c} B/param" for c in contenders]
        header += [f"{c} fwd" for c in contenders]
        rows = []
        peak = any("peak_bytes" in e for row in cases.values() for e in row.values())
        for case in sorted(cases, key=case_key):
            row = cases[case]
            some = next(iter(row.values()))
            cells = [fmt_count(some["size"])]
            for c in contenders:
                cells.append(f"{row[c]['saved_bytes_per_param']:.3g}" if c in row else "–")
            for c in contenders:
                e = row.get(c)
                if e is None:
                    cells.append("–")
                    continue
                vs = f" ({fmt_ratio(ratio(row, c))})" if c != "zuko" else ""
                cells.append(fmt_time(e["median"]) + vs)
            rows.append(cells)
        out += [
            f"## Bytes kept for backward ({device})",
            "",
            (
                "Unique storages saved by autograd for the sampling and the KL, leaving out the "
                "model's parameters, per selected parameter (fastbnf: the 16-byte `rng_state`). "
                "`fwd`: median of KL + sample + loss without backward."
            ),
            "",
            *table(header, rows),
            "",
        ]
        if peak:
            prow = []
            for case in sorted(cases, key=case_key):
                row = cases[case]
                size = fmt_count(next(iter(row.values()))["size"])
                prow.append(
                    [size]
                    + [
                        f"{row[c]['peak_bytes'] / 2**20:.1f} MiB"
                        if "peak_bytes" in row.get(c, {})
                        else "–"
                        for c in contenders
                    ]
                )
            out += [
                f"Peak CUDA memory of forward + backward above the model ({device}):",
                "",
                *table(["params", *contenders], prow),
                "",
            ]
    return out


def step_memory_section(r: Results) -> list[str]:
    out = []
    for device in r.devices("step-memory"):
        cases = r.rows["step-memory"][device]
        contenders = order({c for row in cases.values() for c in row})
        rows = []
        for case in sorted(cases, key=case_key):
            row = cases[case]
            cells = [fmt_count(next(iter(row.values()))["size"])]
            for c in contenders:
                e = row.get(c)
                cells.append(
                    f"{e['state_bytes_per_param']:.1f} / {e['peak_bytes_per_param']:.1f}"
                    if e
                    else "–"
                )
            rows.append(cells)
        out += [
            f"## Memory of a training step with Adam ({device})",
            "",
            (
                "Bytes per parameter held between steps / at the peak of a step, above the "
                "process before the model (`benchmarks/step_memory.py`: CPU resident set, CUDA "
                "allocator). A loss linear in the parameters: no activations."
            ),
            "",
            *table(["params", *contenders], rows),
            "",
        ]
    return out


def predict_section(r: Results) -> list[str]:
    out = []
    for device in r.devices("predict"):
        cases = r.rows["predict"][device]
        contenders = order({c for row in cases.values() for c in row})
        contenders = ["zuko-loop"] + [c for c in contenders if c != "zuko-loop"]
        rows = []
        for case in sorted(cases):
            row = cases[case]
            some = next(iter(row.values()))
            cells = [case, fmt_count(some["size"])]
            for c in contenders:
                if c not in row:
                    cells.append("–")
                    continue
                z = row.get("zuko-loop", {}).get("median")
                t = row[c]["median"]
                vs = f" ({fmt_ratio(z / t)})" if z and c != "zuko-loop" else ""
                cells.append(fmt_time(t) + vs)
            rows.append(cells)
        out += [
            f"## Predictions under 32 samples ({device})",
            "",
            (
                "`-predict`: `bm.predict(x, samples=32)`; `-loop`: a Python loop over "
                "`sample_model()` (zuko's only way). Ratio vs `zuko-loop`."
            ),
            "",
            *table(["case", "params", *contenders], rows),
            "",
        ]
    return out


# Plots ----------------------------------------------------------------------------------------


def plots(r: Results, out: Path, name: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    for device in r.devices("step"):
        cases = r.rows["step"][device]
        for prefix, xkey, xlabel, fname in (
            ("size-", "size", "selected parameters", "step-vs-params"),
            ("tensors-", "tensors", "parameter tensors (fixed total size)", "step-vs-tensors"),
        ):
            series = defaultdict(list)
            for case, row in cases.items():
                if not re.fullmatch(prefix + r"[0-9.e+]+", case):
                    continue
                for c, e in row.items():
                    series[c].append((e[xkey], e["median"]))
            if not series:
                continue
            fig, ax = plt.subplots(figsize=(7, 5))
            for c in order(series):
                pts = sorted(series[c])
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=c, **STYLE.get(c, {}))
            if prefix == "size-" and r.bandwidth(device):
                xs = sorted(p[0] for p in series[next(iter(series))])
                ax.plot(
                    xs,
                    [r.floor(device, x) for x in xs],
                    color="black",
                    linestyle="--",
                    label=f"floor: 32 B/param at {r.bandwidth(device) / 1e9:.1f} GB/s",
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("median step time (s)")
            ax.set_title(
                f"Bayesian overhead of one step ({device}): {machine_title(r)}", fontsize=8
            )
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
            path = out / f"{name}-{fname}{'' if device == 'cpu' else '-' + device}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=120)
            plt.close(fig)
            made.append(path.name)

    for device in r.devices("memory"):
        cases = r.rows["memory"][device]
        series = defaultdict(list)
        for row in cases.values():
            for c, e in row.items():
                series[c].append((e["size"], max(e["saved_bytes"], 1)))
        fig, ax = plt.subplots(figsize=(7, 5))
        for c in order(series):
            pts = sorted(series[c])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=c, **STYLE.get(c, {}))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("selected parameters")
        ax.set_ylabel("bytes kept for backward (sampling + KL)")
        ax.set_title(f"Memory kept for backward ({device})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        path = out / f"{name}-saved-bytes{'' if device == 'cpu' else '-' + device}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path.name)

    for device in r.devices("train"):
        cases = r.rows["train"][device]
        names = sorted(cases)
        contenders = order({c for row in cases.values() for c in row})
        fig, ax = plt.subplots(figsize=(8, 4.5))
        width = 0.8 / max(len(contenders), 1)
        for i, c in enumerate(contenders):
            ys = [cases[n][c]["median"] * 1e3 if c in cases[n] else 0 for n in names]
            ax.bar(
                [j + i * width for j in range(len(names))],
                ys,
                width,
                label=c,
                color=STYLE.get(c, {}).get("color"),
            )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
        ax.set_yscale("log")
        ax.set_ylabel("median training step (ms)")
        ax.set_title(f"Full training steps ({device})")
        ax.legend(fontsize=7)
        path = out / f"{name}-train{'' if device == 'cpu' else '-' + device}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path.name)

    return made


def render(
    r: Results, name: str, images: list[str], report_cmd: str, note: str | None = None
) -> str:
    m = r.machine
    lines = [
        f"# fastbnf benchmarks: {name}",
        "",
        f"- Machine: {machine_title(r)}",
        f"- Versions: torch {m.get('torch')}, zuko {m.get('zuko')}, fastbnf {m.get('fastbnf')}"
        + (f", CUDA {m.get('cuda')}" if m.get("cuda") else ""),
        (
            f"- Compiled kernels: cpp {'built' if m.get('cpp_kernel') else 'not built'}, "
            f"cuda {'built' if m.get('cuda_kernel') else 'not built'}"
        ),
        f"- Date: {r.data.get('datetime', '?')}",
        "- Command: `"
        + "".join(f"{k}={v} " for k, v in sorted(r.meta.get("env", {}).items()))
        + f"{r.meta.get('command', '?')}`, then `{report_cmd}`",
    ]
    timer = r.meta.get("timer", "")
    if "process_time" in timer:
        lines.append(
            f"- Timer: `{timer}` (CPU time of this process, with {m.get('torch_threads')} torch "
            "thread(s)): robust to other processes on a busy machine; it is not wall time"
        )
    else:
        lines.append(f"- Timer: `{timer or 'time.perf_counter'}` (wall time)")
    others = r.meta.get("other_processes_cores")
    if others is not None:
        busy = others > 0.1 * (m.get("cores") or 1)
        lines.append(
            f"- Other processes kept {others:.2f} of {m.get('cores')} cores busy on average "
            "during the run" + (" — **timings are disturbed**" if busy else " (quiet machine)")
        )
    for device in r.devices("copy"):
        bw = r.bandwidth(device)
        if bw:
            lines.append(
                f"- Copy bandwidth ({device}): {bw / 1e9:.1f} GB/s (`copy_` of 100 MB, "
                "read + write counted)"
            )
    if note:
        lines.append(f"- Note: {note}")
    lines += [
        "",
        "Ratios are zuko's median over the contender's (`N.Nx`: N.N times faster than zuko).",
        "",
    ]
    lines += headline(r) + step_section(r) + train_section(r) + memory_section(r)
    lines += step_memory_section(r)
    lines += predict_section(r)
    if images:
        lines += ["## Plots", ""] + [f"![{i}]({i})" for i in images] + [""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default=None, help="file stem (default: machine and date)")
    parser.add_argument("--note", default=None, help="a line added under the header")
    args = parser.parse_args(argv)

    r = Results(json.loads(args.json.read_text()))
    name = args.name or default_name(r)
    args.out.mkdir(parents=True, exist_ok=True)
    images = plots(r, args.out, name)
    report_cmd = f"python -m benchmarks.report {args.json}" + (
        f" --out {args.out}" if args.out != Path("benchmarks/results") else ""
    )
    (args.out / f"{name}.md").write_text(render(r, name, images, report_cmd, args.note))
    print(args.out / f"{name}.md")
    for i in images:
        print(args.out / i)


if __name__ == "__main__":
    main()
