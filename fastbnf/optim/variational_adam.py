r"""The variational Adam optimizer: Bayesian training with a plain model's loop."""

from __future__ import annotations

import math
import torch
import torch.distributed as dist
import torch.nn as nn

from collections.abc import Callable, Mapping
from numbers import Real
from operator import attrgetter, is_
from torch import Tensor
from typing import Any

from .. import ops
from .._sharding import is_dtensor
from ..model import BayesianModel
from ..model.posterior import posterior_of
from ..model.slots import slots_of
from .._backend import backend
from .._compat import local_part
from .adamw import adam_update
from .shards import Shards, like_dtensor, rows_of, shard_group, shardable
from .step import variational_adam_step


_GRAD = attrgetter("grad")


def _check(value: Any, name: str, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not low <= value < high:
        raise ValueError(
            f"VariationalAdam: {name} must be a number in [{low}, {high}), got {value!r}."
        )
    return float(value)


def _kl_weight(kl_weight: Any, num_data: Any) -> float:
    if num_data is None:
        return 1.0 if kl_weight is None else _check(kl_weight, "kl_weight")
    if kl_weight is not None:
        raise ValueError(
            "VariationalAdam: give kl_weight or num_data (kl_weight = 1 / num_data), not both."
        )
    if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
        raise ValueError(
            f"VariationalAdam: num_data must be a positive integer, got {num_data!r}."
        )
    return 1.0 / num_data


def _data_parallel() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _average(flat: Tensor) -> None:
    r"""Averages a flat tensor over the ranks of the default process group, in place."""

    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())


def _full_grad(shard: Tensor) -> Tensor | None:
    r"""The whole gradient of a parameter that ``fully_shard()`` holds sharded (a DTensor):
    FSDP reduce-scattered it, averaged over the ranks; gathered here (a collective)."""

    return None if shard.grad is None else shard.grad.full_tensor()


def _write_shard(shard: Tensor, full: Tensor) -> None:
    r"""Copies this rank's part of the whole tensor ``full`` into the local tensor of the
    DTensor parameter ``shard``, in place: FSDP gathers its parameters from that storage."""

    shard.to_local().copy_(local_part(full, shard))


