"""What a training log point records besides the loss: is the encoder learning, and does the
decoder listen to it?"""

from __future__ import annotations

import torch

from soda.models import SODA
from soda.record import DECODER_GRAD_NORM, ENCODER_GRAD_NORM, LATENT_NORM, LATENT_RANK, LATENT_STD, MODULATION_STD


@torch.no_grad()
def training_diagnostics(model: SODA, source_view: torch.Tensor) -> dict[str, torch.Tensor]:
    """Called after backward on a log point's step: the encoder's and decoder's gradient norms,
    and the latent of this batch's source views as the evaluation sees it (encoder in eval mode,
    so BatchNorm's running statistics are neither used from the batch nor updated): its mean
    norm, per-dimension standard deviation, effective rank, and the spread of the modulation it
    applies in the decoder (soda.models.unet.LatentUNet.modulation_spread). 0-dim device
    tensors: no host sync."""

    def grad_norm(module: torch.nn.Module) -> torch.Tensor:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=source_view.device)
        return torch.nn.utils.get_total_norm(grads).float()

    encoder = model.encoder
    was_training = encoder.training
    encoder.eval()
    try:
        latent = model.encode(source_view, normalize=False).float()
    finally:
        encoder.train(was_training)
    centred = latent - latent.mean(dim=0)
    singular = torch.linalg.svdvals(centred)
    weights = singular / singular.sum().clamp_min(1e-12)
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum()
    return {
        ENCODER_GRAD_NORM: grad_norm(model.encoder),
        DECODER_GRAD_NORM: grad_norm(model.decoder),
        LATENT_NORM: latent.norm(dim=1).mean(),
        LATENT_STD: latent.std(dim=0).mean(),
        LATENT_RANK: entropy.exp(),
        MODULATION_STD: model.decoder.modulation_spread(latent),
    }
