r"""The posterior of a Bayesian model: its groups, priors, draws, KL divergence and links.

:class:`Posterior` holds no parameters of its own: ``means`` and ``logvars`` are the
:class:`~torch.nn.ParameterDict`\ s of the :class:`~fastbnf.model.BayesianModel` that owns it,
so that state dict keys, pickling and ``.to()`` stay the module's. It sorts the selected
parameters into groups (tensors of one device and dtype, handed to one op call), caches them
while the parameters stay the same objects, and draws and computes the KL divergence one op call
per group.

Internal interface for :mod:`fastbnf.optim` and :mod:`fastbnf.model.checkpointing`:
:func:`posterior_of`, and :meth:`Posterior.groups`, :meth:`Posterior.check_prior`,
:meth:`Posterior.prior`, :meth:`Posterior.salt`, :attr:`Posterior.means` and
:attr:`Posterior.sample_dtype`.
"""

from __future__ import annotations

__all__ = ["Group", "Posterior", "check_finite", "posterior_of"]

import math
import torch
import torch.distributed as dist
import torch.nn as nn

from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Real
from torch import Tensor
from typing import Any

from .. import ops
from .._sharding import is_dtensor
from .slots import Slots


@dataclass
class Group:
    r"""Selected parameters of one device and dtype, handed to the ops together.

    ``places`` are the slots of the base model that the group's samples go to, each with the
    index of its tensor in the group (a tied parameter has several); ``inits`` the frozen
    weights of the base model, per tensor.
    """

    keys: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    means: list[nn.Parameter] = field(default_factory=list)
    logvars: list[nn.Parameter] = field(default_factory=list)
    inits: list[Tensor] = field(default_factory=list)
    places: list[tuple[nn.Module, str, int]] = field(default_factory=list)
    # Whether the means are shards (DTensors of fully_shard), which the ops cannot read.
    sharded: bool = False


def check_finite(value: Any, argument: str) -> float:
    r"""Returns a finite real number argument as a float, or raises a :class:`ValueError`.

    Arguments:
        value: The value: a real number, or a 0-dim real tensor (as in zuko).
        argument: Its name, for the error message.
    """

    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    # bool is a Real, but never a number here.
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{argument} must be a finite number, got {value!r}.")
    return float(value)


def _sharded_error(group: Group) -> RuntimeError:
    return RuntimeError(
        f"BayesianModel: means[{group.keys[0]!r}] is a shard (a DTensor) where the ops read "
        "it. Apply fully_shard() to the BayesianModel itself, fully_shard(bm), whose methods "
        "then gather the posterior for the ops. Under fastbnf.optim.VariationalAdam and "
        "fully_shard(bm.base), the optimizer keeps the posterior in the samples' rows: read "
        "it whole with torch.distributed.checkpoint's get_model_state_dict(bm, "
        "options=StateDictOptions(full_state_dict=True)), into an unsharded model."
    )


