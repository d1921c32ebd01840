r"""The Bayesian model: a facade over its posterior, slots, local trick and sharding."""

from __future__ import annotations

__all__ = ["BayesianModel"]

import copy
import torch
import torch.nn as nn

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from torch import Tensor
from typing import Any

from .._compat import swap_parameter
from .._sharding import fully_sharded, is_dtensor
from . import checkpointing
from . import predict as _predict
from .local_trick import LocalTrick
from .posterior import Group, Posterior, check_finite
from .selection import select_parameters
from .sharding import FORWARD, Sharding, gathered, gathered_draw
from .slots import Slots, frozen_weights_in_state_dict, swap_in, swap_out
from .structure import Watch

_SAMPLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The plain attributes of a BayesianModel pickled before its collaborators existed.
_LEGACY = ("_selected", "_groups", "_trick_cache", "_active", "_links", "_held", "_forwarding")


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

    The model is a facade over named collaborators, each with its own state:
    :class:`~fastbnf.model.posterior.Posterior` (the groups, priors, draws, KL divergence and
    links), :class:`~fastbnf.model.slots.Slots` (what the base model's selected slots hold),
    :class:`~fastbnf.model.local_trick.LocalTrick` and
    :class:`~fastbnf.model.sharding.Sharding` (FSDP2). The model keeps the
    :class:`~torch.nn.Module`: ``means`` and ``logvars`` are its own, so state dict keys,
    pickling, copies and ``.to()`` are a module's.
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
        init_logvar = check_finite(init_logvar, "init_logvar")

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

        self._collaborate(
            [(s.key, s.name, s.places) for s in selected],
            sample_dtype,
            fold_rank,
            keep_base_weights,
        )
        self.register_state_dict_post_hook(frozen_weights_in_state_dict)

    def _collaborate(
        self,
        selected: list[tuple[str, str, list[tuple[nn.Module, str]]]],
        sample_dtype: torch.dtype | None,
        fold_rank: bool,
        keep_base_weights: bool,
    ) -> None:
        r"""Creates the collaborators (plain attributes, past the checks of
        :meth:`torch.nn.Module.__setattr__`)."""

        slots = Slots(self.base, [place for _, _, places in selected for place in places])
        slots.watch = Watch(self.base, [(name, places) for _, name, places in selected])
        posterior = Posterior(
            self.means, self.logvars, selected, slots, sample_dtype, fold_rank, keep_base_weights
        )
        self.__dict__.update(
            _slots=slots,
            _posterior=posterior,
            _trick=LocalTrick(posterior),
            _sharding=Sharding(),
        )
        # Built now (and again wherever they are invalidated) rather than inside the trace of a
        # compiled step, whose guard on the empty cache would fail on the next call: a
        # recompile.
        posterior.build()

    # The options, kept by the posterior, which reads them when it draws.

    @property
    def sample_dtype(self) -> torch.dtype | None:
        r"""The dtype of the samples, by default that of the posterior."""

        return self._posterior.sample_dtype

    @sample_dtype.setter
    def sample_dtype(self, value: torch.dtype | None) -> None:
        self._posterior.sample_dtype = value

    @property
    def fold_rank(self) -> bool:
        r"""Whether each rank draws its own noise."""

        return self._posterior.fold_rank

    @fold_rank.setter
    def fold_rank(self, value: bool) -> None:
        self._posterior.fold_rank = value

    @property
    def keep_base_weights(self) -> bool:
        r"""Whether the base model keeps its own copy of the selected weights."""

        return self._posterior.keep_base_weights

    @keep_base_weights.setter
    def keep_base_weights(self, value: bool) -> None:
        self._posterior.keep_base_weights = value

    # The posterior's groups and the local trick's plan are cached while the parameters stay
    # the same objects on the same devices: building them walks every parameter or module,
    # once, not every step.

    def _invalidate(self) -> None:
        self._posterior.invalidate()
        self._trick.invalidate()

    def _apply(self, fn, recurse=True):
        held = self._slots.held
        if held is not None:
            # A trainer's move to the device the model is on already (Hugging Face's Trainer,
            # Lightning's teardown) changes no tensor: nothing to refuse.
            tensors = [*self.parameters(), *self.buffers()]
            tensors += [t for t in held.originals.values()]
            if all(fn(t) is t for t in tensors):
                return self
            raise RuntimeError(
                "BayesianModel: cannot move or convert the model while an optimizer keeps its "
                "samples in the base model (fastbnf.optim.VariationalAdam); move it first, then "
                "create the optimizer."
            )
        self._invalidate()
        result = super()._apply(fn, recurse)
        self._posterior.build()
        return result

    def __getstate__(self) -> dict[str, Any]:
        if self._slots.held is not None:
            raise RuntimeError(
                "BayesianModel: cannot pickle the model while an optimizer keeps its samples in "
                "the base model (fastbnf.optim.VariationalAdam); save the state dicts of the "
                "model and of the optimizer instead."
            )
        # The collaborators drop their caches and flags themselves (their __getstate__).
        return super().__getstate__()

    def __deepcopy__(self, memo: dict) -> BayesianModel:
        # A copy gets the frozen weights in its slots, not an optimizer's samples.
        slots = self._slots
        held = slots.held
        slots.release()
        try:
            new = self.__class__.__new__(self.__class__)
            memo[id(self)] = new
            new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        finally:
            if held is not None:
                slots.hold(self._posterior.groups(), held.pieces, held.redraw)
        return new

    def __setstate__(self, state: dict[str, Any]) -> None:
        legacy = "_posterior" not in state
        if legacy:  # pickled before the collaborators: plain attributes, the options too
            sample_dtype = state.pop("sample_dtype", None)
            fold_rank = state.pop("fold_rank", True)
            keep_base_weights = state.pop("keep_base_weights", True)  # before the option
            selected = state["_selected"]
            for key in _LEGACY:
                state.pop(key, None)
        super().__setstate__(state)
        if legacy:
            self._collaborate(selected, sample_dtype, fold_rank, keep_base_weights)
        else:
            if self._slots.watch is None:  # pickled before the watch
                selected = self._posterior.selected
                self._slots.watch = Watch(self.base, [(n, p) for _, n, p in selected])
            self._posterior.build()

    def forward(self, *args, **kwargs) -> Any:
        r"""Runs ``fn(module, *args, **kwargs)`` with the base model reparameterized.

        This is the forward :class:`torch.nn.parallel.DistributedDataParallel` calls.

        Arguments:
            args: A function ``fn`` of the reparameterized model, then its arguments.
            kwargs: Its keyword arguments.

        Returns:
            What ``fn`` returns.
        """

        if len(args) > 0 and args[0] is FORWARD:
            _, method, *args = args  # one of the model's methods (sharding.as_forward)
        elif len(args) == 0 or isinstance(args[0], Tensor) or not callable(args[0]):
            raise RuntimeError(
                "'forward' method of BayesianModel should not be called directly. Use "
                "'sample_model' or 'reparameterize' instead, or call it with a function "
                "of the reparameterized model: bm(fn, *args)."
            )
        else:
            method = self._reparameterized

        sharding = self._sharding
        forwarding = sharding.forwarding
        sharding.forwarding = True
        try:
            return method(*args, **kwargs)
        finally:
            sharding.forwarding = forwarding

    def _reparameterized(self, fn: Callable, *args, **kwargs) -> Any:
        with self.reparameterize() as module:
            return fn(module, *args, **kwargs)

    @gathered_draw
    def _draw(
        self,
        n: int | None,
        with_kl: bool,
        prior_var: Any,
        prior_mean: Any,
        skip: frozenset[str],
        split: bool,
    ) -> tuple[list[tuple[Group, Tensor | list[Tensor]]], Tensor | None]:
        r"""Samples every group in one op call each (:meth:`Posterior.draw`); under
        fully_shard(), as a forward of the model."""

        return self._posterior.draw(n, with_kl, prior_var, prior_mean, skip, split)

    def sample_params(self, n: int | None = None) -> dict[str, Tensor]:
        r"""Returns model parameters sampled from the posterior.

        Arguments:
            n: The number of samples, drawn in one op call and stacked along a new first
                dim. By default, one sample without that dim.

        Returns:
            The sampled parameters, keyed by parameter name.
        """

        n = _predict.check_positive(n, "n", optional=True)

        sharding = self._sharding
        reshard = sharding.gathers(self) and sharding.reshards(self)
        samples, _ = self._draw(n, False, 1.0, 0.0, frozenset())
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

        return self._predict(args, samples, chunk_size, kwargs)

    @gathered  # the base model's other parameters are gathered for its forward too
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
        if self._slots.active or self._slots.held is not None:
            for group in self._posterior.groups():
                for module, attribute, i in group.places:
                    original = group.inits[i]
                    if id(original) not in copies:
                        copies[id(original)] = copy.deepcopy(original)
                    memo[id(module._parameters[attribute])] = copies[id(original)]

        new_base = copy.deepcopy(self.base, memo)
        checkpointing.strip(new_base)
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

        if local_trick.__class__ is not bool or return_kl.__class__ is not bool:
            flag, value = ("local_trick", local_trick)
            if local_trick.__class__ is bool:
                flag, value = ("return_kl", return_kl)
            raise ValueError(f"reparameterize(): {flag} must be True or False, got {value!r}.")

        posterior = self._posterior
        posterior.check_prior(prior_var, prior_mean)
        self._slots.watch.check()

        sharded = fully_sharded(self)
        gathers = sharded and not self._sharding.forwarding
        if gathers and local_trick:
            raise NotImplementedError(
                "reparameterize(local_trick=True) is not supported under fully_shard() (FSDP2): "
                "its layers read the posterior outside the op calls that gather it."
            )

        slots = self._slots
        if not slots.claim():
            raise RuntimeError(
                "reparameterize() is already active on this BayesianModel (in this thread or "
                "another); contexts on the same model cannot nest or overlap. Use "
                "sample_model() for a second, independent sample."
            )
        swapped = []
        reshard = False

        # Straight-line code rather than nested context managers: this runs every step.
        try:
            reshard = gathers and self._sharding.reshards(self)
            layers, skip, others = self._trick.plan() if local_trick else ({}, frozenset(), None)
            samples, kl = self._draw(None, return_kl, prior_var, prior_mean, skip)
            if return_kl and skip:
                kl = posterior.kl(posterior.groups(others), prior_var, prior_mean, kl)

            if sharded:
                slots.check_unsharded(samples)
            swapped = swap_in(samples)
            with self._trick.patched(layers, others) if layers else nullcontext({}) as forwards:
                # Lets activation checkpointing reinstall the samples for a recomputation.
                state = checkpointing.install(slots, samples, forwards)
                try:
                    yield (self.base, kl) if return_kl else self.base
                finally:
                    checkpointing.uninstall(slots, state)
        finally:
            swap_out(swapped)
            slots.unclaim()
            if reshard:
                self.reshard()

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

        self._posterior.check_prior(prior_var, prior_mean)

        return self._linked_kl(prior_var, prior_mean)

    @gathered
    def _linked_kl(self, prior_var: Any, prior_mean: Any) -> Tensor:
        return self._posterior.linked_kl(prior_var, prior_mean)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ):
        r"""Copies parameters and buffers from a state dict, after checking all of it.

        Unlike :meth:`torch.nn.Module.load_state_dict`, every key, shape and value (a tensor,
        and one with data unless ``assign``) is checked before anything is copied, so a bad
        checkpoint leaves the model unchanged. While a :class:`fastbnf.optim.VariationalAdam`
        keeps its sample in the base model, the sample is drawn anew from the loaded posterior;
        once ``fully_shard()`` manages the base model, it refuses (load before the optimizer is
        created and the model sharded).
        """

        held = self._slots.held
        if held is not None and any(is_dtensor(m._parameters[a]) for m, a in held.originals):
            raise RuntimeError(
                "BayesianModel.load_state_dict: fully_shard() manages the base model's slots, "
                "which hold the samples of a fastbnf.optim.VariationalAdam that keeps the "
                "posterior in the samples' rows (it would have to be loaded shard by shard). "
                "Load the model's state before creating the optimizer and sharding the model, "
                "then the optimizer's state with its load_state_dict(); nothing was loaded."
            )
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
        slots = self._slots
        held = slots.held
        slots.release()
        try:
            result = super().load_state_dict(state_dict, strict=strict, assign=assign)
            self._invalidate()
            self._posterior.build()
        finally:
            if held is not None:
                slots.hold(self._posterior.groups(), held.pieces, held.redraw)
        # The held samples came from the posterior before the load: drawn anew from this one.
        if held is not None and held.redraw is not None:
            held.redraw()
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
