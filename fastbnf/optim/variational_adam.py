r"""The variational Adam optimizer: Bayesian training with a plain model's loop."""

from __future__ import annotations

import math
import torch
import torch.distributed as dist
import torch.nn as nn

from collections.abc import Callable
from numbers import Real
from torch import Tensor
from typing import Any

from .. import ops
from .._sharding import is_dtensor
from ..model import BayesianModel
from ..model.posterior import posterior_of
from ..model.slots import slots_of
from .._compat import local_part
from .adamw import adam_update
from .step import variational_adam_step


def _check(value: Any, name: str, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not low <= value < high:
        raise ValueError(
            f"VariationalAdam: {name} must be a number in [{low}, {high}), got {value!r}."
        )
    return float(value)


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

    Data parallelism: in an initialized process group of several ranks, :meth:`step` averages
    over the ranks before the identical update on every rank (one ``all_reduce`` per group,
    one for the non-Bayesian parameters). When the model's ``fold_rank`` is false, every rank
    holds the same sample and the samples' gradients are averaged; when it is true, each rank
    has its own noise and forms its own reparameterization gradient, and those are averaged.
    Do not wrap the base model in :class:`~torch.nn.parallel.DistributedDataParallel`: its
    averaging of the samples' gradients would mix the ranks' noise.

    Sharding (FSDP2): create the optimizer first, then apply ``fully_shard()`` to the base model
    or its modules (``fully_shard(bm.base)``, not ``fully_shard(bm)``). FSDP then shards the
    samples and their gradients, not the optimizer's state: the posterior, Adam's moments and
    the flat sample stay whole on every rank. :meth:`step` gathers the gradients that FSDP has
    averaged (one all-gather per sharded tensor), takes the same step on every rank and writes
    each rank's shards of the next sample; a non-Bayesian parameter is gathered, updated whole
    and written back the same way. FSDP's average of the samples' gradients is right only if
    every rank holds the same sample: the model's ``fold_rank`` must be false.

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
        kl_weight: The weight :math:`\lambda` of the KL divergence in the loss.
        prior_var: The prior variance, or a dict of them keyed like ``means``.
        prior_mean: The prior mean, 0 or ``"init"`` for the base model's weights.
    """

    def __init__(
        self,
        model: BayesianModel,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        kl_weight: float = 1.0,
        prior_var: Any = 1.0,
        prior_mean: Any = 0.0,
    ) -> None:
        if not isinstance(model, BayesianModel):
            raise TypeError(
                f"VariationalAdam: model must be a fastbnf.BayesianModel, got {type(model)}."
            )
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"VariationalAdam: betas must be a pair of numbers, got {betas!r}.")
        defaults = dict(
            lr=_check(lr, "lr"),
            betas=(_check(betas[0], "betas[0]", high=1.0), _check(betas[1], "betas[1]", high=1.0)),
            eps=_check(eps, "eps"),
            weight_decay=_check(weight_decay, "weight_decay"),
            kl_weight=_check(kl_weight, "kl_weight"),
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
        params = [p for g in groups for p in (*g.means, *g.logvars)]
        # The base model's own trained parameters (its slots may hold the means themselves,
        # keep_base_weights=False: those are the posterior's).
        ids = {id(p) for p in params}
        others = [p for p in model.base.parameters() if p.requires_grad and id(p) not in ids]
        param_groups = [{"params": params, "posterior": True}]
        if others:
            param_groups.append({"params": others, "posterior": False})
        super().__init__(param_groups, defaults)

        self.model = model
        self._posterior = posterior
        self._slots = slots
        # Where each non-Bayesian parameter sits in the base model, so that the step finds the
        # shard that a later fully_shard() puts there instead.
        self._other_places: dict[int, tuple[nn.Module, str]] = {}
        for module in model.base.modules():
            for attribute, p in module._parameters.items():
                if p is not None and p.requires_grad and id(p) not in ids:
                    self._other_places.setdefault(id(p), (module, attribute))
        self._priors = [posterior.prior(g, prior_var, prior_mean) for g in groups]
        # Per group: the flat sample (the base model's leaves are views of it), the key it was
        # drawn from and the count of steps taken. Kept beside the optimizer's state, whose
        # loading would cast the int64 key to the parameters' dtype.
        self._thetas: list[Tensor] = []
        self._rng_states: list[Tensor] = []
        self._steps = [0] * len(groups)
        pieces: list[list[Tensor]] = []
        with torch.no_grad():
            for group, prior in zip(groups, self._priors):
                theta, _, rng_state = ops.sample(
                    group.means,
                    group.logvars,
                    None,
                    posterior.sample_dtype,
                    False,
                    prior,
                    posterior.salt(),
                )
                self._thetas.append(theta)
                self._rng_states.append(rng_state)
                pieces.append([nn.Parameter(v) for v in ops.unflatten(theta, group.means)])
        self._pieces = pieces
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
        # The samples' gradients accumulate in place in one flat buffer per group (autograd
        # adds into an existing .grad), which the step reads as it is.
        self._grads = [torch.zeros_like(theta) for theta in self._thetas]
        self._grad_views = [
            ops.unflatten(grad, group.means) for grad, group in zip(self._grads, groups)
        ]
        self._attach_grads()
        # Adam's moments of a group in two flat buffers (the means', then the log-variances'),
        # which the fused step reads and writes as they are; the state of each parameter holds
        # its views.
        self._exp_avgs = [
            g.means[0].new_zeros(2 * t.numel()) for g, t in zip(groups, self._thetas)
        ]
        self._exp_avg_sqs = [torch.zeros_like(m) for m in self._exp_avgs]
        self._bind_moments()
        slots.hold(groups, pieces)

    def _bind_moments(self) -> None:
        r"""Makes each posterior parameter's ``exp_avg`` and ``exp_avg_sq`` its views of the
        group's flat moments."""

        for group, exp_avgs, exp_avg_sqs in zip(
            self._posterior.groups(), self._exp_avgs, self._exp_avg_sqs
        ):
            tensors = [*group.means, *group.logvars]
            views = zip(ops.unflatten(exp_avgs, tensors), ops.unflatten(exp_avg_sqs, tensors))
            for p, (exp_avg, exp_avg_sq) in zip(tensors, views):
                self.state[p]["exp_avg"] = exp_avg
                self.state[p]["exp_avg_sq"] = exp_avg_sq

    def _attach_grads(self) -> None:
        r"""Makes every sample's .grad its view of the group's flat gradient buffer."""

        for pieces, views in zip(self._pieces, self._grad_views):
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
        for key, mean in self._posterior.means.items():
            if is_dtensor(mean):
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
        for places, names, pieces in zip(self._places, self._names, self._pieces):
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

        if any(self._sharded_samples()):
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
        samples = self._sharded_samples()
        others = self._sharded_others()
        if any(samples) and self.model.fold_rank and _data_parallel():
            raise RuntimeError(
                "VariationalAdam: fully_shard() averages the samples' gradients over the "
                "ranks, which is right only when every rank holds the same sample; the model's "
                "fold_rank=True gives each rank its own. Create the BayesianModel with "
                "fold_rank=False."
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for param_group in self.param_groups:
            options = {k: param_group[k] for k in ("lr", "betas", "eps", "weight_decay")}
            if param_group["posterior"]:
                self._posterior_step(param_group["kl_weight"], samples, **options)
            else:
                self._plain_step(param_group["params"], others, **options)
        return loss

    def _posterior_step(self, kl_weight, samples, lr, betas, eps, weight_decay) -> None:
        groups = self._posterior.groups()
        salt = self._posterior.salt()
        for i, (group, prior, pieces) in enumerate(zip(groups, self._priors, self._pieces)):
            shards = samples[i]
            if all(p.grad is v for p, v in zip(pieces, self._grad_views[i])):
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
            self._steps[i] += 1
            self._rng_states[i] = variational_adam_step(
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
            )
            # The next sample's shards, where FSDP's forward gathers them from.
            for j, shard in shards.items():
                _write_shard(shard, pieces[j].detach())

    def _plain_step(self, params, shards, lr, betas, eps, weight_decay) -> None:
        # A parameter that fully_shard() holds sharded: the optimizer's whole one takes the
        # shards' values (a loaded model state dict may have changed them) and their averaged
        # gradient, is updated as a whole, and its shards are written back after.
        for p in params:
            shard = shards.get(id(p))
            if shard is not None:
                p.copy_(shard.full_tensor())
                p.grad = _full_grad(shard)
        with_grads = [p for p in params if p.grad is not None]
        local = [p for p in with_grads if id(p) not in shards]
        if local and _data_parallel():
            flat = torch.cat([p.grad.reshape(-1) for p in local])
            _average(flat)
            for p, g in zip(local, flat.split([p.numel() for p in local])):
                p.grad.copy_(g.view_as(p.grad))
        for p in with_grads:
            if "step" not in self.state[p]:
                self.state[p]["step"] = 0
                self.state[p]["exp_avg"] = torch.zeros_like(p)
                self.state[p]["exp_avg_sq"] = torch.zeros_like(p)
            self.state[p]["step"] += 1
        # One update per step count (a parameter may have missed steps without a gradient).
        by_step: dict[int, list[Tensor]] = {}
        for p in with_grads:
            by_step.setdefault(self.state[p]["step"], []).append(p)
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
        for p in params:
            if id(p) in shards:
                _write_shard(shards[id(p)], p.detach())

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["samples"] = {
            "theta": [t.clone() for t in self._thetas],
            "rng_state": [r.clone() for r in self._rng_states],
            "step": list(self._steps),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        samples = state_dict.pop("samples", None)
        if samples is None or len(samples["theta"]) != len(self._thetas):
            raise ValueError(
                "VariationalAdam.load_state_dict: the state dict holds no samples of this "
                "model's groups (not a VariationalAdam's, or another model's)."
            )
        super().load_state_dict(state_dict)
        with torch.no_grad():
            # The loaded state holds new tensors: into the flat moments, then views again.
            for group, exp_avgs, exp_avg_sqs in zip(
                self._posterior.groups(), self._exp_avgs, self._exp_avg_sqs
            ):
                tensors = [*group.means, *group.logvars]
                torch.cat([self.state[p]["exp_avg"].reshape(-1) for p in tensors], out=exp_avgs)
                torch.cat(
                    [self.state[p]["exp_avg_sq"].reshape(-1) for p in tensors], out=exp_avg_sqs
                )
            self._bind_moments()
            # Into the flat samples in place: the base model's leaves are views of them.
            for theta, loaded in zip(self._thetas, samples["theta"]):
                theta.copy_(loaded)
            for pieces, shards in zip(self._pieces, self._sharded_samples()):
                for j, shard in shards.items():
                    _write_shard(shard, pieces[j].detach())
        self._rng_states = [r.clone() for r in samples["rng_state"]]
        self._steps = list(samples["step"])
