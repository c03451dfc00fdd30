"""The latent-modulated UNet denoiser: a DDPM UNet whose residual blocks are scaled and shifted
by the timestep embedding and then by the encoder's latent.

Structure and parameter count follow the reference implementation: base 128 channels, multipliers
(1, 2, 2, 2), 2 residual blocks per level on the way down and 3 on the way up (with skip
concatenation), one-head self-attention at 16x16 and in the middle, conv down/up-sampling,
GroupNorm(32), a final GroupNorm(8). With the CIFAR-10 settings it has 39.6 M parameters.

Two ideas of the SODA paper go past the reference and are off by default:
- *layer modulation* (`layer_groups` > 1): the latent is split into `layer_groups` equal
  sub-vectors; resolution levels are split into as many contiguous groups (level 0 is the
  finest; the middle block belongs to the coarsest level) and each residual block is modulated
  only by its group's sub-vector. Down and up blocks at one resolution share a group.
- *layer masking*: the caller passes `keep`, a [batch, layer_groups] 0/1 mask; a group whose
  entry is 0 sees a zero sub-vector, exactly as a dropped latent does in classifier-free
  guidance. `soda.models.soda.SODA` samples that mask during training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoids of a (fractional) timestep: [batch] -> [batch, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat((angles.sin(), angles.cos()), dim=1)


class ResidualBlock(nn.Module):
    """h = GN(conv1(SiLU(GN(x)))); h = ts*h + tb; h = zs*h + zb; out = conv2(drop(SiLU(h))) + skip(x).

    The SiLU in front of the two modulation projections is applied once per forward by the UNet
    (it is the same for every block), so the blocks take already-activated embeddings.
    """

    def __init__(self, in_channels, out_channels, time_dim, latent_dim, dropout, norm_groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels)
        self.time_proj = nn.Linear(time_dim, 2 * out_channels)
        self.latent_proj = nn.Linear(latent_dim, 2 * out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x, time_act, latent_act):
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        time_scale, time_shift = self.time_proj(time_act)[:, :, None, None].chunk(2, dim=1)
        latent_scale, latent_shift = self.latent_proj(latent_act)[:, :, None, None].chunk(2, dim=1)
        h = time_scale * h + time_shift
        h = latent_scale * h + latent_shift
        return self.conv2(self.dropout(F.silu(h))) + self.shortcut(x)


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over pixels with a residual connection."""

    def __init__(self, channels, heads, norm_groups):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x):
        batch, channels, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        # Per head the projection holds [q | k | v] side by side (the reference's layout).
        qkv = self.qkv(tokens).view(batch, height * width, self.heads, 3 * channels // self.heads)
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=-1)  # each [B, heads, HW, C/heads]
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = attended.transpose(1, 2).reshape(batch, height * width, channels)
        return x + self.out(attended).transpose(1, 2).reshape(batch, channels, height, width)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """A residual block, optionally followed by attention, tagged with its modulation group."""

    def __init__(self, block: ResidualBlock, attention: nn.Module | None, group: int):
        super().__init__()
        self.block = block
        self.attention = attention if attention is not None else nn.Identity()
        self.group = group

    def forward(self, x, time_act, latent_acts):
        return self.attention(self.block(x, time_act, latent_acts[self.group]))


