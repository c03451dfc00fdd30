"""Does the decoder use what the encoder says about *each image*? A diagnostic for a run directory.

    python bench/latent_usage.py outputs/2026-11-28/12-00-00 [--images 256]

Loads the run's EMA model from `checkpoints/last.pt` and its config from `.hydra/config.yaml`, then
prints the decoder's noise-prediction error on test images at a few timesteps with (a) each image's
own latent, (b) the latents shuffled across images, (c) the latent dropped (zeros). If (a) is no
better than (b), the latent acts as a learned constant and carries nothing image-specific yet,
whatever the reconstructions look like.
"""

import argparse
from pathlib import Path

import torch
from ema_pytorch import EMA
from omegaconf import OmegaConf

from soda.checkpoint import load_checkpoint
from soda.config import to_settings
from soda.train import CHECKPOINT, _signature, build_model, load_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 600, 900])
    args = parser.parse_args()

    settings = to_settings(OmegaConf.load(args.run_dir / ".hydra" / "config.yaml"))
    model = build_model(settings)
    state = load_checkpoint(args.run_dir / CHECKPOINT, _signature(settings))
    ema = EMA(model, include_online_model=False)
    ema.load_state_dict(state["ema"])
    model = ema.ema_model.eval()
    _, test_set = load_data(settings)
    images = test_set.images[: args.images].float() / 255
    count = images.shape[0]
    x0 = images * 2 - 1
    generator = torch.Generator().manual_seed(0)
    print(f"run {args.run_dir}  epoch {state['epoch']}  {count} test images")
    print(f"{'t':>6} {'own latent':>12} {'shuffled':>12} {'dropped':>12}")
    with torch.no_grad():
        latents = model.encode(images, normalize=False)
        shuffled = latents[torch.randperm(count, generator=generator)]
        for step in args.timesteps:
            t = torch.full((count,), step)
            noise = torch.randn(x0.shape, generator=generator)
            noisy = model.diffusion.q_sample(x0, t, noise)
            fraction = t.float() / model.diffusion.timesteps
            dropped = torch.zeros(count, model.decoder.layer_groups)
            errors = [
                torch.mean((model.decoder(noisy, fraction, latent, keep) - noise) ** 2).item()
                for latent, keep in ((latents, None), (shuffled, None), (latents, dropped))
            ]
            print(f"{step:>6} " + " ".join(f"{e:>12.4f}" for e in errors))


if __name__ == "__main__":
    main()
