r"""Options and hooks of the benchmark suites.

``--run-slow`` opts in the slow cases (``torch.compile`` of zuko, compile time included).
With ``--benchmark-disable`` (``make test``) every case runs once, on smaller sizes.
"""

import math
import os
import sys

import pytest
import torch

_LOAD = {}


def _cpu_seconds() -> tuple[float, float, float]:
    r"""(busy CPU seconds of the whole machine, of this process, wall clock)."""

    import resource
    import time

    busy = float("nan")
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        pass
    own = resource.getrusage(resource.RUSAGE_SELF)
    return busy, own.ru_utime + own.ru_stime, time.monotonic()


def pytest_sessionstart(session):
    threads = session.config.getoption("--threads")
    if threads:
        torch.set_num_threads(threads)
    _LOAD["start"] = os.getloadavg()
    _LOAD["cpu"] = _cpu_seconds()


def _others_cores() -> float | None:
    r"""Mean number of cores other processes kept busy during the run (interference)."""

    if "cpu" not in _LOAD:
        return None
    (b0, o0, w0), (b1, o1, w1) = _LOAD["cpu"], _cpu_seconds()
    if w1 <= w0 or math.isnan(b0):
        return None
    return max(0.0, ((b1 - b0) - (o1 - o0)) / (w1 - w0))


def pytest_addoption(parser):
    parser.addoption(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) for the run (default: PyTorch's choice); with "
        "--benchmark-timer=time.process_time, --threads 1 gives stable figures on a busy machine",
    )
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="run the slow benchmark cases (torch.compile of zuko, compile time included)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow case (torch.compile); opt in with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from ._harness import machine

    output_json["fastbnf"] = {
        "command": " ".join(["python -m pytest", *sys.argv[1:]]),
        "timer": str(config.getoption("benchmark_timer")),
        "env": {
            k: v
            for k, v in os.environ.items()
            if k.startswith(("FASTBNF_", "OMP_", "MKL_", "TORCH_EXTENSIONS", "MALLOC_"))
        },
        "machine": machine(),
        "loadavg_start": _LOAD.get("start"),
        "loadavg_end": os.getloadavg(),
        "other_processes_cores": _others_cores(),
    }


@pytest.fixture
def quick(request) -> bool:
    r"""Whether benchmarks are disabled (every case runs once, as a plain test)."""

    return bool(request.config.getoption("benchmark_disable"))


@pytest.fixture(autouse=True)
def _fresh_state():
    torch.manual_seed(0)
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
