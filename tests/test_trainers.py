r"""VariationalAdam driven the way trainers drive an optimizer: GradScaler, gradient clipping,
zero_grad, LR schedulers, Hugging Face's Trainer and a Lightning module.

A trainer reaches the gradients through the optimizer's ``param_groups``: they hold the samples
in the base model, which receive the gradients (the posterior is the optimizer's state).
"""

import importlib
import os
import pytest
import torch
import torch.nn as nn

import fastbnf

from fastbnf.optim import VariationalAdam


def trainer_package(name: str):
    r"""Imports a trainer's package; in CI (``FASTBNF_REQUIRE_KERNEL`` set) a missing one is a
    failure, not a skip: the test extras install them."""

    if os.environ.get("FASTBNF_REQUIRE_KERNEL"):
        return importlib.import_module(name)
    return pytest.importorskip(name)


def make_model(seed=0):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
    return fastbnf.BayesianModel(base, init_logvar=-6.0)


def data(n=64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    return x, x.sum(-1, keepdim=True) / 2


def grads_of(optimizer):
    return [p.grad for group in optimizer.param_groups for p in group["params"]]


def test_param_groups_hold_the_tensors_that_receive_the_gradients(backend):
    bm = make_model()
    optimizer = VariationalAdam(bm, lr=1e-2)
    x, y = data()
    (bm.base(x) - y).square().mean().backward()

    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in params} == {id(p) for p in bm.base.parameters() if p.requires_grad}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    # The posterior is the optimizer's state, not a parameter it hands out.
    posterior = {id(p) for p in (*bm.means.values(), *bm.logvars.values())}
    assert not posterior & {id(p) for p in params}


def train(bm, optimizer, steps, clip=None, scaler=None, scheduler=None, x=None, y=None):
    if x is None:
        x, y = data()
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=scaler is not None):
            loss = (bm.base(x).float() - y).square().mean()
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        if clip is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_clipping_sees_and_clips_the_gradients(backend):
    bm = make_model()
    optimizer = VariationalAdam(bm, lr=1e-2)
    x, y = data()
    (bm.base(x) - y).square().mean().mul(1e3).backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    assert norm > 1.0
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    torch.testing.assert_close(clipped, torch.tensor(1.0), rtol=1e-5, atol=1e-6)


def test_a_clipped_step_is_the_step_of_the_clipped_gradients(backend):
    r"""Clipping scales the gradients the step reads: the step equals one of the same
    gradients scaled by hand."""

    x, y = data()
    results = []
    for clip in (True, False):
        bm = make_model()
        optimizer = VariationalAdam(bm, lr=1e-2)
        (bm.base(x) - y).square().mean().mul(1e3).backward()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 0.5)
        else:
            with torch.no_grad():
                for p in params:
                    p.grad.mul_(0.5 / (norm + 1e-6))
        optimizer.step()
        results.append([t.detach().clone() for t in (*bm.means.values(), *bm.logvars.values())])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_grad_scaler_unscales_checks_and_skips(backend):
    bm = make_model()
    optimizer = VariationalAdam(bm, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = data()

    loss = (bm.base(x) - y).square().mean()
    scaler.scale(loss).backward()
    scaled = [g.clone() for g in grads_of(optimizer)]
    scaler.unscale_(optimizer)
    for g, s in zip(grads_of(optimizer), scaled):
        torch.testing.assert_close(g, s / 2.0**10)
    before = [t.detach().clone() for t in bm.means.values()]
    scaler.step(optimizer)  # finite gradients: a step
    scaler.update()
    assert any(not torch.equal(a, b) for a, b in zip(before, bm.means.values()))

    # An overflow: the step is skipped (the posterior and the sample stay), the scale halves.
    optimizer.zero_grad()
    loss = (bm.base(x) - y).square().mean()
    scaler.scale(loss * float("inf")).backward()
    before = [t.detach().clone() for t in (*bm.means.values(), *bm.logvars.values())]
    sample = [p.detach().clone() for p in bm.base.parameters()]
    scaler.step(optimizer)
    scaler.update()
    after = [t.detach() for t in (*bm.means.values(), *bm.logvars.values())]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.equal(a, b.detach()) for a, b in zip(sample, bm.base.parameters()))
    assert scaler.get_scale() == 2.0**9


