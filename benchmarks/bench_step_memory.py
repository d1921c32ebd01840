r"""Peak memory per parameter of one whole training step with Adam, zuko side by side.

Each case runs in a fresh process (:mod:`benchmarks.step_memory`, which says what is counted);
the figures go in ``extra_info`` (``state_bytes_per_param``, ``peak_bytes_per_param``) and the
report's memory-per-parameter table. The time pytest-benchmark records is the subprocess's and
means nothing.
"""

import json
import subprocess
import sys

from ._harness import backends_for, devices, info

SIZES = [10_000_000, 100_000_000]


def pytest_generate_tests(metafunc):
    if "size" not in metafunc.fixturenames:
        return
    quick = bool(metafunc.config.getoption("benchmark_disable"))
    params, ids = [], []
    for device in devices():
        contenders = ["plain", "zuko"]
        for backend in backends_for(device):
            contenders += [backend, f"{backend}-optim"]
        # The memory options, with the compiled kernels.
        contenders += [f"{backends_for(device)[-1]}-{option}" for option in ("nobase", "bf16")]
        for size in [1_000_000] if quick else SIZES:
            for contender in contenders:
                params.append((device, size, contender))
                ids.append(f"{size:.0e}-{device}-{contender}")
    metafunc.parametrize("device,size,contender", params, ids=ids)


def measure(contender: str, size: int, device: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.step_memory", contender, str(size), device]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_step_memory(benchmark, device, size, contender):
    result = benchmark.pedantic(measure, (contender, size, device), rounds=1, iterations=1)
    benchmark.group = f"step-memory/size-{size:.0e}/{device}"
    info(benchmark, kind="step-memory", case=f"size-{size:.0e}", **result)

    # The state holds at least the trained parameters and Adam's two moments (12 bytes per
    # float32 parameter for plain Adam, 24 for a posterior, 12 for a bfloat16 one), the frozen
    # weights but with keep_base_weights=False (4) and the loss's weight vector (4): a smaller
    # figure would mean the measurement missed the model.
    floor = 16 if contender == "plain" else 20 if contender.endswith("-bf16") else 28
    assert result["state_bytes_per_param"] >= 0.9 * floor, result
    assert result["peak_bytes_per_param"] >= result["state_bytes_per_param"] * 0.9, result
