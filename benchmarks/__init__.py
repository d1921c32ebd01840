r"""pytest-benchmark suites comparing fastbnf with zuko.bayesian, and their report."""
