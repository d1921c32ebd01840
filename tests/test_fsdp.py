r"""Sharded data-parallel training: fully_shard(bm) (FSDP2) over two gloo processes, against
one process with the whole batch and against DistributedDataParallel; VariationalAdam under
fully_shard(bm.base), its posterior in the samples' rows, over two and four."""

import os
import pytest
import ranks
import torch
import torch.distributed as dist
import torch.nn as nn

from pathlib import Path

import fastbnf

from conftest import cpu_backends

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")

if dist.is_available():
    import torch.distributed.checkpoint as dcp

    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

STEPS = 4
WORLD = ranks.WORLD
KL_WEIGHT = 1e-3
# fp32: the ranks' mean of two half-batch gradients is rounded unlike the whole batch's.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def shard(module: nn.Module, **kwargs) -> nn.Module:
    r"""fully_shard() over the CPU ranks: its default mesh is on CUDA wherever CUDA is."""

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return fully_shard(module, mesh=mesh, **kwargs)


def full() -> "StateDictOptions":
    return StateDictOptions(full_state_dict=True)


def make(fold_rank: bool = False, seed: int = 0, **options) -> fastbnf.BayesianModel:
    r"""The same model for every seed on every rank; uneven shapes (15 rows on 2 ranks) and a
    plain parameter (the last bias), so that both kinds of gradient are reduce-scattered."""

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 15), nn.Tanh(), nn.Linear(15, 3))
    return fastbnf.BayesianModel(
        net, init_logvar=-4.0, exclude_params=["2.bias"], fold_rank=fold_rank, **options
    )


def batches(rank: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    r"""Rank ``rank``'s half of every step's batch, or the whole batches for ``None``."""

    data = torch.Generator().manual_seed(100)
    out = []
    for _ in range(STEPS):
        x = torch.randn(2 * 8, 4, generator=data)
        y = x[:, :3].sin()
        if rank is not None:
            x, y = x[rank * 8 : (rank + 1) * 8], y[rank * 8 : (rank + 1) * 8]
        out.append((x, y))
    return out


def loss_fn(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (module(x) - y).square().mean()


def seed_style(bm, optimizer, x, y) -> None:
    kl = bm.kl_divergence()
    with bm.reparameterize() as model:
        loss = loss_fn(model, x, y) + KL_WEIGHT * kl
        loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def through_forward(bm, optimizer, x, y) -> None:
    r"""The step through the model's forward, ``bm(fn, x)``, as under DDP."""

    loss = bm(loss_fn, x, y) + KL_WEIGHT * bm.kl_divergence()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def train(bm, wrapped, rank, step_fn) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-2)
    for i, (x, y) in enumerate(batches(rank)):
        torch.manual_seed(10 + i)  # the same noise on every rank and in one process
        step_fn(bm, optimizer, x, y)
    return full_state(bm)


def full_state(bm) -> dict[str, torch.Tensor]:
    if any(isinstance(p, DTensor) for p in bm.parameters()):
        return get_model_state_dict(bm, options=full())  # a collective: every rank gets it
    return {k: v.detach().clone() for k, v in bm.state_dict().items()}


def assert_same(got: dict, expected: dict, **tolerance) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **(tolerance or TOLERANCE), msg=key)


def gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    tensors = [torch.empty_like(tensor) for _ in range(WORLD)]
    dist.all_gather(tensors, tensor.contiguous())
    return tensors


def use_backend(backend: str) -> None:
    os.environ["FASTBNF_BACKEND"] = backend


# Training.