class Posterior:
    r"""Creates the posterior of a Bayesian model's selected parameters.

    Arguments:
        means: The model's posterior means, keyed like the selected parameters.
        logvars: Their log-variances.
        selected: Per selected parameter: its key, its name in the base model and its places
            (module, attribute) there.
        slots: The base model's slots, which know the frozen weights.
        sample_dtype: The dtype of the samples, by default the posterior's.
        fold_rank: Whether the data-parallel rank is folded into the noise's key.
        keep_base_weights: Whether the base model keeps its own frozen weights.
    """

    def __init__(
        self,
        means: nn.ParameterDict,
        logvars: nn.ParameterDict,
        selected: list[tuple[str, str, list[tuple[nn.Module, str]]]],
        slots: Slots,
        sample_dtype: torch.dtype | None,
        fold_rank: bool,
        keep_base_weights: bool,
    ) -> None:
        self.means = means
        self.logvars = logvars
        self.selected = selected
        self.slots = slots
        self.sample_dtype = sample_dtype
        self.fold_rank = fold_rank
        self.keep_base_weights = keep_base_weights
        # Groups by the keys they leave out (the local trick's), cached while the parameters
        # stay the same objects on the same devices: building them walks every parameter.
        self.cache: dict[frozenset[str], list[Group]] = {}
        # The links of the last kl_divergence() (ops.Link), for the next draw.
        self.links: list[ops.Link] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A copy or a pickle rebuilds its groups (BayesianModel.__setstate__), links none.
        return {**self.__dict__, "cache": {}, "links": None}

    # Groups.

    def invalidate(self) -> None:
        r"""Forgets the groups and the links: the parameters are about to change."""

        self.cache = {}
        self.links = None

    def groups(self, skip: frozenset[str] = frozenset(), shards: bool = False) -> list[Group]:
        r"""Returns the groups of the selected parameters but ``skip``, as the ops read them.

        Internal interface for :mod:`fastbnf.optim`.

        Arguments:
            skip: The keys to leave out.
            shards: Whether groups of DTensors may be returned (to the optimizer that made
                them, which reads their local rows); else they raise.
        """

        groups = self.cache.get(skip)
        if groups is None or not self.current(groups):
            groups = self.build(skip)
        if not shards:
            for group in groups:
                if group.sharded:
                    raise _sharded_error(group)
        return groups

    def current(self, groups: list[Group]) -> bool:
        r"""Whether cached groups hold the posterior's parameters as they are now.

        fully_shard() (FSDP2) swaps a module's parameters between their shards and the gathered
        tensors, all of them at once: the first mean tells.
        """

        return not groups or self.means._parameters[groups[0].keys[0]] is groups[0].means[0]

    def build(self, skip: frozenset[str] = frozenset()) -> list[Group]:
        r"""Builds and caches the groups of the selected parameters but ``skip``."""

        groups: dict[tuple[torch.device, torch.dtype], Group] = {}
        original = self.slots.original

        for key, name, places in self.selected:
            if key in skip:
                continue

            mean, logvar = self.means[key], self.logvars[key]
            group = groups.setdefault((mean.device, mean.dtype), Group())
            module, attribute = places[0]

            group.places.extend((m, a, len(group.keys)) for m, a in places)
            group.keys.append(key)
            group.names.append(name)
            group.means.append(mean)
            group.logvars.append(logvar)
            group.inits.append(original(module, attribute))
            group.sharded = group.sharded or is_dtensor(mean)

        self.cache[skip] = list(groups.values())
        return self.cache[skip]

    # Priors, validated before anything runs.

    def check_prior(self, prior_var: Any, prior_mean: Any) -> None:
        r"""Raises a :class:`ValueError` for a prior that is not valid for this posterior.

        Internal interface for :mod:`fastbnf.optim`.

        Arguments:
            prior_var: The prior variance, or a dict of them keyed like ``means``.
            prior_mean: The prior mean, 0 or ``"init"``.
        """

        if (
            prior_var.__class__ is float
            and 0.0 < prior_var < math.inf
            and prior_mean.__class__ is float
            and prior_mean == 0.0
        ):
            return  # the common case, valid, known without the ABC checks below (every step)

        if isinstance(prior_var, Mapping):
            for key, value in prior_var.items():
                if key not in self.means:
                    raise ValueError(f"prior_var: {key!r} is not a key of means.")
                if check_finite(value, f"prior_var[{key!r}]") <= 0:
                    raise ValueError(f"prior_var[{key!r}] must be positive, got {value!r}.")
        elif check_finite(prior_var, "prior_var") <= 0:
            raise ValueError(f"prior_var must be positive, got {prior_var!r}.")

        init = isinstance(prior_mean, str) and prior_mean == "init"
        if not init and not (
            isinstance(prior_mean, Real) and not isinstance(prior_mean, bool) and prior_mean == 0
        ):
            raise ValueError(
                f"prior_mean must be 0.0 or 'init' (the base model's weights), got {prior_mean!r}."
            )
        if init and not self.keep_base_weights:
            raise ValueError(
                "prior_mean='init' needs the base model's weights, which this model does not "
                "keep (keep_base_weights=False)."
            )

    def prior(self, group: Group, prior_var: Any, prior_mean: Any) -> ops.Prior:
        r"""Returns the prior of a group, as the ops take it.

        Internal interface for :mod:`fastbnf.optim`.

        Arguments:
            group: The group.
            prior_var: The prior variance, or a dict of them keyed like ``means`` (checked).
            prior_mean: The prior mean, 0 or ``"init"`` (checked).
        """

        if prior_var.__class__ is float and prior_var == 1.0 and prior_mean.__class__ is float:
            return ops.STANDARD_NORMAL  # prior_mean is 0 (checked)
        means = group.inits if prior_mean == "init" else None
        if isinstance(prior_var, Mapping):
            return ops.Prior(1.0, [float(prior_var.get(key, 1.0)) for key in group.keys], means)
        return ops.Prior(float(prior_var), None, means)

    def salt(self) -> int:
        r"""Returns the integer folded into the noise's key: the data-parallel rank with
        ``fold_rank``, else 0.

        Internal interface for :mod:`fastbnf.optim`.
        """

        if self.fold_rank and dist.is_available() and dist.is_initialized():
            return dist.get_rank()
        return 0

    # Draws and the KL divergence.

    def draw(
        self,
        n: int | None,
        with_kl: bool,
        prior_var: Any,
        prior_mean: Any,
        skip: frozenset[str],
        split: bool,
    ) -> tuple[list[tuple[Group, Tensor | list[Tensor]]], Tensor | None]:
        r"""Samples every group but the keys ``skip`` in one op call each.

        The first draw after :meth:`linked_kl` without ``with_kl`` or ``skip`` takes its links.

        Arguments:
            n: The number of samples, or :py:`None` for one without a leading dim.
            with_kl: Whether to sum the groups' KL divergences too, from the same op calls.
            prior_var: The prior variance (checked).
            prior_mean: The prior mean (checked).
            skip: The keys to leave out.
            split: Whether each group's sample comes as views shaped like its tensors, rather
                than flat.

        Returns:
            Each group with its sample, and the KL divergence (:py:`None` without ``with_kl``).
        """

        samples, total = [], None
        salt = self.salt()
        groups = self.groups(skip)

        # The links of the last kl_divergence(), taken by the first sample after it.
        links = self.links if not (with_kl or skip) else None
        if links is not None:
            self.links = None

        for i, group in enumerate(groups):
            views, kl, _ = ops.sample(
                group.means,
                group.logvars,
                n,
                self.sample_dtype,
                with_kl,
                self.prior(group, prior_var, prior_mean),
                salt,
                split=split,
                link=None if links is None else links[i],
            )
            samples.append((group, views))

            if with_kl:
                total = kl if total is None else total + kl.to(total.device)

        return samples, total

    def kl(
        self,
        groups: list[Group],
        prior_var: Any,
        prior_mean: Any,
        total: Tensor | None = None,
        links: list[ops.Link] | None = None,
    ) -> Tensor:
        r"""Returns the KL divergence of ``groups`` to the prior, plus ``total``.

        Arguments:
            groups: The groups.
            prior_var: The prior variance (checked).
            prior_mean: The prior mean (checked).
            total: A KL divergence to add to.
            links: A fresh link per group, for the draw that follows.
        """

        for i, group in enumerate(groups):
            kl = ops.kl(
                group.means,
                group.logvars,
                self.prior(group, prior_var, prior_mean),
                link=None if links is None else links[i],
            )
            total = kl if total is None else total + kl.to(total.device)

        return total

    def linked_kl(self, prior_var: Any, prior_mean: Any) -> Tensor:
        r"""Returns the KL divergence of all groups, linked to the next draw.

        The next sample of the same groups shares this KL's backward (:class:`ops.Link`): the
        seed-style step then costs what ``reparameterize(return_kl=True)`` does.
        """

        groups = self.groups()
        links = None
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            links = [ops.Link() for _ in groups]
        self.links = links

        return self.kl(groups, prior_var, prior_mean, links=links)


def posterior_of(model: nn.Module) -> Posterior:
    r"""Returns the posterior of a :class:`~fastbnf.model.BayesianModel`.

    Internal interface for :mod:`fastbnf.optim`.

    Arguments:
        model: The Bayesian model.
    """

    return model.__dict__["_posterior"]
