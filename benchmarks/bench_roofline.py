r"""Yardsticks for the roofline: the device's copy bandwidth, and ``torch.randn`` per size.

``copy`` times ``dst.copy_(src)`` on 100 MB; ``extra_info["bytes_moved"]`` is twice that (read
and write), so the bandwidth is ``bytes_moved / median``. The report draws the floor of the
fused path at 32 bytes per parameter per step at this bandwidth.
"""

import torch

from ._harness import devices, info, run, sync

NBYTES = 100 * 2**20


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", devices())


def test_copy_bandwidth(benchmark, quick, device):
    n = (NBYTES if not quick else NBYTES // 100) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    done = sync(device)

    def copy():
        dst.copy_(src)
        done()

    benchmark.group = f"roofline/copy/{device}"
    info(benchmark, kind="copy", contender="copy", device=device, size=n, bytes_moved=2 * n * 4)
    run(benchmark, copy, quick)
    assert torch.equal(dst, src)