def ranks_train(rank: int, init_file: str, backend: str) -> None:
    use_backend(backend)
    ranks.init(rank, init_file)

    # One process with the whole batch: the reference.
    alone = make()
    expected = train(alone, alone, None, seed_style)
    assert not torch.equal(expected["means.0-weight"], make().means["0-weight"])  # it trained

    # Seed-style: kl_divergence() and reparameterize() outside any forward.
    bm = make()
    shard(bm)
    assert isinstance(bm.means["0-weight"], DTensor)
    assert_same(train(bm, bm, rank, seed_style), expected)

    # Through the model's forward.
    bm = make()
    shard(bm)
    assert_same(train(bm, bm, rank, through_forward), expected)

    # A layer of the base model sharded on its own, its selected weight left out (the
    # BayesianModel reads it), the BayesianModel as the root.
    bm = make()
    shard(bm.base[2], ignored_params={bm.base[2].weight})
    shard(bm)
    assert_same(train(bm, bm, rank, seed_style), expected)

    # The frozen base weights left out: replicated, never gathered.
    bm = make()
    frozen = {p for p in bm.base.parameters() if not p.requires_grad}
    shard(bm, ignored_params=frozen)
    assert not isinstance(bm.base[0].weight, DTensor)
    assert_same(train(bm, bm, rank, seed_style), expected)

    # DistributedDataParallel, the same steps.
    bm = make()
    ddp = nn.parallel.DistributedDataParallel(bm)

    def ddp_step(bm, optimizer, x, y):
        loss = ddp(loss_fn, x, y) + KL_WEIGHT * bm.kl_divergence()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    assert_same(train(bm, ddp, rank, ddp_step), expected)

    dist.barrier()


@pytest.mark.parametrize("backend", cpu_backends())
def test_fsdp_trains_as_one_process_and_ddp(tmp_path: Path, backend: str):
    ranks.run(
        ranks_train,
        str(tmp_path / "init"),
        backend,
        preload=("torch", "torch._dynamo", "fastbnf", "torch.distributed.fsdp"),
    )


# The model's methods on a sharded model.


def assert_sharded(bm) -> None:
    r"""A method without gradients leaves the model sharded, as it found it."""

    assert isinstance(bm.means["0-weight"], DTensor)
    assert isinstance(bm.base[2].bias, DTensor)


def ranks_methods(rank: int, init_file: str, checkpoint: str, backend: str) -> None:
    use_backend(backend)
    ranks.init(rank, init_file)

    alone, bm = make(), make()
    shard(bm)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))

    # kl_divergence() without gradients, with priors.
    with torch.no_grad():
        for prior in ({}, {"prior_var": 0.5, "prior_mean": "init"}):
            torch.testing.assert_close(bm.kl_divergence(**prior), alone.kl_divergence(**prior))
    assert_sharded(bm)

    # predict() and sample_params(n=...): the same draws as one process.
    results = {}
    for model in (bm, alone):
        torch.manual_seed(5)
        with torch.no_grad():
            results[model] = (model.predict(x, samples=4), model.sample_params(n=3))
    torch.testing.assert_close(results[bm][0], results[alone][0])
    assert_same(results[bm][1], results[alone][1], rtol=0, atol=0)
    assert_sharded(bm)

    # kl_divergence() and reparameterize(return_kl=True) with gradients: the loss, both KLs
    # and the gradients (the ranks' mean of equal gradients) as in one process.
    for model in (bm, alone):
        torch.manual_seed(6)
        kl = model.kl_divergence()
        with model.reparameterize(return_kl=True, prior_var=2.0) as (net, kl2):
            loss = net(x).square().mean() + KL_WEIGHT * (kl + kl2)
        loss.backward()
        results[model] = (loss, kl, kl2)
    torch.testing.assert_close(results[bm], results[alone])
    for name in ("means", "logvars"):
        for key, expected in getattr(alone, name).items():
            got = getattr(bm, name)[key].grad.full_tensor()
            torch.testing.assert_close(got, expected.grad, **TOLERANCE)
    assert_sharded(bm)  # resharded after the backward

    # Without gradients the context leaves the model sharded too.
    with torch.no_grad(), bm.reparameterize() as net:
        net(x)
    assert_sharded(bm)

    # fold_rank: the ranks draw different noise; without it, the same.
    for fold_rank, same in ((True, False), (False, True)):
        bm.fold_rank = fold_rank
        torch.manual_seed(7)
        with torch.no_grad():
            drawn = gather(torch.cat([t.reshape(-1) for t in bm.sample_params().values()]))
        assert torch.equal(drawn[0], drawn[1]) == same

    # The full state dict: zuko's keys, the values of one process; it loads into another
    # sharded model, which then computes the same.
    state = get_model_state_dict(bm, options=full())
    assert_same(state, alone.state_dict(), rtol=0, atol=0)
    other = make(seed=1)
    shard(other)
    set_model_state_dict(other, dict(state), options=full())  # it puts shards in the dict
    assert_same(get_model_state_dict(other, options=full()), state, rtol=0, atol=0)
    torch.testing.assert_close(other.kl_divergence(), alone.kl_divergence())

    # torch.distributed.checkpoint: each rank saves and loads its shards.
    dcp.save(get_model_state_dict(bm), checkpoint_id=checkpoint)
    other = make(seed=2)
    shard(other)
    shards = get_model_state_dict(other)
    dcp.load(shards, checkpoint_id=checkpoint)
    set_model_state_dict(other, shards)
    assert_same(get_model_state_dict(other, options=full()), state, rtol=0, atol=0)
    torch.manual_seed(8)
    with torch.no_grad():
        drawn = other.sample_params()
    torch.manual_seed(8)
    with torch.no_grad():
        assert_same(drawn, alone.sample_params(), rtol=0, atol=0)

    # What cannot work under FSDP says so.
    with pytest.raises(RuntimeError, match="Create the optimizer first"):
        fastbnf.optim.VariationalAdam(bm, lr=1e-3)
    with pytest.raises(NotImplementedError, match="local_trick"):
        with bm.reparameterize(local_trick=True):
            pass
    with pytest.raises(NotImplementedError, match="sample_params"):
        bm.sample_model()

    dist.barrier()


