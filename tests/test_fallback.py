r"""Without the compiled extension, fastbnf warns once and runs on pure PyTorch."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    sys.modules["fastbnf._C"] = {module}  # None: missing; a broken module raises on import

    import torch, fastbnf
    from zuko.nn import MLP

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fastbnf.BayesianModel(MLP(3, 5))
        for _ in range(3):
            kl = model.kl_divergence()
            with model.reparameterize() as net:
                (net(torch.randn(4, 3)).sum() + kl).backward()
        backend = fastbnf.backend("cpu")

    messages = [str(w.message) for w in caught if "compiled kernels" in str(w.message)]
    print(backend, len(messages))
    """
)


def run(module: str) -> str:
    script = SCRIPT.format(module=module)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_missing_extension_warns_once_and_falls_back():
    assert run("None") == ["torch", "1"]


def test_broken_extension_warns_once_and_falls_back():
    broken = "type('Broken', (), {'__getattr__': lambda self, name: 1 / 0})()"
    backend, warnings = run(broken)
    assert backend == "torch" and warnings == "1"


def test_forcing_the_missing_kernel_is_an_error():
    script = SCRIPT.format(module="None").replace(
        "import torch, fastbnf",
        "import os; os.environ['FASTBNF_BACKEND'] = 'cpp'\nimport torch, fastbnf",
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0
    assert "FASTBNF_BACKEND='cpp' is forced but the cpp kernels are not built" in result.stderr
