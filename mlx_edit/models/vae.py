"""The FLUX VAEs (diffusers `AutoencoderKL`, `AutoencoderKLFlux2`) in MLX, NHWC layout.

Reference: diffusers `models/autoencoders/autoencoder_kl.py` (AutoencoderKL),
`models/autoencoders/autoencoder_kl_flux2.py` (AutoencoderKLFlux2: the same encoder and
decoder with 32 latent channels, both quant convs and a batch norm `bn` whose running
statistics normalise the 2x2-patchified latents; the pipeline applies them, see
`mlx_edit.sampling.latents_flux2`),
`models/autoencoders/vae.py` (Encoder, Decoder, DiagonalGaussianDistribution),
`models/unets/unet_2d_blocks.py` (DownEncoderBlock2D, UpDecoderBlock2D, UNetMidBlock2D),
`models/resnet.py` (ResnetBlock2D), `models/downsampling.py`, `models/upsampling.py`.

Module names follow diffusers (`encoder.down_blocks.0.resnets.1.conv1`, ...), so a
diffusers checkpoint maps by name; conv weights are MLX's OHWI. Latent scaling is not
applied here: the pipeline computes `(z - shift_factor) * scaling_factor` (FLUX.1) or the
batch-norm normalisation (FLUX.2) itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from mlx_edit.models.config import known_fields
from mlx_edit.models.layers import GroupNorm

_EPS = 1e-6  # every norm of the diffusers VAE (resnet_eps, conv_norm_out, attention)


@dataclass
class VAEConfig:
    """diffusers `AutoencoderKL` / `AutoencoderKLFlux2` config; the defaults are the
    FLUX.1 VAE (a BFL `ae.safetensors` carries no config and uses them).

    `patch_size` set (FLUX.2: (2, 2)) gives the model a `bn` (LatentBatchNorm) over the
    prod(patch_size) * latent_channels channels of the patchified latents, with
    `batch_norm_eps`; such a VAE has no scale/shift (1.0 and 0.0 unless given).
    `decoder_block_out_channels` None: the decoder mirrors `block_out_channels`.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = field(default=(128, 256, 512, 512))
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    mid_block_add_attention: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    decoder_block_out_channels: tuple[int, ...] | None = None
    patch_size: tuple[int, int] | None = None
    batch_norm_eps: float = 1e-4

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        """Build from a diffusers `config.json` dict; unknown keys are ignored.

        A `shift_factor` of None (SD-style VAEs) becomes 0.0. Raises ValueError for an
        activation other than SiLU or block types other than the plain VAE blocks.
        """
        kw = known_fields(cls, d, drop_none=False)
        for key in ("block_out_channels", "decoder_block_out_channels", "patch_size"):
            if kw.get(key) is not None:
                kw[key] = tuple(kw[key])
        if kw.get("patch_size") is not None:  # FLUX.2: batch-norm statistics, no scaling
            if kw["patch_size"] != (2, 2):
                raise ValueError(f"VAE patch_size {kw['patch_size']} not supported (only 2x2)")
            kw.setdefault("scaling_factor", 1.0)
            kw.setdefault("shift_factor", 0.0)
        if kw.get("shift_factor", 0.0) is None:
            kw["shift_factor"] = 0.0
        if kw.get("act_fn", "silu") not in ("silu", "swish"):
            raise ValueError(f"VAE act_fn {kw['act_fn']!r} is not supported (only silu)")
        for key, allowed in (("down_block_types", "DownEncoderBlock2D"),
                             ("up_block_types", "UpDecoderBlock2D")):
            bad = [t for t in d.get(key, ()) if t != allowed]
            if bad:
                raise ValueError(f"VAE {key} {bad} not supported (only {allowed})")
        return cls(**kw)

    @classmethod
    def flux2(cls) -> VAEConfig:
        """The FLUX.2 VAE (diffusers AutoencoderKLFlux2 defaults, the klein and dev
        `vae/config.json`): FLUX.1's widths, 32 latent channels, both quant convs, 2x2
        patches normalised by the 128-channel batch norm (eps 1e-4)."""
        return cls.from_dict({"latent_channels": 32, "use_quant_conv": True,
                              "use_post_quant_conv": True, "patch_size": (2, 2)})

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for FLUX)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def bn_channels(self) -> int:
        """Channels of the patchified latents the batch norm sees (128 for FLUX.2), 0
        without one."""
        if self.patch_size is None:
            return 0
        return self.patch_size[0] * self.patch_size[1] * self.latent_channels


def _group_norm(channels: int, groups: int) -> GroupNorm:
    return GroupNorm(groups, channels, eps=_EPS)