@pytest.mark.parametrize("backend", cpu_backends())
def test_fsdp_methods_behave_as_one_process(tmp_path: Path, backend: str):
    ranks.run(
        ranks_methods,
        str(tmp_path / "init"),
        str(tmp_path / "checkpoint"),
        backend,
        preload=("torch", "fastbnf", "torch.distributed.fsdp"),
    )


def ranks_refuse(rank: int, init_file: str) -> None:
    ranks.init(rank, init_file)

    # A sharded selected weight would be gathered over its sample by its module's forward.
    bm = make()
    shard(bm.base[0])
    shard(bm)
    with pytest.raises(RuntimeError, match="'0.weight' is sharded"):
        with bm.reparameterize():
            pass
    x, y = batches(rank)[0]
    with pytest.raises(RuntimeError, match="'0.weight' is sharded"):
        bm(loss_fn, x, y)

    # A BayesianModel inside a sharded model, not sharded itself: its posterior is shards
    # outside the outer forward.
    bm = make()
    shard(nn.Sequential(bm))
    with pytest.raises(RuntimeError, match="fully_shard\\(bm\\)"):
        bm.kl_divergence()

    dist.barrier()


def test_fsdp_refuses_what_it_cannot_compute(tmp_path: Path):
    ranks.run(ranks_refuse, str(tmp_path / "init"), preload=("torch", "fastbnf"))


# The fused variational optimizer: it keeps the posterior, its moments and the samples whole on
# every rank; fully_shard() of the base model, applied after it, shards the samples.


def whole(tensor: torch.Tensor) -> torch.Tensor:
    r"""A tensor, gathered if it is a DTensor (a collective)."""

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def posterior(bm) -> dict[str, torch.Tensor]:
    r"""The posterior and the plain parameter, whole."""

    state = {f"means.{k}": whole(v) for k, v in bm.means.items()}
    state.update({f"logvars.{k}": whole(v) for k, v in bm.logvars.items()})
    return {**state, "base.2.bias": whole(bm.base[2].bias)}


def variational(
    bm, rank, sharding=None, steps=slice(None), **options
) -> fastbnf.optim.VariationalAdam:
    torch.manual_seed(20)  # the same first sample on every rank and in one process
    optimizer = fastbnf.optim.VariationalAdam(bm, lr=1e-2, kl_weight=KL_WEIGHT, **options)
    if sharding is not None:
        sharding(bm)
    variational_steps(bm, optimizer, rank, steps)
    return optimizer


def variational_steps(bm, optimizer, rank, steps=slice(None)) -> None:
    for x, y in batches(rank)[steps]:
        loss_fn(bm.base, x, y).backward()
        optimizer.step()
        optimizer.zero_grad()


def resumed_halfway(rank: int | None) -> fastbnf.BayesianModel:
    r"""A sharded model trained two steps, then another resumed from its checkpoint and trained
    to the end: the model's whole state, loaded before the optimizer is created and the model
    sharded (after, the posterior is in the shards' rows and BayesianModel.load_state_dict
    refuses), then the optimizer's state of each rank."""

    bm = make()
    optimizer = variational(bm, rank, shard_base, steps=slice(0, 2))
    generator_state = torch.get_rng_state()  # the next keys come from it
    other = make(seed=1)
    other.load_state_dict(full_state(bm))
    resumed = variational(other, rank, shard_base, steps=slice(0, 0))
    resumed.load_state_dict(optimizer.state_dict())
    torch.set_rng_state(generator_state)
    variational_steps(other, resumed, rank, steps=slice(2, None))
    return other