def _level_groups(levels: int, layer_groups: int) -> list[int]:
    """Contiguous split of resolution levels into groups: level -> group index."""
    return [level * layer_groups // levels for level in range(levels)]


class LatentUNet(nn.Module):
    def __init__(
        self,
        *,
        image_size: int,
        base_channels: int,  # channels at full resolution; level i has base * mults[i]
        channel_mults: Sequence[int],
        attention_levels: Sequence[bool],  # one per level: self-attention after its blocks
        blocks_per_level: int,  # residual blocks per level going down (one more going up)
        attention_heads: int,
        dropout: float,
        latent_dim: int,
        layer_groups: int,  # 1 = the reference: the whole latent modulates every block
        norm_groups: int,
        image_channels: int = 3,
    ):
        super().__init__()
        channel_mults = tuple(channel_mults)
        attention_levels = tuple(attention_levels)
        levels = len(channel_mults)
        check_unet(
            image_size=image_size,
            base_channels=base_channels,
            channel_mults=channel_mults,
            attention_levels=attention_levels,
            blocks_per_level=blocks_per_level,
            attention_heads=attention_heads,
            dropout=dropout,
            latent_dim=latent_dim,
            layer_groups=layer_groups,
            norm_groups=norm_groups,
        )
        self.image_size = image_size
        self.image_channels = image_channels
        self.latent_dim = latent_dim
        self.layer_groups = layer_groups
        group_of_level = _level_groups(levels, layer_groups)
        sub_dim = latent_dim // layer_groups
        time_dim = 4 * base_channels

        def stage(in_ch, out_ch, level):
            block = ResidualBlock(in_ch, out_ch, time_dim, sub_dim, dropout, norm_groups)
            attention = SelfAttention(out_ch, attention_heads, norm_groups) if attention_levels[level] else None
            return Stage(block, attention, group_of_level[level])

        self.time_mlp = nn.Sequential(nn.Linear(base_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.image_proj = nn.Conv2d(image_channels, base_channels, kernel_size=3, padding=1)

        # Going down, every output is kept for a skip connection (the projection's too).
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        channels = base_channels
        for level, mult in enumerate(channel_mults):
            for _ in range(blocks_per_level):
                self.down.append(stage(channels, base_channels * mult, level))
                channels = base_channels * mult
                skip_channels.append(channels)
            if level < levels - 1:
                self.down.append(Downsample(channels))
                skip_channels.append(channels)

        coarsest = levels - 1
        self.middle = nn.ModuleList(
            [
                stage(channels, channels, coarsest),
                SelfAttention(channels, attention_heads, norm_groups),
                stage(channels, channels, coarsest),
            ]
        )

        # Going up, each block consumes one skip; one more block per level than going down.
        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            for _ in range(blocks_per_level + 1):
                self.up.append(stage(channels + skip_channels.pop(), base_channels * channel_mults[level], level))
                channels = base_channels * channel_mults[level]
            if level > 0:
                self.up.append(Upsample(channels))
        assert not skip_channels

        self.out_norm = nn.GroupNorm(8, channels)
        self.out_conv = nn.Conv2d(channels, image_channels, kernel_size=3, padding=1)

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, latent: torch.Tensor, keep: torch.Tensor | None = None):
        """Predict the noise in `noisy` at fractional time `t` (= step / T), modulated by `latent`.

        keep: optional [batch, layer_groups] mask; a 0 drops that group's modulation (its
        sub-vector is replaced by zeros). A whole dropped latent is keep = 0 everywhere.
        """
        batch = noisy.shape[0]
        if latent.shape != (batch, self.latent_dim):
            raise ValueError(f"latent has shape {tuple(latent.shape)}; expected ({batch}, {self.latent_dim})")
        time_act = F.silu(self.time_mlp(timestep_embedding(t, self.time_mlp[0].in_features)))
        sub_latents = latent.view(batch, self.layer_groups, -1)
        if keep is not None:
            sub_latents = sub_latents * keep.to(sub_latents.dtype)[:, :, None]
        latent_acts = F.silu(sub_latents).unbind(dim=1)

        x = self.image_proj(noisy)
        skips = [x]
        for module in self.down:
            x = module(x) if isinstance(module, Downsample) else module(x, time_act, latent_acts)
            skips.append(x)
        first, attention, second = self.middle
        x = second(attention(first(x, time_act, latent_acts)), time_act, latent_acts)
        for module in self.up:
            if isinstance(module, Upsample):
                x = module(x)
            else:
                x = module(torch.cat((x, skips.pop()), dim=1), time_act, latent_acts)
        return self.out_conv(F.silu(self.out_norm(x)))

    @torch.no_grad()
    def modulation_spread(self, latent: torch.Tensor) -> torch.Tensor:
        """How much the modulation that `latent` [batch, latent_dim] applies differs between the
        images of the batch: the standard deviation over the batch of every block's latent scale
        and shift, averaged over channels and blocks (a 0-dim tensor on the latent's device; no
        host sync). 0 when every image gets the same modulation, i.e. the decoder cannot tell
        the images' latents apart. A training diagnostic; forward() does not use it."""
        acts = F.silu(latent.float().view(latent.shape[0], self.layer_groups, -1)).unbind(dim=1)
        spreads = [
            module.block.latent_proj(acts[module.group]).std(dim=0).mean()
            for module in self.modules()
            if isinstance(module, Stage)
        ]
        return torch.stack(spreads).mean()


def check_unet(
    *,
    image_size: int,
    base_channels: int,
    channel_mults: Sequence[int],
    attention_levels: Sequence[bool],
    blocks_per_level: int,
    attention_heads: int,
    dropout: float,
    latent_dim: int,
    layer_groups: int,
    norm_groups: int,
    name: Callable[[str], str] = str,
) -> None:
    """A ValueError saying what is wrong when LatentUNet cannot be built from these arguments, or
    cannot denoise images of `image_size`. Pure, so that the run's config is checked with it
    before any launch (soda.config); `name` gives an argument the name a message uses for it
    (`layer_groups` -> `model.layer_groups`)."""
    levels = len(channel_mults)
    if levels < 1 or any(m < 1 for m in channel_mults):
        raise ValueError(f"{name('channel_mults')}={list(channel_mults)} must be a non-empty list of positive integers")
    if len(attention_levels) != levels:
        raise ValueError(
            f"{name('attention_levels')} has {len(attention_levels)} entries; it needs one per level of "
            f"{name('channel_mults')} ({levels})"
        )
    # Each level but the last halves the image (a stride-2 conv rounds an odd size up) and the way
    # up doubles it again: the skip connections match only when every halving is exact.
    factor = 2 ** (levels - 1)
    if image_size < factor or image_size % factor:
        allowed = ", ".join(str(factor * k) for k in (1, 2, 4, 8, 16))
        raise ValueError(
            f"{name('image_size')}={image_size} cannot be halved {levels - 1} times by a UNet with "
            f"{levels} levels ({name('channel_mults')}); allowed: multiples of {factor} ({allowed}, ...)"
        )
    if blocks_per_level < 1:
        raise ValueError(f"{name('blocks_per_level')}={blocks_per_level} must be at least 1")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name('dropout')}={dropout} must be in [0, 1)")
    multiple_of_8 = "must be a positive multiple of 8 (the final GroupNorm has 8 groups)"
    if base_channels < 8:
        raise ValueError(f"{name('base_channels')}={base_channels} {multiple_of_8}")
    if norm_groups < 1:
        raise ValueError(f"{name('norm_groups')}={norm_groups} must be at least 1")
    if attention_heads < 1:
        raise ValueError(f"{name('attention_heads')}={attention_heads} must be at least 1")
    widths = [base_channels * mult for mult in channel_mults]
    for mult, channels in zip(channel_mults, widths, strict=True):
        if channels % norm_groups:
            raise ValueError(
                f"{name('base_channels')}={base_channels} x mult {mult} = {channels} channels is not "
                f"divisible by {name('norm_groups')}={norm_groups}; choose {name('base_channels')} as a "
                f"multiple of {norm_groups}, or {name('norm_groups')} as a divisor of {math.gcd(*widths)}"
            )
    if any(channels % attention_heads for channels in widths):
        divisors = [d for d in range(1, math.gcd(*widths) + 1) if math.gcd(*widths) % d == 0]
        raise ValueError(
            f"{name('attention_heads')}={attention_heads} must divide every level's channels "
            f"({', '.join(map(str, widths))}); choose one of {_some(divisors)}"
        )
    if base_channels % 8:
        raise ValueError(f"{name('base_channels')}={base_channels} {multiple_of_8}")
    if not 1 <= layer_groups <= levels:
        raise ValueError(
            f"{name('layer_groups')}={layer_groups} must be between 1 and the number of levels ({levels}): "
            f"the {levels} levels of {name('channel_mults')} are split into that many groups"
        )
    if latent_dim % layer_groups:
        divisors = [g for g in range(1, levels + 1) if latent_dim % g == 0]
        raise ValueError(
            f"{name('latent_dim')}={latent_dim} does not divide into {name('layer_groups')}={layer_groups} equal "
            f"sub-vectors; allowed {name('layer_groups')} for this latent: {divisors}"
        )


def _some(values: list[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return shown if len(values) <= limit else f"{shown}, ..."