def test_zero_grad_with_and_without_set_to_none(backend):
    for set_to_none in (True, False):
        bm = make_model()
        optimizer = VariationalAdam(bm, lr=1e-2)
        x, y = data()
        (bm.base(x) - y).square().mean().backward()
        optimizer.zero_grad(set_to_none=set_to_none)
        for g in grads_of(optimizer):
            assert g is None or not g.any()
        # The next backward and step work as from fresh gradients.
        (bm.base(x) - y).square().mean().backward()
        assert all(g is not None and g.any() for g in grads_of(optimizer))
        optimizer.step()


def test_lr_schedulers_drive_the_step(backend):
    r"""A scheduler's learning rate is the step's: with lr 0 from the start nothing moves."""

    bm = make_model()
    optimizer = VariationalAdam(bm, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0)
    before = [t.detach().clone() for t in (*bm.means.values(), *bm.logvars.values())]
    train(bm, optimizer, 3, scheduler=scheduler)
    after = [t.detach() for t in (*bm.means.values(), *bm.logvars.values())]
    assert all(torch.equal(a, b) for a, b in zip(before, after))

    bm = make_model()
    optimizer = VariationalAdam(bm, lr=5e-2, num_data=64)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
    losses = train(bm, optimizer, 20, scheduler=scheduler)
    assert losses[-1] < 0.5 * losses[0]
    assert optimizer.param_groups[0]["lr"] < 1e-3


def test_training_with_clipping_scaler_and_scheduler_learns(backend):
    bm = make_model()
    optimizer = VariationalAdam(bm, lr=2e-2, num_data=64)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10, gamma=0.5)
    losses = train(bm, optimizer, 30, clip=1.0, scaler=scaler, scheduler=scheduler)
    assert losses[-1] < 0.5 * losses[0]


class Regression(nn.Module):
    r"""The Bayesian model as Hugging Face's Trainer calls a model: keyword inputs, a loss."""

    def __init__(self, bm):
        super().__init__()
        self.bm = bm

    def forward(self, x, labels):
        return {"loss": (self.bm.base(x).float() - labels).square().mean()}


@pytest.mark.parametrize(
    "precision",
    [
        "bf16",
        pytest.param(
            "fp16",
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 AMP needs CUDA"),
            ],
        ),
    ],
)
def test_hugging_face_trainer_with_clipping_amp_and_a_scheduler(tmp_path, precision):
    r"""Hugging Face's Trainer with our optimizer and scheduler: ``max_grad_norm`` clips the
    samples' gradients, bf16 autocast (CPU) or fp16 with its GradScaler (CUDA)."""

    transformers = trainer_package("transformers")
    datasets = [{"x": x, "labels": y} for x, y in zip(*data(128))]

    bm = make_model()
    if precision == "fp16":
        bm = bm.cuda()
    optimizer = VariationalAdam(bm, lr=2e-2, num_data=len(datasets))
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=40)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=40,
        per_device_train_batch_size=32,
        max_grad_norm=0.5,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=precision == "bf16",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(
        model=Regression(bm),
        args=args,
        train_dataset=datasets,
        optimizers=(optimizer, scheduler),
    )
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 40
    # The trainer sees the gradients (their norm before clipping), and its schedule is the
    # step's learning rate.
    assert all(entry["grad_norm"] > 0 for entry in logs)
    assert logs[-1]["learning_rate"] < 0.2 * logs[0]["learning_rate"]
    assert sum(e["loss"] for e in logs[-5:]) < 0.5 * sum(e["loss"] for e in logs[:5])


def test_lightning_module_with_gradient_clipping():
    lightning = trainer_package("lightning")
    x, y = data(128)
    norms = []

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.bm = make_model()

        def training_step(self, batch, index):
            x, y = batch
            return (self.bm.base(x) - y).square().mean() * 100  # gradients to clip

        def configure_optimizers(self):
            return VariationalAdam(self.bm, lr=1e-2, num_data=len(x))

        def configure_gradient_clipping(
            self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
        ):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
            norms.append((before.item(), after.item()))

    module = Module()
    loader = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=32)
    trainer = lightning.Trainer(
        max_steps=20,
        gradient_clip_val=1.0,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    first = (module.bm.base(x) - y).square().mean().item()
    trainer.fit(module, loader)
    last = (module.bm.base(x) - y).square().mean().item()

    assert len(norms) == 20
    assert all(before > 1.0 and after == pytest.approx(1.0, rel=1e-4) for before, after in norms)
    assert last < 0.5 * first