def shard_layers(bm) -> None:
    shard(bm.base[0])
    shard(bm.base[2])
    shard(bm.base)


def shard_base(bm) -> None:
    shard(bm.base)


def shard_but_a_sample(bm) -> None:
    r"""A sample left whole (ignored_params): its gradient is this rank's, averaged by the
    optimizer, where FSDP has averaged the others."""

    whole = {bm.base[0].weight}
    shard(bm.base[0], ignored_params=whole)
    shard(bm.base, ignored_params=whole)


def ranks_variational(rank: int, init_file: str, backend: str) -> None:
    use_backend(backend)
    ranks.init(rank, init_file)

    alone = make()
    variational(alone, None)
    expected = posterior(alone)
    assert not torch.equal(expected["means.0-weight"], make().means["0-weight"])  # it trained

    # The layers sharded, then the base as the root; the base alone.
    for sharding in (shard_layers, shard_base):
        bm = make()
        optimizer = variational(bm, rank, sharding)
        assert isinstance(bm.base[0].weight, DTensor)
        assert isinstance(bm.base[2].bias, DTensor)
        assert bm.base[0].weight.grad is None  # zero_grad() freed FSDP's gradients
        assert_same(posterior(bm), expected)
        # The optimizer's samples are the base model's shards, where it writes them.
        assert bm.base[0].weight is optimizer.samples[0][0]

    bm = make()
    optimizer = variational(bm, rank, shard_but_a_sample)
    assert bm.base[0].weight is optimizer.samples[0][0]
    assert isinstance(bm.base[2].weight, DTensor)
    assert_same(posterior(bm), expected)

    # The optimizer's state dict resumes the trajectory in another sharded model.
    assert_same(posterior(resumed_halfway(rank)), expected)

    dist.barrier()


@pytest.mark.parametrize("backend", cpu_backends())
def test_fsdp_variational_adam_trains_as_one_process(tmp_path: Path, backend: str):
    ranks.run(
        ranks_variational,
        str(tmp_path / "init"),
        backend,
        preload=("torch", "fastbnf", "torch.distributed.fsdp"),
    )


def ranks_sharded_posterior(rank: int, init_file: str, backend: str, world: int) -> None:
    use_backend(backend)
    ranks.init(rank, init_file, world)

    # Every rank takes the whole batch: FSDP's average of equal gradients is exact, so that
    # the ranks' steps on their rows are one process's, bit for bit.
    alone = make()
    variational(alone, None)
    expected = posterior(alone)

    for sharding in (shard_layers, shard_base):
        bm = make()
        optimizer = variational(bm, None, sharding)
        # The posterior, its moments and the flat sample and gradient hold this rank's rows.
        samples = optimizer.samples[0]
        assert all(isinstance(s, DTensor) for s in samples)
        rows = sum(s.to_local().numel() for s in samples)
        assert optimizer._thetas[0].numel() == optimizer._grads[0].numel() == rows
        assert optimizer._exp_avgs[0].numel() == optimizer._exp_avg_sqs[0].numel() == 2 * rows
        for key, sample in zip(optimizer._shards[0].keys, samples):
            for p in (bm.means[key], bm.logvars[key]):
                assert isinstance(p, DTensor) and p.to_local().shape == sample.to_local().shape
        # The trainer's parameters are the tensors that receive the gradients: the shards.
        assert list(map(id, optimizer.param_groups[0]["params"])) == list(map(id, samples))
        assert bm.base[0].weight is samples[0]
        # The plain parameter steps on its shard, its moments cut the same way.
        (bias,) = optimizer.param_groups[1]["params"]
        assert bias is bm.base[2].bias and isinstance(bias, DTensor)
        assert isinstance(optimizer.state[bias]["exp_avg"], DTensor)
        assert_same(posterior(bm), expected, rtol=0, atol=0)
        # The frozen weights that the slots keep for the state dict are cut as the samples.
        frozen = bm._slots.held.originals[bm.base[0], "weight"]
        assert isinstance(frozen, DTensor)
        state = full_state(bm)
        assert torch.equal(state["base.0.weight"], make().base[0].weight)

    # A prior centred on the frozen weights (cut into the rows' prior means), and a model whose
    # base weights are its means (no frozen weights kept).
    for model_options, options in (
        ({}, {"prior_mean": "init"}),
        ({"keep_base_weights": False}, {}),
    ):
        alone = make(**model_options)
        variational(alone, None, **options)
        bm = make(**model_options)
        variational(bm, None, shard_layers, **options)
        assert_same(posterior(bm), posterior(alone), rtol=0, atol=0)

    # A checkpoint: the model's whole state before the optimizer, the optimizer's of each rank.
    other = resumed_halfway(None)
    assert_same(posterior(other), expected, rtol=0, atol=0)

    # What reads the whole posterior refuses, by name, and changes nothing.
    with pytest.raises(RuntimeError, match=r"means\['0-weight'\] is a shard.*VariationalAdam"):
        other.kl_divergence()
    with pytest.raises(RuntimeError, match=r"load_state_dict: fully_shard\(\) manages"):
        other.load_state_dict(make(seed=2).state_dict())  # another posterior: it would show
    assert_same(posterior(other), expected, rtol=0, atol=0)

    dist.barrier()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", cpu_backends())