def _evaluated_blocks(fn, size: int, block: int, axis: int) -> mx.array:
    """concatenate([fn(0), fn(block), ...], axis), each part evaluated before the next is
    built: MLX keeps an op's scratch buffers (im2col, scores) until the evaluation that
    ran it ends, so one evaluation over all parts would hold every part's scratch."""
    parts = []
    for start in range(0, size, block):
        parts.append(fn(start))
        mx.eval(parts[-1])
    return mx.concatenate(parts, axis=axis)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (stride, symmetric padding, no dilation/groups) that runs in bands of
    output rows when `max_bytes` is set and its unfolded input would exceed it.

    MLX's CPU convolution unfolds its input (im2col: a k x k conv needs k*k times its
    input); a band of output rows needs that for its own rows only. Each band reads its
    input rows plus the kernel's halo, so the result is the plain convolution's (exact,
    up to float rounding). `max_bytes` None (default): one plain call.
    """

    max_bytes: int | None = None

    def __call__(self, x: mx.array) -> mx.array:
        kh, kw = self.weight.shape[1:3]
        b, h, w, cin = x.shape
        (sh, sw), (ph, pw) = self.stride, self.padding
        h_out, w_out = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        row_bytes = b * w_out * kh * kw * cin * x.dtype.size
        if self.max_bytes is None or kh * kw == 1 or h_out * row_bytes <= self.max_bytes:
            return super().__call__(x)
        rows = max(1, self.max_bytes // row_bytes)
        x = mx.pad(x, [(0, 0), (ph, ph), (pw, pw), (0, 0)])
        y = _evaluated_blocks(
            lambda r: mx.conv2d(x[:, r * sh : (min(r + rows, h_out) - 1) * sh + kh],
                                self.weight, (sh, sw)), h_out, rows, axis=1)
        return y + self.bias if "bias" in self else y


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without time embedding: GN-SiLU-conv, GN-SiLU-conv, + skip
    (a 1x1 `conv_shortcut` when the channel count changes). (B,H,W,Cin) -> (B,H,W,Cout)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over all pixels with a residual (diffusers `Attention`
    built with `_from_deprecated_attn_block`, heads = 1, dim_head = channels).
    (B,H,W,C) -> (B,H,W,C). With `max_bytes` set, queries run in blocks whose scores
    (and softmax) stay within it (exact: each query attends to every key).
    """

    max_bytes: int | None = None

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, 1, h * w, c)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        n = h * w
        rows = n if self.max_bytes is None else max(1, self.max_bytes // (b * n * 4 * 2))
        o = _evaluated_blocks(
            lambda i: mx.fast.scaled_dot_product_attention(q[:, :, i : i + rows], k, v,
                                                           scale=c**-0.5), n, rows, axis=2)
        return x + self.to_out[0](o).reshape(b, h, w, c)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero padding one row at the bottom and one column at the
    right (diffusers Downsample2D with padding=0: F.pad(x, (0, 1, 0, 1)))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (diffusers Upsample2D, use_conv=True)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return self.conv(x.reshape(b, 2 * h, 2 * w, c))


class MidBlock(nn.Module):
    """resnet, [attention], resnet (diffusers UNetMidBlock2D, one layer)."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock(channels, channels, groups) for _ in range(2)]
        self.attentions = [Attention(channels, groups)] if add_attention else []

    def __call__(self, x: mx.array) -> mx.array:
        x = _after_layer(self, self.resnets[0](x))
        for attn in self.attentions:
            x = _after_layer(self, attn(x))
        return _after_layer(self, self.resnets[1](x))


class DownBlock(nn.Module):
    """`num_layers` resnets, then an optional Downsample (diffusers DownEncoderBlock2D)."""

    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(num_layers)]
        self.downsamplers = [Downsample(cout)] if downsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.resnets + self.downsamplers:
            x = _after_layer(self, layer(x))
        return x


class UpBlock(nn.Module):
    """`num_layers` resnets, then an optional Upsample (diffusers UpDecoderBlock2D)."""

    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(num_layers)]
        self.upsamplers = [Upsample(cout)] if upsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.resnets + self.upsamplers:
            x = _after_layer(self, layer(x))
        return x


def _after_layer(block: nn.Module, x: mx.array) -> mx.array:
    """x, passed to the block's `after_layer` callback when one is set (`layer_callback`)."""
    fn = getattr(block, "after_layer", None)
    if fn is not None:
        fn(x)
    return x


class Encoder(nn.Module):
    """(B,H,W,in_channels) -> (B,H/f,W/f,2*latent_channels): [mean | logvar] on channels."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < len(ch) - 1)
            for i in range(len(ch))
        ]
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = _group_norm(ch[-1], g)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """(B,h,w,latent_channels) -> (B,h*f,w*f,out_channels)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = tuple(reversed(cfg.decoder_block_out_channels or cfg.block_out_channels))
        g = cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = [
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, i < len(ch) - 1)
            for i in range(len(ch))
        ]
        self.conv_norm_out = _group_norm(ch[-1], g)
        self.conv_out = Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class LatentBatchNorm(nn.Module):
    """The running statistics of a non-affine BatchNorm2d (diffusers AutoencoderKLFlux2.bn,
    BFL AutoEncoder.bn): `running_mean`, `running_var` (C,), `eps`. The VAE never applies
    it; the pipeline normalises patchified latents with it (`latents_flux2.normalize_latents`).
    """

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.running_mean = mx.zeros((channels,))
        self.running_var = mx.ones((channels,))


