"""The CUDA paths, on a GPU: compiled bf16 training against eager fp32, fused AdamW, NCCL with
SyncBatchNorm and DDP, SyncBatchNorm's all-gather between two ranks, zero host syncs per step, and
the probes against the CPU. Skipped without a GPU; `make gpu-check` runs them (with the `cuda`
cases of tests/data/test_augment.py and tests/test_ema.py: the GPU augmentation and the sync-free EMA).

The reference-model test builds its Trainer exactly as `launch.py` does for the reference on one
GPU (batch 512, bf16, compile), so the compiled graph it pays for is the one the throughput bench
and the time-boxed training of `make gpu-check` load from inductor's cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soda.config import to_settings
from soda.data import LabelledImages
from soda.eval import evaluate_probes, knn_predict
from soda.loop import Trainer
from soda.train import build_model, build_trainer
from tests.helpers import SMOKE, compose_config, free_port, run_ranks

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
# Compiled bf16 against eager fp32 on the same batch and weights. The two draw their timesteps,
# noise and dropout from different random streams (inductor generates its own random numbers), so
# their losses agree in distribution, not bit for bit: the mean of 4 draws each must agree within
# 2 %. On the untrained reference model the loss is about 1.03 and its spread across draws on one
# batch of 512 is well under 1 %; a wrong kernel or a broken precision setting moves it far more.
LOSS_TOLERANCE = 0.02
DRAWS = 4


def _images(count: int, size: int = 32, seed: int = 0) -> LabelledImages:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, size, size), generator=generator, dtype=torch.uint8)
    return LabelledImages(images, torch.arange(count) % 10, [str(c) for c in range(10)])


def _reference_trainer(tmp_path: Path) -> Trainer:
    settings = to_settings(compose_config(["device=cuda"]))  # the reference: R18 + DDPM, batch 512, bf16
    assert settings.schedule.batch_size == 512 and settings.schedule.precision == "bf16"
    torch.manual_seed(settings.seed)
    model = build_model(settings)
    data = _images(settings.schedule.batch_size)
    trainer = build_trainer(settings, model, data, tmp_path, CUDA)
    trainer.settings = settings  # what the test builds its eager copy from
    return trainer


def _grads_finite(model: torch.nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(grads) and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_compiled_bf16_reference_step_matches_eager_fp32(tmp_path):
    trainer = _reference_trainer(tmp_path)
    eager = build_model(trainer.settings).to(CUDA)
    eager.load_state_dict(trainer.model.state_dict())
    source_view, target_view = trainer.make_views(trainer.train_images)

    compiled_losses = []
    for _ in range(DRAWS):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = trainer.loss_fn(source_view.contiguous(), target_view.contiguous())
        loss.backward()
        assert _grads_finite(trainer.model)
        trainer.model.zero_grad(set_to_none=True)
        compiled_losses.append(loss.item())
    # Compilation must really have happened on CUDA, not fallen back to eager.
    assert trainer.loss_fn.compiled is not trainer.loss_fn.eager

    eager_losses = []
    for _ in range(DRAWS):
        loss = eager(source_view, target_view)
        loss.backward()
        assert _grads_finite(eager)
        eager.zero_grad(set_to_none=True)
        eager_losses.append(loss.item())
    compiled, reference = sum(compiled_losses) / DRAWS, sum(eager_losses) / DRAWS
    assert abs(compiled - reference) <= LOSS_TOLERANCE * reference, (compiled_losses, eager_losses)


def test_fused_adamw_matches_foreach():
    torch.manual_seed(0)
    fused_model = build_model(to_settings(compose_config(SMOKE))).to(CUDA)
    foreach_model = build_model(to_settings(compose_config(SMOKE))).to(CUDA)
    foreach_model.load_state_dict(fused_model.state_dict())
    options = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    fused = torch.optim.AdamW(fused_model.parameters(), fused=True, **options)
    foreach = torch.optim.AdamW(foreach_model.parameters(), foreach=True, **options)
    generator = torch.Generator(device=CUDA).manual_seed(1)
    for _ in range(10):
        for a, b in zip(fused_model.parameters(), foreach_model.parameters(), strict=True):
            a.grad = torch.randn(a.shape, device=CUDA, generator=generator)
            b.grad = a.grad.clone()
        fused.step()
        foreach.step()
    for a, b in zip(fused_model.parameters(), foreach_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_syncbatchnorm_and_ddp_in_a_one_rank_nccl_group():
    """The multi-GPU set-up of soda.train on one GPU: an NCCL group, SyncBatchNorm, DDP. A training
    step through it equals the plain model's (one rank: DDP averages over itself)."""
    import torch.distributed as dist

    torch.manual_seed(0)
    plain = build_model(to_settings(compose_config(SMOKE))).to(CUDA)
    synced = build_model(to_settings(compose_config(SMOKE)))
    synced.load_state_dict(plain.state_dict())
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert dist.get_backend() == "nccl"
        synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(synced).to(CUDA)
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
        ddp = torch.nn.parallel.DistributedDataParallel(synced, device_ids=[0])
        views = torch.rand(2, 16, 3, 16, 16, device=CUDA)
        losses = []
        for model in (plain, ddp):
            torch.manual_seed(5)  # the same timesteps, noise and dropout for both
            loss = model(views[0], views[1])
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
        for a, b in zip(plain.parameters(), synced.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_syncbatchnorm_gathers_statistics_across_two_ranks(tmp_path):
    """One rank does not exercise the all-gather (PyTorch skips it for a world of 1), and NCCL
    refuses two ranks on one GPU: two gloo ranks on cuda:0 do. Batch statistics over both halves
    must equal BatchNorm's over the whole batch."""
    run_ranks("tests.support.syncbn_worker", 2, str(free_port()), str(tmp_path))
    halves = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    torch.testing.assert_close(torch.cat([h["output"] for h in halves]), whole["output"], rtol=1e-4, atol=1e-5)
    for h in halves:
        torch.testing.assert_close(h["running_mean"], whole["running_mean"], rtol=1e-4, atol=1e-6)
    # Each rank holds its half's share of the parameter gradients (DDP sums them across ranks).
    torch.testing.assert_close(
        halves[0]["weight_grad"] + halves[1]["weight_grad"], whole["weight_grad"], rtol=1e-3, atol=1e-4
    )


def test_a_training_step_makes_no_host_syncs(tmp_path):
    """The loop's promise on a GPU: augmentation, loss, backward, clipping, AdamW, EMA queue up
    without waiting for the device (the loop reads the loss back every log_every steps only)."""
    settings = to_settings(compose_config([*SMOKE, "device=cuda", "schedule.precision=bf16", "schedule.compile=none"]))
    torch.manual_seed(0)
    data = _images(64, size=16)
    trainer = build_trainer(settings, build_model(settings), data, tmp_path, CUDA)
    batch = trainer.train_images[: settings.schedule.batch_size]
    trainer.train_step(batch)  # first-call allocations and cuDNN autotuning may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss = trainer.train_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


def test_probes_on_cuda_agree_with_the_cpu():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=generator)
    labels = torch.arange(3000) % 10
    features = torch.nn.functional.normalize(centres[labels] + 0.8 * torch.randn(3000, 32, generator=generator), dim=1)
    bank, bank_labels, query, query_labels = features[:2000], labels[:2000], features[2000:], labels[2000:]

    on_cpu = knn_predict(bank, bank_labels, query, k=20)
    on_gpu = knn_predict(bank.to(CUDA), bank_labels.to(CUDA), query.to(CUDA), k=20).cpu()
    assert (on_cpu == on_gpu).float().mean().item() >= 0.995  # ties may break differently

    def probes(device):
        def encode(x):
            return x.to(device)

        batches = [(bank[i : i + 500], bank_labels[i : i + 500]) for i in range(0, 2000, 500)]
        tests = [(query[i : i + 500], query_labels[i : i + 500]) for i in range(0, 1000, 500)]
        return evaluate_probes(encode, batches, tests, 10, device=device)

    cpu, gpu = probes(torch.device("cpu")), probes(CUDA)
    assert 0.5 < cpu["knn_acc"] and 0.5 < cpu["linear_acc"]
    assert abs(cpu["knn_acc"] - gpu["knn_acc"]) <= 0.005
    assert abs(cpu["linear_acc"] - gpu["linear_acc"]) <= 0.01
