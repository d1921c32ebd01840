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
from ..bayesian import BayesianModel
from .._compat import adam_update
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
        model._check_prior(prior_var, prior_mean)
        if model._held is not None or model._active:
            raise RuntimeError(
                "VariationalAdam: the model's base holds samples already (another optimizer, "
                "or an active reparameterize())."
            )

        groups = model._get_groups()
        posterior = [p for g in groups for p in (*g.means, *g.logvars)]
        # The base model's own trained parameters (its slots may hold the means themselves,
        # keep_base_weights=False: those are the posterior's).
        ids = {id(p) for p in posterior}
        others = [p for p in model.base.parameters() if p.requires_grad and id(p) not in ids]
        param_groups = [{"params": posterior, "posterior": True}]
        if others:
            param_groups.append({"params": others, "posterior": False})
        super().__init__(param_groups, defaults)

        self.model = model
        self._priors = [model._prior(g, prior_var, prior_mean) for g in groups]
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
                    model.sample_dtype,
                    False,
                    prior,
                    model._stream(),
                )
                self._thetas.append(theta)
                self._rng_states.append(rng_state)
                pieces.append([nn.Parameter(v) for v in ops.unflatten(theta, group.means)])
        self._pieces = pieces
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
        model._hold(pieces)

    def _bind_moments(self) -> None:
        r"""Makes each posterior parameter's ``exp_avg`` and ``exp_avg_sq`` its views of the
        group's flat moments."""

        for group, exp_avgs, exp_avg_sqs in zip(
            self.model._get_groups(), self._exp_avgs, self._exp_avg_sqs
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

    @property
    def samples(self) -> list[list[Tensor]]:
        r"""The current samples held in the base model, per group and tensor."""

        return self._pieces

    def release(self) -> None:
        r"""Puts the frozen weights back in the base model; the optimizer cannot step after."""

        self.model._release()
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

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        r"""Takes one step and draws the next sample into the base model.

        Arguments:
            closure: A function that evaluates the model and returns the loss, optional.
        """

        if not self._pieces:
            raise RuntimeError("VariationalAdam: released, it cannot step any more.")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for param_group in self.param_groups:
            options = {k: param_group[k] for k in ("lr", "betas", "eps", "weight_decay")}
            if param_group["posterior"]:
                self._posterior_step(param_group["kl_weight"], **options)
            else:
                self._plain_step(param_group["params"], **options)
        return loss

    def _posterior_step(self, kl_weight, lr, betas, eps, weight_decay) -> None:
        groups = self.model._get_groups()
        for i, (group, prior, pieces) in enumerate(zip(groups, self._priors, self._pieces)):
            if all(p.grad is v for p, v in zip(pieces, self._grad_views[i])):
                grad_theta = self._grads[i]
            else:  # gradients set or freed by hand (bm.zero_grad(), say): gathered once
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in pieces]
                grad_theta = torch.cat([g.reshape(-1) for g in grads])
            average = None
            if _data_parallel():
                if self.model.fold_rank:
                    average = _average  # of the gradients each rank forms with its own noise
                else:
                    # One sample on every rank: the gradients are linear in grad_theta.
                    _average(grad_theta)
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
                stream=self.model._stream(),
                average=average,
            )

    def _plain_step(self, params, lr, betas, eps, weight_decay) -> None:
        with_grads = [p for p in params if p.grad is not None]
        if with_grads and _data_parallel():
            flat = torch.cat([p.grad.reshape(-1) for p in with_grads])
            _average(flat)
            for p, g in zip(with_grads, flat.split([p.numel() for p in with_grads])):
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
                self.model._get_groups(), self._exp_avgs, self._exp_avg_sqs
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
        self._rng_states = [r.clone() for r in samples["rng_state"]]
        self._steps = list(samples["step"])