class VariationalAdam(torch.optim.Optimizer):
    r"""Creates an Adam optimizer of a Bayesian model's posterior that keeps the current sample
    in the base model.

    While it is in use, the base model's selected parameters hold the current sample
    :math:`\theta_t = \mu + \sigma \epsilon_t` (leaves that require gradients), so that the
    training loop is a plain model's::

        optimizer = VariationalAdam(bm, lr=1e-3, kl_weight=1e-6)
        for x, y in loader:
            loss = loss_fn(bm.base(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    :meth:`step` then does the seed's loop (``kl_divergence()``, ``reparameterize()``,
    ``backward()``, Adam on ``means`` and ``logvars``) at once, one fused op per group: it
    regenerates :math:`\epsilon_t` from its key, adds the KL's gradients (weight
    :math:`\lambda`), updates the posterior and Adam's moments, and draws
    :math:`\theta_{t+1}`. Given the same noise, the two loops are equal. The
    base model's parameters that are not Bayesian get AdamW's update. Gradients accumulated
    over several backward passes between steps all belong to one sample.

    Trainers drive it as any optimizer: its ``param_groups`` hold the tensors that receive
    the gradients, the samples in the base model (and the base model's other trained
    parameters), so that :class:`torch.amp.GradScaler` (``unscale_``, its inf checks and
    skipped steps), :func:`torch.nn.utils.clip_grad_norm_` over them, ``zero_grad`` and the LR
    schedulers work as with :class:`torch.optim.Adam`. The posterior (``means``, ``logvars``)
    and Adam's moments are the optimizer's state.

    Data parallelism: in an initialized process group of several ranks, :meth:`step` averages
    over the ranks before the identical update on every rank (one ``all_reduce`` per group,
    one for the non-Bayesian parameters). When the model's ``fold_rank`` is false, every rank
    holds the same sample and the samples' gradients are averaged; when it is true, each rank
    has its own noise and forms its own reparameterization gradient, and those are averaged.
    The base model may be wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`
    (after the optimizer is created, as trainers do) only with ``fold_rank=False``: DDP then
    averages the samples' gradients, which is right for one sample on every rank. With
    ``fold_rank=True`` DDP's average would mix the ranks' noise; the first step detects
    gradients equal on every rank and raises.

    Sharding (FSDP2): create the optimizer first, then apply ``fully_shard()`` to the base model
    or its modules (``fully_shard(bm.base)``, not ``fully_shard(bm)``). FSDP then shards the
    samples and their gradients, and the optimizer keeps the posterior in the same rows: on the
    first step (or ``state_dict()``) after the sharding, each group whose samples FSDP has cut
    into rows (``Shard(0)`` of a 1-d mesh, its default) gets its means and log-variances as
    DTensor parameters of the model laid out like the samples, and Adam's moments and the flat
    sample and gradient in this rank's rows only (:mod:`fastbnf.optim.shards`). :meth:`step`
    then reads the gradients that FSDP has reduce-scattered and averaged, steps the rows with
    their places in the group's noise stream, so that the ranks together take the step of one
    process, and writes the next sample into the shards, where FSDP's forward gathers it: no
    collective of its own, and 1 / W of the state per rank. The trainer's ``param_groups`` then
    hold the shards, and so for the non-Bayesian parameters, which AdamW steps on FSDP's
    shards. A group sharded otherwise (another placement, a 2-d mesh, some samples left whole)
    stays whole on every rank: its gradients are gathered (one all-gather per sharded tensor),
    the same step taken on every rank and each rank's shards of the next sample written. FSDP's
    average of the samples' gradients is right only if every rank holds the
    same sample: the model's ``fold_rank`` must be false. With the posterior in the rows, the
    model's methods that read it whole refuse, and so does its ``load_state_dict()``: load the
    model's state before creating the optimizer and sharding, and read the posterior whole with
    ``torch.distributed.checkpoint``'s ``get_model_state_dict(bm,
    options=StateDictOptions(full_state_dict=True))``. The optimizer's ``state_dict()`` holds
    each rank's rows, to load on as many ranks.

    The model's ``state_dict`` keeps the frozen weights under ``base.*`` (zuko's), its
    ``means``, ``logvars``, :meth:`BayesianModel.kl_divergence` and ``reparameterize()`` work as
    before; the optimizer's ``state_dict`` holds Adam's state, the current sample and its key,
    so that a checkpoint resumes the same trajectory. :meth:`release` puts the frozen weights
    back in the base model.

    Arguments:
        model: A Bayesian model.
        lr: The learning rate.
        betas: Adam's coefficients of the running averages.
        eps: Adam's term added to the denominator.
        weight_decay: The decoupled weight decay (AdamW's) of the means and of the non-Bayesian
            parameters; the log-variances have none.
        kl_weight: The weight :math:`\lambda` of the KL divergence in the loss. For a data
            loss averaged over the batch, the evidence lower bound per example has
            :math:`\lambda = 1 / N` for :math:`N` training examples: give ``num_data``
            instead. The default 1 weighs the KL as much as the whole dataset does.
        prior_var: The prior variance, or a dict of them keyed like ``means``.
        prior_mean: The prior mean, 0 or ``"init"`` for the base model's weights.
        num_data: The number of training examples :math:`N`, for ``kl_weight = 1 / N``
            (IVON's effective sample size); not with ``kl_weight``.
        capturable: Whether :meth:`step` can be captured in a CUDA graph: the step counts live
            on the groups' devices and the kernels read them there, the keys are updated in
            place, and the non-Bayesian parameters take :func:`torch.optim.adam.adam`'s
            capturable AdamW on CUDA. Take one step before capturing (it creates the state).
            It needs the compiled kernels on a CUDA device (the torch backend draws its keys
            on the host) and excludes ``fold_rank`` under data parallelism; on the CPU it
            changes where the counts live, not the results.
    """

    def __init__(
        self,
        model: BayesianModel,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        kl_weight: float | None = None,
        prior_var: Any = 1.0,
        prior_mean: Any = 0.0,
        num_data: int | None = None,
        capturable: bool = False,
    ) -> None:
        if not isinstance(model, BayesianModel):
            raise TypeError(
                f"VariationalAdam: model must be a fastbnf.BayesianModel, got {type(model)}."
            )
        if not isinstance(capturable, bool):
            raise TypeError(f"VariationalAdam: capturable must be a bool, got {capturable!r}.")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"VariationalAdam: betas must be a pair of numbers, got {betas!r}.")
        defaults = dict(
            lr=_check(lr, "lr"),
            betas=(_check(betas[0], "betas[0]", high=1.0), _check(betas[1], "betas[1]", high=1.0)),
            eps=_check(eps, "eps"),
            weight_decay=_check(weight_decay, "weight_decay"),
            kl_weight=_kl_weight(kl_weight, num_data),
        )
        # The model's internal interface (fastbnf.model.posterior, fastbnf.model.slots).
        posterior, slots = posterior_of(model), slots_of(model)
        posterior.check_prior(prior_var, prior_mean)
        # Sharding comes after the optimizer: fully_shard() must find the samples in the slots.
        for name, p in model.named_parameters():
            if is_dtensor(p):
                raise RuntimeError(
                    f"VariationalAdam: the model's {name!r} is sharded (a DTensor of "
                    "fully_shard(), FSDP2). Create the optimizer first, so that the base "
                    "model holds its samples, then apply fully_shard() to the base model or "
                    "its modules (not to the BayesianModel, whose posterior the optimizer "
                    "keeps whole)."
                )
        if slots.held is not None or slots.active:
            raise RuntimeError(
                "VariationalAdam: the model's base holds samples already (another optimizer, "
                "or an active reparameterize())."
            )

        groups = posterior.groups()
        posterior_ids = {id(p) for g in groups for p in (*g.means, *g.logvars)}
        # The base model's own trained parameters (its slots may hold the means themselves,
        # keep_base_weights=False: those are the posterior's).
        others = [
            p for p in model.base.parameters() if p.requires_grad and id(p) not in posterior_ids
        ]
        priors = [posterior.prior(g, prior_var, prior_mean) for g in groups]
        # Per group: the flat sample (the base model's leaves are views of it) and the key it
        # was drawn from.
        thetas, rng_states, pieces = [], [], []
        with torch.no_grad():
            for group, prior in zip(groups, priors):
                theta, _, rng_state = ops.sample(
                    group.means,
                    group.logvars,
                    None,
                    posterior.sample_dtype,
                    False,
                    prior,
                    posterior.salt(),
                )
                thetas.append(theta)
                rng_states.append(rng_state)
                pieces.append([nn.Parameter(v) for v in ops.unflatten(theta, group.means)])
        # The parameters a trainer sees are the tensors that receive the gradients.
        param_groups = [{"params": [p for ps in pieces for p in ps], "posterior": True}]
        if others:
            param_groups.append({"params": others, "posterior": False})
        super().__init__(param_groups, defaults)

        self.model = model
        self._posterior = posterior
        self._slots = slots
        self._priors = priors
        self._thetas: list[Tensor] = thetas
        self._rng_states: list[Tensor] = rng_states
        # The count of steps taken, per group. The posterior's state is kept beside the
        # optimizer's own (state_dict's "posterior"): loading the latter would cast it to the
        # dtype of the samples it is keyed by, and the key (int64) with it.
        self._steps = [0] * len(groups)
        # Capturable: the counts on the groups' devices too, which the kernels read there.
        self.capturable = capturable
        self._step_tensors = None
        if capturable:
            for theta in thetas:
                if theta.device.type == "cuda" and backend(theta.device) != "cuda":
                    raise ValueError(
                        f"VariationalAdam: capturable=True needs the CUDA kernels on "
                        f"{theta.device}, where the {backend(theta.device)!r} backend runs (it "
                        "draws the noise's keys on the host, which a CUDA graph would freeze)."
                    )
            self._step_tensors = [
                torch.zeros((), dtype=torch.int64, device=t.device) for t in thetas
            ]
        self._pieces = pieces
        # Where each non-Bayesian parameter sits in the base model, so that the step finds the
        # shard that a later fully_shard() puts there instead.
        self._other_places: dict[int, tuple[nn.Module, str]] = {}
        for module in model.base.modules():
            for attribute, p in module._parameters.items():
                if p is not None and p.requires_grad and id(p) not in posterior_ids:
                    self._other_places.setdefault(id(p), (module, attribute))
        # The slots of every sample and their names, which fully_shard() leaves in place.
        self._places = [list(group.places) for group in groups]
        self._names = [list(group.names) for group in groups]
        # The classes of the modules with slots and of their ancestors: fully_shard() of a
        # module (which shards the parameters of all its submodules) gives it a class of its
        # own, so that one identity check per module tells, every step, whether the walks over
        # the slots below are needed (host time per tensor, every step: bench_step).
        with_slots = {id(m) for places in self._places for m, _, _ in places}
        with_slots |= {id(m) for m, _ in self._other_places.values()}
        self._classes = []
        seen = set()
        for name, module in model.named_modules(remove_duplicate=False):
            if id(module) not in with_slots:
                continue
            parts = name.split(".") if name else []
            for k in range(len(parts) + 1):
                ancestor = model.get_submodule(".".join(parts[:k]))
                if id(ancestor) not in seen:
                    seen.add(id(ancestor))
                    self._classes.append((ancestor, type(ancestor)))
        # Per group, its posterior on this rank's rows once fully_shard() has cut its samples
        # into rows (shards.py), else None.
        self._shards: list[Shards | None] = [None] * len(groups)
        # The samples' gradients accumulate in place in one flat buffer per group (autograd
        # adds into an existing .grad), which the step reads as it is.
        self._grads = [torch.zeros_like(theta) for theta in self._thetas]
        self._grad_views = [
            ops.unflatten(grad, group.means) for grad, group in zip(self._grads, groups)
        ]
        self._attach_grads()
        # Adam's moments of a group in two flat buffers (the means', then the log-variances'),
        # which the fused step reads and writes as they are.
        self._exp_avgs = [
            g.means[0].new_zeros(2 * t.numel()) for g, t in zip(groups, self._thetas)
        ]
        self._exp_avg_sqs = [torch.zeros_like(m) for m in self._exp_avgs]
        # Whether the first step under data parallelism has checked the gradients' origin.
        self._checked_ranks = False
        slots.hold(groups, pieces, self._redraw)

    def _redraw(self) -> None:
        r"""Draws every group's sample anew from the posterior as it is, into the flat samples
        in place (the base model's leaves are views of them): after the model loads a state
        dict, a sample of the posterior before would be stale."""

        with torch.no_grad():
            for i, (group, prior) in enumerate(zip(self._posterior.groups(), self._priors)):
                theta, _, key = ops.sample(
                    group.means,
                    group.logvars,
                    None,
                    self._thetas[i].dtype,
                    False,
                    prior,
                    self._posterior.salt(),
                )
                self._set_key(i, key)
                self._thetas[i].copy_(theta)
            for pieces, shards in zip(self._pieces, self._sharded_samples()):
                for j, shard in shards.items():
                    _write_shard(shard, pieces[j].detach())

    def _count(self, i: int) -> Tensor | None:
        r"""Counts a step of group ``i``; returns its count on the device when capturable (the
        kernels read it there: a CUDA graph replays it with the count of each replay)."""

        self._steps[i] += 1
        if self._step_tensors is None:
            return None
        return self._step_tensors[i].add_(1)

    def _set_key(self, i: int, key: Tensor) -> None:
        r"""Makes ``key`` group ``i``'s; in place when capturable, so that a replayed step reads
        the key that the step before it wrote."""

        if self._step_tensors is None:
            self._rng_states[i] = key
        else:
            self._rng_states[i].copy_(key)

    def _attach_grads(self) -> None:
        r"""Makes every sample's .grad its view of the group's flat gradient buffer."""

        for pieces, views, shards in zip(self._pieces, self._grad_views, self._shards):
            if shards is not None:  # FSDP's DTensors, whose gradients FSDP assigns
                continue
            for piece, view in zip(pieces, views):
                if piece.grad is not view:
                    piece.grad = view

    def _resharded(self) -> bool:
        r"""Whether fully_shard() has been applied to the model, or to a module with slots or
        one of its ancestors, since the optimizer was built."""

        return any(type(module) is not cls for module, cls in self._classes)

    def _check_means(self) -> None:
        if not self._resharded():
            return
        mine = {}
        for shards in filter(None, self._shards):
            mine.update(zip(shards.keys, shards.mean_params))
        for key, mean in self._posterior.means.items():
            if key in mine:
                if mean is not mine[key]:
                    raise RuntimeError(
                        f"VariationalAdam: means[{key!r}] is no longer the shard the optimizer "
                        "made of it (fully_shard() of the BayesianModel, or a parameter set by "
                        "hand?): the optimizer keeps the posterior in the rows of the samples."
                    )
            elif is_dtensor(mean):
                raise RuntimeError(
                    f"VariationalAdam: means[{key!r}] is sharded (a DTensor of fully_shard(), "
                    "FSDP2): the optimizer keeps the posterior whole on every rank and cannot "
                    "step a sharded one. Apply fully_shard() to the base model or its modules "
                    "(fully_shard(bm.base)), which shards the samples, not to the "
                    "BayesianModel."
                )

    def _sharded_samples(self) -> list[dict[int, Tensor]]:
        r"""Per group, the shards (DTensors) that fully_shard() has put in the base model's
        slots in place of the samples, by the samples' index in the group."""

        if not self._resharded():
            return [{} for _ in self._pieces]
        out = []
        for places, names, pieces, mine in zip(
            self._places, self._names, self._pieces, self._shards
        ):
            if mine is not None:  # the posterior in the shards' rows already
                out.append({})
                continue
            shards: dict[int, Tensor] = {}
            whole = set()
            for module, attribute, i in places:
                current = module._parameters.get(attribute)
                if current is pieces[i]:
                    whole.add(i)
                elif is_dtensor(current) and shards.get(i, current) is current:
                    shards[i] = current  # a shared sample: the same shard in every slot
                else:
                    raise RuntimeError(
                        f"VariationalAdam: the base model's {names[i]!r} holds neither the "
                        "optimizer's sample nor a shard of it (fully_shard()'s DTensor); "
                        "something else was put in its slot."
                    )
            if whole & shards.keys():
                name = names[min(whole & shards.keys())]
                raise RuntimeError(
                    f"VariationalAdam: the base model's {name!r} is shared by slots that "
                    "fully_shard() holds sharded and slots that it does not."
                )
            out.append(shards)
        return out

    def _follow_sharding(self) -> list[dict[int, Tensor]]:
        r"""Follows what fully_shard() has sharded since the last call, once: the non-Bayesian
        parameters are replaced by their shards (:meth:`_shard_others`), and the posterior of
        every group whose samples are cut into rows is kept in the same rows
        (:mod:`fastbnf.optim.shards`). Returns the shards of the samples of the other groups,
        as :meth:`_sharded_samples` does."""

        self._shard_others()
        samples = self._sharded_samples()
        if self._posterior.fold_rank and _data_parallel():
            return samples  # refused by step(): each rank would hold its own sample
        for i, found in enumerate(samples):
            if found and shardable(found, len(self._pieces[i])):
                self._shard_posterior(i, [found[j] for j in range(len(self._pieces[i]))])
                samples[i] = {}
        return samples

    @torch.no_grad()
    def _shard_posterior(self, i: int, samples: list[Tensor]) -> None:
        r"""Keeps group ``i``'s posterior, moments and sample in this rank's rows of the
        samples' DTensors ``samples``; the whole tensors are dropped."""

        group = self._posterior.groups(shards=True)[i]
        numel = self._thetas[i].numel()
        shards, spans = shard_group(
            group.keys, group.means, group.logvars, self._pieces[i], samples, self._priors[i]
        )
        # Every reference to the whole tensors goes: the model's parameters, the flat buffers,
        # the samples (the trainer's parameters are the DTensors now), the priors, and the
        # frozen weights that the slots keep (cut as the samples at their slots), or the means
        # themselves where keep_base_weights=False made them the base model's weights.
        originals = self._slots.held.originals
        cut: dict[int, Tensor] = {
            id(old): new for old, new in zip(group.means, shards.mean_params)
        }
        for module, attribute, j in self._places[i]:
            original = originals[module, attribute]
            if id(original) not in cut:
                cut[id(original)] = nn.Parameter(
                    like_dtensor(original, samples[j]), requires_grad=original.requires_grad
                )
            originals[module, attribute] = cut[id(original)]
        for key, mean, logvar in zip(shards.keys, shards.mean_params, shards.logvar_params):
            self._posterior.means[key] = mean
            self._posterior.logvars[key] = logvar
        self._posterior.invalidate()
        self._exp_avgs[i] = rows_of(self._exp_avgs[i], spans, numel)
        self._exp_avg_sqs[i] = rows_of(self._exp_avg_sqs[i], spans, numel)
        self._thetas[i] = rows_of(self._thetas[i], spans, numel)
        self._grads[i] = torch.zeros_like(self._thetas[i])
        self._grad_views[i] = list(self._grads[i].split(shards.counts))
        self._pieces[i] = samples
        self._priors[i] = shards.prior
        self._shards[i] = shards
        self.param_groups[0]["params"] = [p for ps in self._pieces for p in ps]

    @torch.no_grad()
    def _shard_others(self) -> None:
        r"""Puts in ``param_groups`` the shards (DTensors) that fully_shard() has put in the
        base model's slots in place of the non-Bayesian parameters, with their moments cut the
        same way: AdamW then steps each rank's shard on the gradient that FSDP has
        reduce-scattered and averaged, and the whole parameters are dropped."""

        shards = self._sharded_others()
        if not shards:
            return
        for param_group in self.param_groups:
            params = param_group["params"]
            for k, p in enumerate(params):
                shard = shards.get(id(p))
                if shard is None:
                    continue
                params[k] = shard
                self._other_places[id(shard)] = self._other_places.pop(id(p))
                state = self.state.pop(p, None)
                if state:
                    # The moments, laid out as the parameter; the count as it is.
                    self.state[shard] = {
                        key: like_dtensor(value, shard)
                        if isinstance(value, Tensor) and value.shape == p.shape
                        else value
                        for key, value in state.items()
                    }

    def _sharded_others(self) -> dict[int, Tensor]:
        r"""The shards (DTensors) that fully_shard() has put in the base model's slots in
        place of the non-Bayesian parameters, by the parameters' id."""

        out = {}
        if not self._resharded():
            return out
        for param_group in self.param_groups:
            if param_group["posterior"]:
                continue
            for p in param_group["params"]:
                place = self._other_places.get(id(p))  # none for a group added by hand
                if place is None:
                    continue
                current = place[0]._parameters.get(place[1])
                if current is not p and is_dtensor(current):
                    out[id(p)] = current
        return out

    @property
    def samples(self) -> list[list[Tensor]]:
        r"""The current samples held in the base model, per group and tensor."""

        return self._pieces

    def release(self) -> None:
        r"""Puts the frozen weights back in the base model; the optimizer cannot step after."""

        if any(self._sharded_samples()) or any(s is not None for s in self._shards):
            raise RuntimeError(
                "VariationalAdam: cannot release a base model that fully_shard() manages: its "
                "slots hold FSDP's shards of the samples. Read the posterior from the model's "
                "means and logvars instead."
            )
        self._slots.release()
        self._pieces = []
        self._grad_views = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        r"""Resets the gradients: those of the samples are zeroed in their flat buffers (one
        fill per group, whatever ``set_to_none``), the others as :class:`torch.optim.Adam`
        does."""

        super().zero_grad(set_to_none)
        for grad in self._grads:
            grad.zero_()
        self._attach_grads()
        # Under fully_shard(), the gradients are FSDP's shards, which it accumulates into.
        shards = [*(s for g in self._sharded_samples() for s in g.values())]
        for shard in (*shards, *self._sharded_others().values()):
            if shard.grad is not None:
                if set_to_none:
                    shard.grad = None
                else:
                    shard.grad.zero_()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        r"""Takes one step and draws the next sample into the base model.

        Arguments:
            closure: A function that evaluates the model and returns the loss, optional.
        """

        if not self._pieces:
            raise RuntimeError("VariationalAdam: released, it cannot step any more.")
        # What fully_shard() has sharded since the construction, checked before any change.
        self._check_means()
        samples = self._follow_sharding()
        sharded = any(samples) or any(s is not None for s in self._shards)
        if sharded and self._posterior.fold_rank and _data_parallel():
            raise RuntimeError(
                "VariationalAdam: fully_shard() averages the samples' gradients over the "
                "ranks, which is right only when every rank holds the same sample; the model's "
                "fold_rank=True gives each rank its own. Create the BayesianModel with "
                "fold_rank=False."
            )
        if self.capturable and self._posterior.fold_rank and _data_parallel():
            raise RuntimeError(
                "VariationalAdam: capturable=True cannot average the gradients that each rank "
                "forms with its own noise (fold_rank=True under data parallelism: the average "
                "runs on the host's count). Create the BayesianModel with fold_rank=False."
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Per group, whether every sample's .grad is still its view of the group's flat buffer
        # (dense, and read as it is); compared in C (map over operator.is_): this runs every step.
        # A group in rows reads FSDP's gradients, which are dense: nothing to check.
        attached = [
            shards is not None or all(map(is_, map(_GRAD, pieces), views))
            for pieces, views, shards in zip(self._pieces, self._grad_views, self._shards)
        ]
        self._check_sparse(attached)
        if not self._checked_ranks and _data_parallel():
            self._check_ranks()

        for param_group in self.param_groups:
            options = {k: param_group[k] for k in ("lr", "betas", "eps", "weight_decay")}
            if param_group["posterior"]:
                self._posterior_step(param_group["kl_weight"], samples, attached, **options)
            else:
                self._plain_step(param_group["params"], **options)
        return loss

    def _check_sparse(self, attached: list[bool]) -> None:
        r"""Refuses sparse gradients before anything is updated, as :class:`torch.optim.Adam`
        does: those of the non-Bayesian parameters, and the samples' where a group's are not
        the views of its flat buffer or FSDP's shards (which are dense)."""

        loose = [p for pieces, a in zip(self._pieces, attached) if not a for p in pieces]
        others = [p for g in self.param_groups if not g["posterior"] for p in g["params"]]
        for p in (*loose, *others):
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(
                    "VariationalAdam does not support sparse gradients (a parameter of "
                    f"shape {tuple(p.shape)}, from nn.Embedding(sparse=True), say); "
                    "nothing was updated. Use dense gradients, or torch.optim.SparseAdam "
                    "for those parameters."
                )

    def _check_ranks(self) -> None:
        r"""On the first step under data parallelism with ``fold_rank``: refuses gradients of
        the samples that are equal on every rank, which only an average over the ranks
        before the step makes (the base model wrapped in DistributedDataParallel), since each
        rank holds its own sample. One all-reduce, once."""

        self._checked_ranks = True
        # The samples' gradients as they are (a trainer may have freed the flat buffers' views).
        if not self._posterior.fold_rank:
            return
        grads = [p.grad for pieces in self._pieces for p in pieces if p.grad is not None]
        # Every rank joins the all-reduce, with or without gradients.
        total = self._thetas[0].new_zeros((), dtype=torch.float64)
        for grad in grads:
            total += grad.double().sum()
        extremes = torch.stack([total, -total])
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        if extremes[0] == -extremes[1] and total != 0:
            raise RuntimeError(
                "VariationalAdam: the samples' gradients are equal on every rank, averaged "
                "before the step (the base model wrapped in DistributedDataParallel?), but "
                "the model's fold_rank=True gives each rank its own sample, whose gradient "
                "must stay its own. Create the BayesianModel with fold_rank=False to wrap its "
                "base in DistributedDataParallel, or do not wrap it: the step averages over "
                "the ranks itself."
            )

    def _posterior_step(self, kl_weight, samples, attached, lr, betas, eps, weight_decay) -> None:
        groups = self._posterior.groups(shards=True)
        salt = self._posterior.salt()
        options = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, kl_weight=kl_weight)
        for i, (group, prior, pieces) in enumerate(zip(groups, self._priors, self._pieces)):
            if self._shards[i] is not None:
                self._rows_step(i, salt, options)
                continue
            shards = samples[i]
            if attached[i]:
                grad_theta, views = self._grads[i], self._grad_views[i]
            else:  # gradients set or freed by hand (bm.zero_grad(), say): gathered once
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in pieces]
                grad_theta = torch.cat([g.reshape(-1) for g in grads])
                views = ops.unflatten(grad_theta, group.means)
            average = None
            if _data_parallel():
                if self._posterior.fold_rank:
                    average = _average  # of the gradients each rank forms with its own noise
                elif len(shards) < len(pieces):
                    # One sample on every rank: the gradients are linear in grad_theta. Those
                    # of the sharded samples are zeros here, filled below.
                    _average(grad_theta)
            # The sharded samples' gradients, which FSDP has averaged over the ranks already.
            for j, shard in shards.items():
                grad = _full_grad(shard)
                if grad is None:
                    views[j].zero_()
                else:
                    views[j].copy_(grad.view_as(views[j]))
            step_tensor = self._count(i)
            key = variational_adam_step(
                grad_theta,
                group.means,
                group.logvars,
                self._exp_avgs[i],
                self._exp_avg_sqs[i],
                self._thetas[i],  # in place: the base model's leaves are views of it
                self._rng_states[i],
                self._steps[i],
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                kl_weight=kl_weight,
                prior=prior,
                salt=salt,
                average=average,
                step_tensor=step_tensor,
            )
            self._set_key(i, key)
            # The next sample's shards, where FSDP's forward gathers them from.
            for j, shard in shards.items():
                _write_shard(shard, pieces[j].detach())

    def _rows_step(self, i: int, salt: int, options: dict[str, Any]) -> None:
        r"""The step of group ``i`` on this rank's rows (:mod:`fastbnf.optim.shards`): on the
        gradients that FSDP has reduce-scattered and averaged into the samples' shards, with the
        rows' noise offsets; the next sample goes into the shards, where FSDP gathers it from."""

        shards = self._shards[i]
        for view, sample in zip(self._grad_views[i], shards.samples):
            if sample.grad is None:
                view.zero_()
            else:
                view.copy_(sample.grad.to_local().reshape(-1))
        step_tensor = self._count(i)
        key = variational_adam_step(
            self._grads[i],
            shards.means,
            shards.logvars,
            self._exp_avgs[i],
            self._exp_avg_sqs[i],
            self._thetas[i],
            self._rng_states[i],
            self._steps[i],
            prior=shards.prior,
            salt=salt,
            noise_offsets=shards.noise_offsets,
            step_tensor=step_tensor,
            **options,
        )
        self._set_key(i, key)
        self._write_rows(i)

    def _write_rows(self, i: int) -> None:
        r"""Copies group ``i``'s flat sample of this rank's rows into the samples' shards."""

        shards = self._shards[i]
        for sample, rows in zip(shards.samples, self._thetas[i].split(shards.counts)):
            local = sample.to_local()
            local.copy_(rows.view_as(local))

    def _plain_step(self, params, lr, betas, eps, weight_decay) -> None:
        with_grads = [p for p in params if p.grad is not None]
        # FSDP's shards (DTensors) have their gradients averaged over the ranks already.
        local = [p for p in with_grads if not is_dtensor(p)]
        if local and _data_parallel():
            flat = torch.cat([p.grad.reshape(-1) for p in local])
            _average(flat)
            for p, g in zip(local, flat.split([p.numel() for p in local])):
                p.grad.copy_(g.view_as(p.grad))
        # Capturable on CUDA: PyTorch's capturable AdamW, whose counts live on the device (it
        # counts them itself); the others here, counted on the host.
        on_device, on_host = [], []
        for p in with_grads:
            (on_device if self.capturable and p.device.type == "cuda" else on_host).append(p)
        for p in with_grads:
            if "step" not in self.state[p]:
                self.state[p]["step"] = (
                    torch.zeros((), dtype=torch.float32, device=p.device)
                    if self.capturable and p.device.type == "cuda"
                    else 0
                )
                self.state[p]["exp_avg"] = torch.zeros_like(p)
                self.state[p]["exp_avg_sq"] = torch.zeros_like(p)
        if on_device:
            torch.optim.adam.adam(
                on_device,
                [p.grad for p in on_device],
                [self.state[p]["exp_avg"] for p in on_device],
                [self.state[p]["exp_avg_sq"] for p in on_device],
                [],
                [self.state[p]["step"] for p in on_device],
                foreach=True,
                capturable=True,
                decoupled_weight_decay=True,
                amsgrad=False,
                beta1=betas[0],
                beta2=betas[1],
                lr=lr,
                weight_decay=weight_decay,
                eps=eps,
                maximize=False,
            )
        for p in on_host:
            self.state[p]["step"] += 1
        # One update per step count (a parameter may have missed steps without a gradient).
        by_step: dict[int, list[Tensor]] = {}
        for p in on_host:
            by_step.setdefault(int(self.state[p]["step"]), []).append(p)
        for step, ps in by_step.items():
            adam_update(
                ps,
                [p.grad for p in ps],
                [self.state[p]["exp_avg"] for p in ps],
                [self.state[p]["exp_avg_sq"] for p in ps],
                step,
                lr,
                betas,
                eps,
                weight_decay,
            )

    def state_dict(self) -> dict[str, Any]:
        r"""Returns the optimizer's state: :class:`torch.optim.Optimizer`'s (the parameter
        groups and the non-Bayesian parameters' moments) and, under ``"posterior"``, per
        group, Adam's flat moments of the means and log-variances, the current sample, its
        key and the count of steps (the posterior itself is the model's state dict)."""

        self._follow_sharding()  # the state of this rank's rows, once the samples are cut
        state = super().state_dict()
        state["posterior"] = {
            "exp_avgs": [m.clone() for m in self._exp_avgs],
            "exp_avg_sqs": [m.clone() for m in self._exp_avg_sqs],
            "theta": [t.clone() for t in self._thetas],
            "rng_state": [r.clone() for r in self._rng_states],
            "step": self._step_counts(),
        }
        return state

    def _step_counts(self) -> list[int]:
        r"""The count of steps of every group: the devices' when capturable (a replayed graph
        counts there only)."""

        if self._step_tensors is None:
            return list(self._steps)
        return [int(t) for t in self._step_tensors]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        r"""Loads a state from :meth:`state_dict`, after checking all of it: a state dict of
        another model or optimizer, or a truncated one, raises and changes nothing."""

        self._follow_sharding()
        problems = self._misfits(state_dict)
        if problems:
            raise ValueError(
                "VariationalAdam.load_state_dict: the state dict does not fit this optimizer "
                "(another model's, or not a VariationalAdam's?), nothing was loaded:\n  "
                + "\n  ".join(problems)
            )
        state_dict = dict(state_dict)
        posterior = state_dict.pop("posterior")
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for mine, loaded in (
                (self._exp_avgs, posterior["exp_avgs"]),
                (self._exp_avg_sqs, posterior["exp_avg_sqs"]),
                # In place: the base model's leaves are views of the flat samples.
                (self._thetas, posterior["theta"]),
            ):
                for tensor, value in zip(mine, loaded):
                    tensor.copy_(value)
            for pieces, shards in zip(self._pieces, self._sharded_samples()):
                for j, shard in shards.items():
                    _write_shard(shard, pieces[j].detach())
            for i, rows in enumerate(self._shards):
                if rows is not None:
                    self._write_rows(i)
        for i, r in enumerate(posterior["rng_state"]):
            self._set_key(i, r.to(self._rng_states[i].device, copy=True))
        self._steps = [int(step) for step in posterior["step"]]
        for count, step in zip(self._step_tensors or (), self._steps):
            count.fill_(step)

    def _misfits(self, state_dict: Any) -> list[str]:
        r"""What in a state dict does not fit this optimizer, as readable lines."""

        if not isinstance(state_dict, Mapping):
            return [f"a {type(state_dict).__name__}, not a state dict"]
        missing = [k for k in ("state", "param_groups", "posterior") if k not in state_dict]
        if missing:
            return [f"no {k!r} entry" for k in missing]
        problems = []

        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            problems.append(
                f"param_groups: {len(groups)} groups, this optimizer has {len(self.param_groups)}"
            )
        for i, (loaded, mine) in enumerate(zip(groups, self.param_groups)):
            if len(loaded.get("params", ())) != len(mine["params"]):
                problems.append(
                    f"param_groups[{i}]: {len(loaded.get('params', ()))} parameters, this "
                    f"optimizer has {len(mine['params'])}"
                )
            if loaded.get("posterior") != mine["posterior"]:
                problems.append(f"param_groups[{i}]: not the same kind of group")
            for key in ("lr", "betas", "eps", "weight_decay", "kl_weight"):
                if key not in loaded:
                    problems.append(f"param_groups[{i}]: no {key!r}")

        posterior = state_dict["posterior"]
        expected = {
            "exp_avgs": self._exp_avgs,
            "exp_avg_sqs": self._exp_avg_sqs,
            "theta": self._thetas,
            "rng_state": self._rng_states,
            "step": self._steps,
        }
        for key, mine in expected.items():
            loaded = posterior.get(key) if isinstance(posterior, Mapping) else None
            if not isinstance(loaded, (list, tuple)) or len(loaded) != len(mine):
                problems.append(
                    f"posterior[{key!r}]: not a list of {len(mine)} entries, one per group"
                )
                continue
            for i, (value, reference) in enumerate(zip(loaded, mine)):
                where = f"posterior[{key!r}][{i}]"
                if key == "step":
                    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                        problems.append(f"{where}: {value!r}, not a count of steps")
                elif not isinstance(value, Tensor):
                    problems.append(f"{where}: a {type(value).__name__}, not a tensor")
                elif value.shape != reference.shape:
                    problems.append(
                        f"{where}: shape {tuple(value.shape)}, this optimizer's is "
                        f"{tuple(reference.shape)}"
                    )
                elif key == "rng_state" and value.dtype != torch.int64:
                    problems.append(f"{where}: {value.dtype}, not torch.int64")
                elif key != "rng_state" and not value.is_floating_point():
                    problems.append(f"{where}: {value.dtype}, not a floating-point dtype")

        params = [p for group in self.param_groups for p in group["params"]]
        for index, entry in dict(state_dict["state"]).items():
            if not isinstance(index, int) or not 0 <= index < len(params):
                problems.append(f"state[{index!r}]: not a parameter of this optimizer")
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                value = entry.get(key)
                if not isinstance(value, Tensor) or value.shape != params[index].shape:
                    problems.append(
                        f"state[{index}][{key!r}]: not a tensor of shape "
                        f"{tuple(params[index].shape)}"
                    )
        return problems
