r"""Selection of the Bayesian parameters of a base model by glob prefixes."""

__all__ = ["Selected", "compile_prefix", "select_parameters"]

import re
import torch.nn as nn

from collections.abc import Sequence
from dataclasses import dataclass, field

_VALID_PREFIX = re.compile(r"[\w\.\*]*")


def compile_prefix(prefix: str, argument: str = "include_params") -> re.Pattern:
    r"""Compiles a glob prefix into a regular expression matching the names it selects.

    A single star ``*`` matches alphanumeric strings (``[a-zA-Z0-9_]+``) and a double star
    ``**`` matches dot-separated alphanumeric strings (``[a-zA-Z0-9_\.]+``).

    Arguments:
        prefix: The glob prefix.
        argument: The argument it came from, for error messages.
    """

    if not isinstance(prefix, str) or _VALID_PREFIX.fullmatch(prefix) is None:
        raise ValueError(
            f"{argument}: invalid prefix {prefix!r}; a prefix holds letters, digits, '_', '.' "
            "and the wildcards '*' and '**'."
        )

    # fmt: off
    pattern = (
        prefix
        .replace(".", r"\.")
        .replace("**", r"[\w\.]+")
        .replace("*", r"\w+")
        + r".*"
    )
    # fmt: on

    return re.compile(pattern)


@dataclass
class Selected:
    r"""A selected parameter: its key in ``means``, its tensor, and every place it appears.

    A tied parameter appears under several names; its sample replaces it at each.
    """

    key: str
    name: str
    param: nn.Parameter
    places: list[tuple[nn.Module, str]] = field(default_factory=list)


def _as_list(prefixes: Sequence[str], argument: str) -> list[str]:
    if isinstance(prefixes, str):
        raise ValueError(f"{argument}: expected a list of prefixes, got the string {prefixes!r}.")
    return list(prefixes)


def select_parameters(
    base: nn.Module,
    include_params: Sequence[str],
    exclude_params: Sequence[str],
) -> list[Selected]:
    r"""Selects the parameters of a base model, in the order of ``named_parameters()``.

    Arguments:
        base: The base model.
        include_params: Glob prefixes of the names to include.
        exclude_params: Glob prefixes of the names to exclude.

    Returns:
        The selected parameters, each with the places where it appears.
    """

    includes = [
        compile_prefix(p, "include_params") for p in _as_list(include_params, "include_params")
    ]
    excludes = [
        compile_prefix(p, "exclude_params") for p in _as_list(exclude_params, "exclude_params")
    ]

    selected: dict[int, Selected] = {}
    seen: set[int] = set()
    keys: set[str] = set()

    for name, param in base.named_parameters(remove_duplicate=False):
        module_name, _, attribute = name.rpartition(".")
        place = (base.get_submodule(module_name), attribute)

        if id(param) in selected:
            selected[id(param)].places.append(place)
            continue
        elif id(param) in seen:
            continue

        seen.add(id(param))

        if not any(p.fullmatch(name) for p in includes):
            continue
        elif any(p.fullmatch(name) for p in excludes):
            continue

        if not param.is_floating_point():
            raise ValueError(
                f"include_params: the selected parameter {name!r} has dtype {param.dtype}; "
                "only floating-point parameters can be Bayesian (exclude it with exclude_params)."
            )

        key = name.replace(".", "-")

        if key in keys:
            raise ValueError(
                f"include_params: the parameters {name!r} and another one share the key {key!r} "
                "once '.' is replaced by '-'; exclude one of them with exclude_params."
            )

        keys.add(key)
        selected[id(param)] = Selected(key, name, param, [place])

    if not selected:
        raise ValueError(
            f"include_params={list(include_params)!r} with exclude_params="
            f"{list(exclude_params)!r} select no parameter of {type(base).__name__}."
        )

    return list(selected.values())
