"""Does the decoder use what the encoder says about *each image*? A diagnostic for a run directory.

    python bench/latent_usage.py outputs/2026-11-28/12-00-00 [--images 256]

Loads the run's EMA model from `checkpoints/last.pt` and its config from `.hydra/config.yaml`, then
prints the decoder's noise-prediction error on test images at a few timesteps with (a) each image's
own latent, (b) another image's latent, (c) the latent dropped (zeros), and the latent gap (b / a - 1;
every run records it at t = 500 and 700 as eval/latent_gap). If (a) is no better than (b), the latent
acts as a learned constant and carries nothing image-specific yet, whatever the reconstructions
look like.
"""

import argparse
from pathlib import Path

from ema_pytorch import EMA
from omegaconf import OmegaConf

from soda.checkpoint import load_checkpoint
from soda.config import to_settings
from soda.eval import latent_errors, latent_gap
from soda.train import CHECKPOINT, _signature, build_model, load_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700, 900])
    args = parser.parse_args()

    settings = to_settings(OmegaConf.load(args.run_dir / ".hydra" / "config.yaml"))
    model = build_model(settings)
    state = load_checkpoint(args.run_dir / CHECKPOINT, _signature(settings))
    ema = EMA(model, include_online_model=False)
    ema.load_state_dict(state["ema"])
    model = ema.ema_model.eval()
    _, test_set = load_data(settings)
    images = test_set.images[: args.images].float() / 255
    # The metric eval/latent_gap is the same computation at the eval config's timesteps.
    errors = latent_errors(model, images, args.timesteps, seed=settings.seed, dropped=True)
    print(f"run {args.run_dir}  epoch {state['epoch']}  {images.shape[0]} test images")
    print(f"{'t':>6} {'own latent':>12} {'shuffled':>12} {'dropped':>12} {'latent gap':>12}")
    for step, error in errors.items():
        gap = latent_gap({step: error})
        print(f"{step:>6} " + " ".join(f"{error[k]:>12.4f}" for k in ("own", "shuffled", "dropped")) + f" {gap:>12.2%}")
    print(f"latent gap over these timesteps: {latent_gap(errors):.2%}")


if __name__ == "__main__":
    main()
