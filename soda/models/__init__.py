from soda.models.diffusion import GaussianDiffusion
from soda.models.encoder import ResNetEncoder
from soda.models.soda import SODA, build_soda
from soda.models.unet import LatentUNet

__all__ = ["GaussianDiffusion", "LatentUNet", "ResNetEncoder", "SODA", "build_soda"]
