r"""Bayesian models, a drop-in replacement for ``zuko.bayesian``."""

__all__ = ["BayesianModel"]

import copy
import math
import torch
import torch.distributed as dist
import torch.nn as nn

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from numbers import Real
from torch import Tensor
from typing import Any

from . import checkpointing, ops
from . import predict as _predict
from ._compat import swap_parameter
from ._sharding import fully_sharded, is_dtensor
from .local_trick import is_trick_layer, local_linear, patched_forwards
from .selection import select_parameters

_SAMPLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The first argument of forward() that runs one of the model's own methods as its forward, so
# that fully_shard() (FSDP2) gathers the parameters for it (BayesianModel._as_forward).
_METHOD = object()


@dataclass
class _Group:
    r"""Selected parameters of one device and dtype, handed to the ops together."""

    keys: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    means: list[nn.Parameter] = field(default_factory=list)
    logvars: list[nn.Parameter] = field(default_factory=list)
    inits: list[Tensor] = field(default_factory=list)
    places: list[tuple[nn.Module, str, int]] = field(default_factory=list)
    # Whether the means are shards (DTensors of fully_shard), which the ops cannot read.
    sharded: bool = False


def _samples_of(selected, posterior_dtype: torch.dtype, sample_dtype: torch.dtype | None):
    r"""The dtype of the samples of a posterior in ``posterior_dtype``: ``sample_dtype``, or the
    selected parameters' own (one for all, which the kernels can store)."""

    if sample_dtype is not None:
        return sample_dtype
    dtypes = {s.param.dtype for s in selected}
    if len(dtypes) != 1 or not dtypes <= {*_SAMPLE_DTYPES}:
        raise ValueError(
            f"posterior_dtype={posterior_dtype} samples in the selected parameters' dtype, "
            f"which must be one of torch.float16, torch.bfloat16 and torch.float32 for all of "
            f"them, got {sorted(map(str, dtypes))}; give sample_dtype."
        )
    dtype = dtypes.pop()
    return None if dtype == posterior_dtype else dtype


def _check_finite(value: Any, argument: str) -> float:
    # A 0-dim real tensor counts as a number, as in zuko; bool is a Real but never a number here.
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{argument} must be a finite number, got {value!r}.")
    return float(value)


@dataclass
class _Held:
    r"""Samples held in the base model's slots: the frozen weights they replace, the samples
    (per group, per tensor) and the state dict names of each slot."""

    originals: dict[tuple[nn.Module, str], Tensor]
    pieces: list[list[Tensor]]
    names: dict[tuple[nn.Module, str], list[str]]


def _base_weights_in_state_dict(model, state_dict, prefix, local_metadata) -> None:
    r"""Saves the frozen weights under the base model's keys while samples are held in its
    slots, so that the state dict stays zuko's."""

    held = model._held
    if held is None:
        return
    for slot, names in held.names.items():
        for name in names:
            key = f"{prefix}base.{name}"
            if key in state_dict:
                value = held.originals[slot]
                keep_vars = state_dict[key].requires_grad
                state_dict[key] = value if keep_vars else value.detach()


def _swap_in(
    samples: list[tuple[_Group, list[Tensor]]],
) -> list[tuple[nn.Module, str, Tensor, Tensor]]:
    r"""Puts the samples where the base model's selected parameters are; returns each slot,
    what was there and the sample."""

    return [
        (module, attribute, swap_parameter(module, attribute, views[i]), views[i])
        for group, views in samples
        for module, attribute, i in group.places
    ]


def _swap_out(swapped: list[tuple[nn.Module, str, Tensor, Tensor]]) -> None:
    for module, attribute, original, sample in reversed(swapped):
        # Where fully_shard() (FSDP2) has put its own parameter since (its reshard after a
        # backward run inside reparameterize()), that one stays: FSDP knows it is there.
        if module._parameters[attribute] is sample:
            module._parameters[attribute] = original