def test_fsdp_variational_adam_shards_the_posterior(tmp_path: Path, backend: str, world: int):
    ranks.run(
        ranks_sharded_posterior,
        str(tmp_path / "init"),
        backend,
        world,
        preload=("torch", "fastbnf", "torch.distributed.fsdp"),
        world=world,
    )


def ranks_variational_refuse(rank: int, init_file: str) -> None:
    ranks.init(rank, init_file)
    Adam = fastbnf.optim.VariationalAdam

    # Sharded before the optimizer: the slots hold FSDP's shards of the frozen weights.
    for sharding in (shard_base, shard):
        bm = make()
        sharding(bm)
        with pytest.raises(RuntimeError, match="0.weight' is sharded.*Create the optimizer first"):
            Adam(bm)
        assert bm._slots.held is None

    # The BayesianModel sharded after the optimizer: its posterior is shards.
    bm = make()
    optimizer = Adam(bm)
    shard(bm)
    with pytest.raises(RuntimeError, match="means\\['0-weight'\\] is sharded"):
        optimizer.step()
    assert optimizer._steps == [0]

    # One sample per rank: FSDP's average of the samples' gradients would mix the ranks' noise.
    bm = make(fold_rank=True)
    optimizer = Adam(bm)
    shard_base(bm)
    before = posterior(bm)
    loss_fn(bm.base, *batches(rank)[0]).backward()
    with pytest.raises(RuntimeError, match="fold_rank=False"):
        optimizer.step()
    assert optimizer._steps == [0]
    assert_same(posterior(bm), before, rtol=0, atol=0)

    # The frozen weights cannot go back into slots that FSDP manages.
    with pytest.raises(RuntimeError, match="cannot release"):
        optimizer.release()
    assert bm._slots.held is not None

    dist.barrier()


def test_fsdp_variational_adam_refuses_what_it_cannot_compute(tmp_path: Path):
    ranks.run(
        ranks_variational_refuse,
        str(tmp_path / "init"),
        preload=("torch", "fastbnf", "torch.distributed.fsdp"),
    )


def ranks_example(rank: int, init_file: str) -> None:
    from examples.fsdp_train import mlp, train

    ranks.init(rank, init_file)
    torch.manual_seed(0)
    initial = fastbnf.BayesianModel(mlp(8), init_logvar=-9.0).state_dict()
    for optim in (False, True):  # the tutorial loop, VariationalAdam
        state = train(steps=20, width=8, log_every=10, optim=optim)
        assert state.keys() == initial.keys()
        assert all(v.isfinite().all() for v in state.values())
        assert not torch.equal(state["means.0-weight"], initial["means.0-weight"])  # it trained
        # The frozen weights come back whole and unchanged.
        assert torch.equal(state["base.0.weight"], initial["base.0.weight"])
    dist.barrier()


def test_example_trains(tmp_path: Path):
    ranks.run(ranks_example, str(tmp_path / "init"), preload=("torch", "fastbnf"))
