"""The baseline bench/throughput.py measures the training path against: per-image PIL transforms
in DataLoader workers, and a straightforward step (what a first implementation does)."""

from __future__ import annotations

import math

import torch
from ema_pytorch import EMA
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from soda.data import LabelledImages


def _pil_view(view, size: int) -> transforms.Compose:
    steps = []
    if view.crop_prob > 0:
        crop = transforms.RandomResizedCrop(size, scale=tuple(view.crop_scale), ratio=tuple(view.crop_ratio))
        steps.append(transforms.RandomApply([crop, transforms.RandomHorizontalFlip(view.flip_prob)], p=view.crop_prob))
    if view.randaugment_prob > 0:
        randaugment = transforms.RandAugment(view.randaugment_ops, view.randaugment_magnitude)
        steps.append(transforms.RandomApply([randaugment], p=view.randaugment_prob))
    return transforms.Compose([*steps, transforms.ToTensor()])


class PILViews(Dataset):
    """The seed's data path: an HWC uint8 array, PIL per image, two independent views."""

    def __init__(self, images: torch.Tensor, settings):
        self.array = images.permute(0, 2, 3, 1).numpy()
        size = settings.dataset.image_size
        self.source = _pil_view(settings.augmentation.source, size)
        self.target = _pil_view(settings.augmentation.target, size)
        self.normalize = transforms.Normalize(settings.dataset.mean, settings.dataset.std)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.array[index])
        return self.normalize(self.source(image)), self.target(image)


def pil_loader(train_set: LabelledImages, settings, batch: int, workers: int, device) -> DataLoader:
    return DataLoader(
        PILViews(train_set.images, settings),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
    )


class StraightforwardStep:
    """What a first implementation does: fp16 autocast with a GradScaler on CUDA (fp32 on a CPU),
    eager, AdamW with its defaults, clipping, ema-pytorch's update() as shipped."""

    def __init__(self, model, settings, device, warmup_steps: int):
        s = settings.schedule
        self.model, self.settings, self.device = model.to(device), settings, device
        lr = s.decoder_lr
        self.optimizer = torch.optim.AdamW(
            [
                {"params": model.encoder.parameters(), "lr": lr * s.encoder_lr_ratio},
                {"params": model.decoder.parameters()},
            ],
            lr=lr,
            betas=tuple(s.adam_betas),
            weight_decay=s.weight_decay,
        )
        self.dtype = torch.float16 if device.type == "cuda" else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype is not None)
        self.ema = EMA(
            model, beta=s.ema_decay, update_after_step=0, power=s.ema_warmup_power, include_online_model=False
        )
        self.base_lrs = [lr * s.encoder_lr_ratio, lr]
        self.warmup_steps, self.step = warmup_steps, 0

    def __call__(self, source_view, target_view) -> torch.Tensor:
        factor = min(1.0, (self.step + 1) / self.warmup_steps)  # the same warm-up as the Trainer
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        self.step += 1
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.model(source_view, target_view)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.schedule.grad_clip or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update()
        return loss