def _sharded_error(group: _Group) -> RuntimeError:
    return RuntimeError(
        f"BayesianModel: means[{group.keys[0]!r}] is a shard (a DTensor of fully_shard(), "
        "FSDP2) where the ops read it. Apply fully_shard() to the BayesianModel itself, "
        "fully_shard(bm), whose methods then gather the posterior for the ops. "
        "fastbnf.optim.VariationalAdam keeps the posterior whole: create it first, then apply "
        "fully_shard() to the base model or its modules (fully_shard(bm.base)), which shards "
        "the samples it keeps there."
    )


class BayesianModel(nn.Module):
    r"""Creates a Bayesian wrapper around a base model.

    Each selected parameter :math:`\theta` of the base model gets a diagonal Gaussian posterior
    :math:`\mathcal{N}(\mu, \sigma^2)` with :math:`\sigma^2 = \exp(\mathrm{softclip}(\log
    \sigma^2))`, whose means and log-variances are the parameters ``means`` and ``logvars``.
    The means start at the base model's values, which are frozen (``requires_grad=False``).
    Sampling and the KL divergence run as fused ops over all selected parameters at once.

    Arguments:
        base: A base model.
        init_logvar: The initial log-variance of the posterior.
        include_params: A list of parameter name prefixes to include. In a prefix, a
            single star `*` matches alphanumeric strings (`[a-zA-Z0-9_]+`) and a double
            star `**` matches dot-separated alphanumeric strings (`[a-zA-Z0-9_\.]+`). By
            default, all parameters are included.
        exclude_params: A list of parameter name prefixes to exclude.
        sample_dtype: The dtype of the sampled parameters (:py:`torch.float16`,
            :py:`torch.bfloat16` or :py:`torch.float32`), by default that of the posterior,
            or of the base model's selected parameters with ``posterior_dtype``.
        fold_rank: Whether each rank of an initialized :mod:`torch.distributed` group draws
            its own noise (the rank is folded into the key).
        posterior_dtype: The dtype of ``means`` and ``logvars``: :py:`torch.bfloat16`, or by
            default that of the selected parameters. The kernels compute in float32; the
            samples keep the base model's dtype. Half the memory of the posterior, its
            gradients and Adam's moments, at the cost of their precision (see
            ``docs/beyond_zuko.md``). Not float16: its range fails Adam (an ``eps`` of 1e-8
            rounds to 0 in float16 moments).
        keep_base_weights: Whether the base model keeps its own copy of the selected weights.
            Without it, the base model's selected slots hold the posterior means themselves
            (what a deterministic model uses, and the same storage: 4 bytes per float32
            parameter saved); the state dict keeps zuko's keys, with the means under the base
            model's; ``prior_mean="init"`` is then unavailable.
    """

    def __init__(
        self,
        base: nn.Module,
        init_logvar: float = -9.0,
        include_params: Sequence[str] = ("",),
        exclude_params: Sequence[str] = (),
        sample_dtype: torch.dtype | None = None,
        fold_rank: bool = True,
        posterior_dtype: torch.dtype | None = None,
        keep_base_weights: bool = True,
    ) -> None:
        init_logvar = _check_finite(init_logvar, "init_logvar")

        for flag, value in (("fold_rank", fold_rank), ("keep_base_weights", keep_base_weights)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be True or False, got {value!r}.")

        if sample_dtype is not None and sample_dtype not in _SAMPLE_DTYPES:
            raise ValueError(
                "sample_dtype must be None, torch.float16, torch.bfloat16 or torch.float32, "
                f"got {sample_dtype}."
            )
        if posterior_dtype is not None and posterior_dtype != torch.bfloat16:
            raise ValueError(
                f"posterior_dtype must be None or torch.bfloat16, got {posterior_dtype}."
            )

        selected = select_parameters(base, include_params, exclude_params)
        if posterior_dtype is not None:
            sample_dtype = _samples_of(selected, posterior_dtype, sample_dtype)
            if not keep_base_weights:
                raise ValueError(
                    "keep_base_weights=False puts the means in the base model's slots: they "
                    "must keep the base model's dtype, not posterior_dtype="
                    f"{posterior_dtype}."
                )

        for s in selected:
            if abs(init_logvar) > torch.finfo(s.param.dtype).max:
                raise ValueError(
                    f"init_logvar={init_logvar} overflows {s.param.dtype}, the dtype of "
                    f"{s.name!r}."
                )

        super().__init__()

        self.base = base
        self.sample_dtype = sample_dtype
        self.fold_rank = fold_rank
        self.keep_base_weights = keep_base_weights

        self.means = nn.ParameterDict()
        self.logvars = nn.ParameterDict()

        for s in selected:
            # Contiguous, so that the ops read them in place (they copy any other layout).
            like = dict(memory_format=torch.contiguous_format, dtype=posterior_dtype)
            self.means[s.key] = nn.Parameter(torch.empty_like(s.param, **like))
            self.logvars[s.key] = nn.Parameter(torch.empty_like(s.param, **like))

        # Same order of draws as zuko, so that a seed initializes both alike.
        with torch.no_grad():
            for s in selected:
                self.means[s.key].copy_(s.param)
                self.logvars[s.key].normal_(init_logvar, 1e-3)
                s.param.requires_grad_(False)
                if not keep_base_weights:
                    for module, attribute in s.places:
                        swap_parameter(module, attribute, self.means[s.key])

        self._selected = [(s.key, s.name, s.places) for s in selected]
        self._groups = {}
        self._trick_cache = None
        self._active = False
        self._links = None
        # The samples an optimizer keeps in the base model's slots (fastbnf.optim), if any.
        self._held = None
        # Whether forward() runs: fully_shard() has gathered the parameters then.
        self._forwarding = False
        self.register_state_dict_post_hook(_base_weights_in_state_dict)
        # Built now (and again wherever they are invalidated) rather than inside the trace of a
        # compiled step, whose guard on the empty cache would fail on the next call: a
        # recompile.
        self._build_groups()

    def _set(self, name: str, value: Any) -> None:
        r"""Sets a plain attribute past :meth:`torch.nn.Module.__setattr__`, whose checks for
        parameters, buffers and modules cost several microseconds: this runs every step."""

        self.__dict__[name] = value

    # Groups (and the local trick's plan) are cached while the parameters stay the same objects
    # on the same devices: building them walks every parameter or module, once, not every step.

    def _invalidate(self) -> None:
        self._groups = {}
        self._trick_cache = None
        self._links = None

    def _apply(self, fn, recurse=True):
        if self._held is not None:
            raise RuntimeError(
                "BayesianModel: cannot move or convert the model while an optimizer keeps its "
                "samples in the base model (fastbnf.optim.VariationalAdam); move it first, then "
                "create the optimizer."
            )
        self._invalidate()
        result = super()._apply(fn, recurse)
        self._build_groups()
        return result

    def __getstate__(self) -> dict[str, Any]:
        if self._held is not None:
            raise RuntimeError(
                "BayesianModel: cannot pickle the model while an optimizer keeps its samples in "
                "the base model (fastbnf.optim.VariationalAdam); save the state dicts of the "
                "model and of the optimizer instead."
            )
        state = super().__getstate__()
        state["_groups"] = {}
        state["_trick_cache"] = None
        state["_active"] = False
        state["_links"] = None
        state["_forwarding"] = False
        return state

    def __deepcopy__(self, memo: dict) -> "BayesianModel":
        # A copy gets the frozen weights in its slots, not an optimizer's samples.
        held = self._held
        self._release()
        try:
            new = self.__class__.__new__(self.__class__)
            memo[id(self)] = new
            new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        finally:
            if held is not None:
                self._hold(held.pieces)
        return new

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("keep_base_weights", True)  # pickled before the option existed
        super().__setstate__(state)
        self._build_groups()

    def _get_groups(self, skip: frozenset[str] = frozenset()) -> list[_Group]:
        r"""The groups of the selected parameters but ``skip``, as the ops read them."""

        groups = self._groups.get(skip)
        if groups is None or not self._current(groups):
            groups = self._build_groups(skip)
        for group in groups:
            if group.sharded:
                raise _sharded_error(group)
        return groups

    def _current(self, groups: list[_Group]) -> bool:
        r"""Whether cached groups hold the posterior's parameters as they are now.

        fully_shard() (FSDP2) swaps a module's parameters between their shards and the gathered
        tensors, all of them at once: the first mean tells.
        """

        return not groups or (
            self._modules["means"]._parameters[groups[0].keys[0]] is groups[0].means[0]
        )

    def _build_groups(self, skip: frozenset[str] = frozenset()) -> list[_Group]:
        groups: dict[tuple[torch.device, torch.dtype], _Group] = {}

        for key, name, places in self._selected:
            if key in skip:
                continue

            mean, logvar = self.means[key], self.logvars[key]
            group = groups.setdefault((mean.device, mean.dtype), _Group())
            module, attribute = places[0]

            group.places.extend((m, a, len(group.keys)) for m, a in places)
            group.keys.append(key)
            group.names.append(name)
            group.means.append(mean)
            group.logvars.append(logvar)
            group.inits.append(self._original(module, attribute))
            group.sharded = group.sharded or is_dtensor(mean)

        self._groups[skip] = list(groups.values())
        return self._groups[skip]

    # Samples held in the base model's slots by an optimizer (fastbnf.optim.VariationalAdam):
    # the slots' frozen weights stay what the groups, the state dict and prior_mean="init" see.

    def _original(self, module: nn.Module, attribute: str) -> Tensor:
        r"""The frozen weight of a selected slot, whatever the slot holds now."""

        if self._held is not None:
            return self._held.originals[module, attribute]
        return module._parameters[attribute]

    def _hold(self, pieces: list[list[Tensor]]) -> None:
        r"""Puts the samples ``pieces`` (per group, per tensor) in the base model's slots until
        :meth:`_release`."""

        if self._held is not None or self._active:
            raise RuntimeError("BayesianModel: the base model's slots are in use already.")
        groups = self._get_groups()
        originals = {}
        for group, views in zip(groups, pieces, strict=True):
            for module, attribute, i in group.places:
                if (module, attribute) not in originals:
                    originals[module, attribute] = swap_parameter(module, attribute, views[i])
        names = {
            (module, attribute): [f"{name}.{attribute}" if name else attribute for name in paths]
            for (module, attribute) in originals
            for paths in [
                [n for n, m in self.base.named_modules(remove_duplicate=False) if m is module]
            ]
        }
        self._set("_held", _Held(originals, pieces, names))

    def _release(self) -> None:
        r"""Puts the frozen weights back in the base model's slots."""

        if self._held is None:
            return
        for (module, attribute), original in self._held.originals.items():
            swap_parameter(module, attribute, original)
        self._set("_held", None)

    # Prior arguments, validated before anything runs.

    def _check_prior(self, prior_var: Any, prior_mean: Any) -> None:
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
                if _check_finite(value, f"prior_var[{key!r}]") <= 0:
                    raise ValueError(f"prior_var[{key!r}] must be positive, got {value!r}.")
        elif _check_finite(prior_var, "prior_var") <= 0:
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

    def _prior(self, group: _Group, prior_var: Any, prior_mean: Any) -> ops.Prior:
        if prior_var.__class__ is float and prior_var == 1.0 and prior_mean.__class__ is float:
            return ops.STANDARD_NORMAL  # prior_mean is 0 (checked)
        means = group.inits if prior_mean == "init" else None
        if isinstance(prior_var, Mapping):
            return ops.Prior(1.0, [float(prior_var.get(key, 1.0)) for key in group.keys], means)
        return ops.Prior(float(prior_var), None, means)

    def _stream(self) -> int:
        if self.fold_rank and dist.is_available() and dist.is_initialized():
            return dist.get_rank()
        return 0

    # Under fully_shard() (FSDP2) the posterior is sharded outside a forward of the model. Its
    # methods then run the ops as a forward (_as_forward): FSDP gathers the parameters before,
    # hooks the backward of what it returns (gathered again for it, gradients reduce-scattered
    # after it) and, the model being the root, leaves them gathered until that backward.

    def _gathers(self) -> bool:
        r"""Whether the ops must run as a forward of the model: fully_shard() manages it and
        no forward runs yet."""

        return not self._forwarding and fully_sharded(self)

    def _reshards(self) -> bool:
        r"""Whether a method that gathers the posterior must shard it again after: it is
        sharded now, and without gradients no backward follows to do it."""

        if torch.is_grad_enabled():
            return False
        return is_dtensor(next(iter(self._modules["means"]._parameters.values())))

    def _as_forward(self, method: Callable, *args, **kwargs) -> Any:
        r"""Runs ``method(*args, **kwargs)`` as a forward of the model."""

        return self(_METHOD, method, *args, **kwargs)

    def _check_slots(self, samples: list[tuple[_Group, list[Tensor]]]) -> None:
        r"""Refuses to put samples in slots that a fully_shard() holds sharded: its forward
        would put its own parameter back where the sample goes."""

        for group, _ in samples:
            for module, attribute, i in group.places:
                if is_dtensor(module._parameters[attribute]):
                    raise RuntimeError(
                        f"BayesianModel: the base model's {group.names[i]!r} is sharded (a "
                        "DTensor of fully_shard(), FSDP2) where its sample goes; a forward of "
                        "its module would gather it over the sample. Shard the BayesianModel as "
                        "the root, fully_shard(bm), and leave the selected weights out of any "
                        "fully_shard() of the base model's modules (ignored_params)."
                    )

    def _sample_groups(
        self,
        n: int | None = None,
        with_kl: bool = False,
        prior_var: Any = 1.0,
        prior_mean: Any = 0.0,
        skip: frozenset[str] = frozenset(),
    ) -> tuple[list[tuple[_Group, list[Tensor]]], Tensor | None]:
        r"""Samples every group in one op call each, and sums their KL divergences; under
        fully_shard(), as a forward of the model."""

        if not self._gathers():
            return self._draw(n, with_kl, prior_var, prior_mean, skip, split=True)

        # The forward returns flat samples, split after it: FSDP hooks every tensor a forward
        # returns and warns of views, and would hook the parameters in a group (a dataclass).
        drawn = []

        def draw():
            samples, kl = self._draw(n, with_kl, prior_var, prior_mean, skip, split=False)
            drawn.extend(group for group, _ in samples)
            return [theta for _, theta in samples], kl

        thetas, kl = self._as_forward(draw)
        samples = [(g, ops.unflatten(theta, g.means)) for g, theta in zip(drawn, thetas)]
        return samples, kl

    def _draw(
        self,
        n: int | None,
        with_kl: bool,
        prior_var: Any,
        prior_mean: Any,
        skip: frozenset[str],
        split: bool,
    ) -> tuple[list[tuple[_Group, Tensor | list[Tensor]]], Tensor | None]:
        samples, total = [], None
        stream = self._stream()
        groups = self._get_groups(skip)

        # The links of the last kl_divergence(), taken by the first sample after it.
        links = self._links if not (with_kl or skip) else None
        if links is not None:
            self._set("_links", None)

        for i, group in enumerate(groups):
            views, kl, _ = ops.sample(
                group.means,
                group.logvars,
                n,
                self.sample_dtype,
                with_kl,
                self._prior(group, prior_var, prior_mean),
                stream,
                split=split,
                link=None if links is None else links[i],
            )
            samples.append((group, views))

            if with_kl:
                total = kl if total is None else total + kl.to(total.device)

        return samples, total

    def forward(self, *args, **kwargs) -> Any:
        r"""Runs ``fn(module, *args, **kwargs)`` with the base model reparameterized.

        This is the forward :class:`torch.nn.parallel.DistributedDataParallel` calls.

        Arguments:
            args: A function ``fn`` of the reparameterized model, then its arguments.
            kwargs: Its keyword arguments.

        Returns:
            What ``fn`` returns.
        """

        if len(args) > 0 and args[0] is _METHOD:
            _, method, *args = args  # one of the model's methods (_as_forward)
        elif len(args) == 0 or isinstance(args[0], Tensor) or not callable(args[0]):
            raise RuntimeError(
                "'forward' method of BayesianModel should not be called directly. Use "
                "'sample_model' or 'reparameterize' instead, or call it with a function "
                "of the reparameterized model: bm(fn, *args)."
            )
        else:
            method = self._reparameterized

        forwarding = self._forwarding
        self._set("_forwarding", True)
        try:
            return method(*args, **kwargs)
        finally:
            self._set("_forwarding", forwarding)

    def _reparameterized(self, fn: Callable, *args, **kwargs) -> Any:
        with self.reparameterize() as module:
            return fn(module, *args, **kwargs)

    def sample_params(self, n: int | None = None) -> dict[str, Tensor]:
        r"""Returns model parameters sampled from the posterior.

        Arguments:
            n: The number of samples, drawn in one op call and stacked along a new first
                dim. By default, one sample without that dim.

        Returns:
            The sampled parameters, keyed by parameter name.
        """

        n = _predict.check_positive(n, "n", optional=True)

        reshard = self._gathers() and self._reshards()
        samples, _ = self._sample_groups(n=n)
        if reshard:
            self.reshard()

        return {name: view for group, views in samples for name, view in zip(group.names, views)}

    def predict(
        self, *args: Any, samples: int, chunk_size: int | None = None, **kwargs: Any
    ) -> Any:
        r"""Returns the base model's outputs under posterior samples, stacked.

        The samples are drawn in one op call (:meth:`sample_params` with ``n=samples``) and
        the base model is evaluated under all of them with :func:`torch.func.vmap`. The
        outputs stay differentiable with respect to the posterior; wrap the call in
        :func:`torch.no_grad` for inference.

        Arguments:
            args: The positional inputs of the base model.
            samples: The number of posterior samples :math:`K`.
            chunk_size: The number of samples evaluated at once, by default all of them.
            kwargs: The keyword inputs of the base model.

        Returns:
            The outputs (tensors, or tuples / dicts of tensors) with a leading dim of size
            :math:`K`.
        """

        # Both checked before anything is drawn.
        samples = _predict.check_positive(samples, "samples")
        chunk_size = _predict.check_positive(chunk_size, "chunk_size", optional=True)

        if not self._gathers():
            return self._predict(args, samples, chunk_size, kwargs)

        # The base model's other parameters are gathered for its forward too.
        reshard = self._reshards()
        outputs = self._as_forward(self._predict, args, samples, chunk_size, kwargs)
        if reshard:
            self.reshard()
        return outputs

    def _predict(self, args: tuple, samples: int, chunk_size: int | None, kwargs: dict) -> Any:
        params = self.sample_params(n=samples)

        return _predict.predict(self.base, params, *args, chunk_size=chunk_size, **kwargs)

    def sample_model(self) -> nn.Module:
        r"""Returns a model sampled from the posterior.

        The returned model is a standalone copy of the base model where parameters have
        been replaced. It can be used exactly in the same ways as the base model, and all
        its parameters require gradients.

        Warning:
            This method should not be used for training as it cannot propagate gradients
            to the Bayesian model's internal parameters.
        """

        if fully_sharded(self):
            raise NotImplementedError(
                "BayesianModel.sample_model() copies the base model, whose parameters "
                "fully_shard() (FSDP2) holds sharded; use sample_params() or predict()."
            )

        with torch.no_grad():
            params = self.sample_params()

        # Inside reparameterize() the base holds samples where its parameters were: the copy
        # gets (copies of) the parameters back in their places, tied ones still tied.
        memo, copies = {}, {}
        if self._active or self._held is not None:
            for group in self._get_groups():
                for module, attribute, i in group.places:
                    original = group.inits[i]
                    if id(original) not in copies:
                        copies[id(original)] = copy.deepcopy(original)
                    memo[id(module._parameters[attribute])] = copies[id(original)]

        new_base = copy.deepcopy(self.base, memo)
        new_base.load_state_dict(params, strict=False)

        for name in params:
            new_base.get_parameter(name).requires_grad_(True)

        return new_base

    @contextmanager
    def reparameterize(
        self,
        local_trick: bool = False,
        return_kl: bool = False,
        prior_var: float | Mapping[str, float] = 1.0,
        prior_mean: float | str = 0.0,
    ) -> Iterator[nn.Module | tuple[nn.Module, Tensor]]:
        r"""Reparameterizes the base model from the posterior.

        Within this context, the base model is temporarily reparametrized and behaves
        deterministically, meaning that two calls to a method with the same inputs,
        leads to the same outputs.

        Arguments:
            local_trick: Whether to use the local reparameterization trick for linear
                layers. Their weights (and Bayesian biases) are then not sampled.
            return_kl: Whether to also yield the KL divergence to the prior, computed in the
                same op call as the samples.
            prior_var: The prior variance, or a dict of them keyed like ``means`` (missing
                keys take 1), with ``return_kl``.
            prior_mean: The prior mean, 0 or ``"init"`` for the base model's weights, with
                ``return_kl``.

        Yields:
            The reparametrized base model, and the KL divergence if ``return_kl``.

        References:
            | Variational Dropout and the Local Reparameterization Trick (Kingma et al., 2015)
            | https://arxiv.org/abs/1506.02557
        """

        if self._active:
            raise RuntimeError(
                "reparameterize() is already active on this BayesianModel; contexts on the same "
                "model cannot nest. Use sample_model() for a second, independent sample."
            )

        self._check_prior(prior_var, prior_mean)

        sharded = fully_sharded(self)
        gathers = sharded and not self._forwarding
        if gathers and local_trick:
            raise NotImplementedError(
                "reparameterize(local_trick=True) is not supported under fully_shard() (FSDP2): "
                "its layers read the posterior outside the op calls that gather it."
            )
        reshard = gathers and self._reshards()

        layers, skip, others = self._trick_plan() if local_trick else ({}, frozenset(), None)
        samples, kl = self._sample_groups(
            with_kl=return_kl, prior_var=prior_var, prior_mean=prior_mean, skip=skip
        )

        if return_kl and skip:
            kl = self._kl(self._get_groups(others), prior_var, prior_mean, kl)

        self._set("_active", True)
        originals = []

        # Straight-line code rather than nested context managers: this runs every step.
        try:
            if sharded:
                self._check_slots(samples)
            originals = _swap_in(samples)
            with self._trick(layers, others) if layers else nullcontext({}) as forwards:
                # Lets activation checkpointing reinstall the samples for a recomputation.
                state = checkpointing.install(self, samples, forwards)
                try:
                    yield (self.base, kl) if return_kl else self.base
                finally:
                    checkpointing.uninstall(self, state)
        finally:
            _swap_out(originals)
            self._set("_active", False)
            if reshard:
                self.reshard()

    @contextmanager
    def _swapped(self, samples: list[tuple[_Group, list[Tensor]]]) -> Iterator[None]:
        originals = _swap_in(samples)
        try:
            yield
        finally:
            _swap_out(originals)

    # The local reparameterization trick.

    def _trick_plan(self) -> tuple[dict, frozenset[str], frozenset[str]]:
        r"""Returns the trick's layers, with their weight and Bayesian bias keys, the keys the
        trick replaces, and the other keys."""

        if self._trick_cache is None:
            # By places, not names: a weight tied between layers has one key, and every use
            # must see the same treatment. The trick takes a weight only where all its uses are
            # weights of trick layers (tied to an embedding, say, it is sampled as usual), and a
            # Bayesian bias only where all its uses are biases of those layers.
            def key_used_only_as(attribute, modules=None):
                found = {}
                for key, _, places in self._selected:
                    if all(
                        a == attribute and is_trick_layer(m) and (modules is None or m in modules)
                        for m, a in places
                    ):
                        found.update((m, key) for m, _ in places)
                return found

            weights = key_used_only_as("weight")
            biases = key_used_only_as("bias", weights)
            layers = {m: (w_key, biases.get(m)) for m, w_key in weights.items()}

            keys = frozenset(k for pair in layers.values() for k in pair if k is not None)
            self._trick_cache = (layers, keys, frozenset(self.means.keys()) - keys)

        return self._trick_cache

    @contextmanager
    def _trick(
        self, layers: dict[nn.Module, tuple[str, str | None]], others: frozenset[str] | None
    ) -> Iterator[dict[nn.Module, Callable]]:
        if not layers:
            yield {}
            return

        variances = {}

        # One variance op per group of the trick's tensors.
        for group in self._get_groups(others):
            views = ops.unflatten(ops.variance(group.logvars), group.logvars)
            variances.update(zip(group.keys, views))

        noises: dict[tuple[nn.Module, torch.Size], Tensor] = {}

        def eta(module, shape, dtype, device):
            if (module, shape) not in noises:
                noises[module, shape] = torch.randn(shape, dtype=dtype, device=device)
            return noises[module, shape]

        forwards = {
            module: partial(
                self._local_forward,
                module=module,
                w_key=w_key,
                b_key=b_key,
                variances=variances,
                eta=partial(eta, module),
            )
            for module, (w_key, b_key) in layers.items()
        }

        with patched_forwards(forwards):
            yield forwards

    def _local_forward(self, x, module, w_key, b_key, variances, eta) -> Tensor:
        if b_key is None:
            b_mean, b_var = module.bias, None
        else:
            b_mean, b_var = self.means[b_key], variances[b_key]

        return local_linear(x, module, self.means[w_key], variances[w_key], b_mean, b_var, eta)

    # The KL divergence.

    def _kl(
        self,
        groups: list[_Group],
        prior_var: Any,
        prior_mean: Any,
        total: Tensor | None = None,
        links: list[ops.Link] | None = None,
    ) -> Tensor:
        for i, group in enumerate(groups):
            kl = ops.kl(
                group.means,
                group.logvars,
                self._prior(group, prior_var, prior_mean),
                link=None if links is None else links[i],
            )
            total = kl if total is None else total + kl.to(total.device)

        return total

    def kl_divergence(
        self,
        prior_var: float | Mapping[str, float] = 1.0,
        prior_mean: float | str = 0.0,
    ) -> Tensor:
        r"""Returns the KL divergence between the posterior and the prior.

        Arguments:
            prior_var: The prior variance, or a dict of them keyed like ``means`` (missing
                keys take 1).
            prior_mean: The prior mean, 0 or ``"init"`` for the base model's weights as they
                were when wrapped.

        Returns:
            The KL divergence, summed over all selected parameters.
        """

        self._check_prior(prior_var, prior_mean)

        if not self._gathers():
            return self._linked_kl(prior_var, prior_mean)

        reshard = self._reshards()
        kl = self._as_forward(self._linked_kl, prior_var, prior_mean)
        if reshard:
            self.reshard()
        return kl

    def _linked_kl(self, prior_var: Any, prior_mean: Any) -> Tensor:
        # The next sample of the same groups shares this KL's backward (ops.Link): the
        # seed-style step then costs what reparameterize(return_kl=True) does.
        groups = self._get_groups()
        links = None
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            links = [ops.Link() for _ in groups]
        self._set("_links", links)

        return self._kl(groups, prior_var, prior_mean, links=links)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ):
        r"""Copies parameters and buffers from a state dict, after checking all of it.

        Unlike :meth:`torch.nn.Module.load_state_dict`, every key, shape and value (a tensor,
        and one with data unless ``assign``) is checked before anything is copied, so a bad
        checkpoint leaves the model unchanged.
        """

        expected = self.state_dict()
        problems = []
        for key, value in state_dict.items():
            if key not in expected:
                continue
            if not isinstance(value, Tensor):
                problems.append(f"{key}: a {type(value).__name__}, not a tensor")
            elif value.shape != expected[key].shape:
                problems.append(
                    f"{key}: shape {tuple(value.shape)} in the state dict, "
                    f"{tuple(expected[key].shape)} in the model"
                )
            elif value.is_meta and not assign:
                problems.append(f"{key}: a meta tensor, which holds no values to copy")

        if strict:
            problems += [f"{key}: missing" for key in expected.keys() - state_dict.keys()]
            problems += [f"{key}: unexpected" for key in state_dict.keys() - expected.keys()]

        if problems:
            raise RuntimeError(
                "BayesianModel.load_state_dict: the state dict does not fit the model, "
                "nothing was loaded:\n  " + "\n  ".join(sorted(problems))
            )

        # The base model's weights load into its slots: its frozen weights, not held samples.
        held = self._held
        self._release()
        try:
            result = super().load_state_dict(state_dict, strict=strict, assign=assign)
            self._invalidate()
            self._build_groups()
        finally:
            if held is not None:
                self._hold(held.pieces)
        return result

    def __getattr__(self, name: str) -> Any:
        r"""Accesses named attribute.

        If an attribute is not found in the BayesianModel, it is looked up in the base
        model.
        """

        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base, name)
