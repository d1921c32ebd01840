r"""Shared fixtures: the backends to test on, and the kernel requirement of CI."""

import os
import pytest

from fastbnf._backend import has_kernel

# CI sets FASTBNF_REQUIRE_KERNEL=cpu: there a missing CPU kernel is a failure, not a skip.
_REQUIRED = os.environ.get("FASTBNF_REQUIRE_KERNEL", "")


def pytest_configure(config):
    for device_type in filter(None, _REQUIRED.split(",")):
        if not has_kernel(device_type):
            raise pytest.UsageError(
                f"FASTBNF_REQUIRE_KERNEL={_REQUIRED}: the {device_type} kernels are not built."
            )


def cpu_backends() -> list[str]:
    return ["torch", "cpp"] if has_kernel("cpu") else ["torch"]


@pytest.fixture(params=cpu_backends())
def backend(request, monkeypatch) -> str:
    r"""Runs a test once per backend available on the CPU."""

    monkeypatch.setenv("FASTBNF_BACKEND", request.param)
    return request.param