class AutoencoderKL(nn.Module):
    """The KL autoencoder: images (B,H,W,C) in [-1, 1] <-> latents (B,H/f,W/f,latent).

    f = `config.scale_factor` (8 for FLUX); H and W must be multiples of f for `decode`
    to give back the input size. Computation runs in the dtype of the weights (inputs
    are cast to it). Latents here are unscaled: FLUX.1's transformer sees
    `(z - config.shift_factor) * config.scaling_factor`; FLUX.2's (`config.patch_size`
    set) sees them patchified 2x2 and normalised by `self.bn`'s running statistics
    (mlx_edit.sampling.latents_flux2), as diffusers' Flux2 pipelines do.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = Conv2d(2 * c, 2 * c, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = Conv2d(c, c, 1)
        if config.patch_size is not None:
            self.bn = LatentBatchNorm(config.bn_channels, config.batch_norm_eps)

    @property
    def dtype(self) -> mx.Dtype:
        return self.encoder.conv_in.weight.dtype

    def encode(self, images: mx.array) -> tuple[mx.array, mx.array]:
        """Posterior parameters of images (B,H,W,in_channels) in [-1, 1].

        Returns (mean, logvar), each (B,H/f,W/f,latent_channels) in the weights' dtype;
        logvar is clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution.
        """
        h = self.encoder(images.astype(self.dtype))
        if "quant_conv" in self:
            h = self.quant_conv(h)
        mean, logvar = mx.split(h, 2, axis=-1)
        return mean, mx.clip(logvar, -30.0, 20.0)

    def encode_mean(self, images: mx.array) -> mx.array:
        """Posterior mean (= mode) (B,H/f,W/f,latent_channels) of images (B,H,W,3)."""
        return self.encode(images)[0]

    def encode_sample(self, images: mx.array, key: mx.array) -> mx.array:
        """A posterior sample `mean + exp(logvar / 2) * eps`, eps = normal(key) drawn with
        the latent's shape and dtype. (B,H,W,3) -> (B,H/f,W/f,latent_channels)."""
        mean, logvar = self.encode(images)
        eps = mx.random.normal(mean.shape, dtype=mean.dtype, key=key)
        return mean + mx.exp(0.5 * logvar) * eps

    @contextmanager
    def banded(self, max_bytes: int) -> Iterator[AutoencoderKL]:
        """Within this context every convolution runs in bands of output rows and every
        attention in blocks of queries, so no single op's working buffer (im2col, scores)
        exceeds `max_bytes`; the result equals the plain pass (float rounding aside).
        Unlike tiles (mlx_edit.editing.tiling), GroupNorm and attention still see the whole image,
        and the whole image's activations stay in memory (a few per pixel, not the 9x of
        an unfolded 3x3 convolution)."""
        layers = [m for _, m in self.named_modules() if isinstance(m, (Conv2d, Attention))]
        for layer in layers:
            layer.max_bytes = max_bytes
        try:
            yield self
        finally:
            for layer in layers:
                layer.max_bytes = None

    @contextmanager
    def layer_callback(self, fn) -> Iterator[tuple[int, int]]:
        """Within this context `fn(x)` is called with the output of every resnet,
        attention and resampler of the encoder's and decoder's blocks (progress:
        mlx_edit.editing.tiling evaluates x there and reports). Yields the number of such layers
        in one (encode, decode)."""
        blocks = [m for _, m in self.named_modules()
                  if isinstance(m, (DownBlock, UpBlock, MidBlock))]
        for block in blocks:
            block.after_layer = fn

        def mid(b: MidBlock) -> int:
            return len(b.resnets) + len(b.attentions)
        try:
            yield (sum(len(b.resnets) + len(b.downsamplers) for b in self.encoder.down_blocks)
                   + mid(self.encoder.mid_block),
                   sum(len(b.resnets) + len(b.upsamplers) for b in self.decoder.up_blocks)
                   + mid(self.decoder.mid_block))
        finally:
            for block in blocks:
                block.after_layer = None

    def decode(self, latents: mx.array) -> mx.array:
        """Images (B,h*f,w*f,out_channels), nominally in [-1, 1] (not clipped), from
        unscaled latents (B,h,w,latent_channels)."""
        z = latents.astype(self.dtype)
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z)
