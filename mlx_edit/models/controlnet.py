"""FLUX.1 ControlNets: InstantX / Shakker-Labs (Union) and XLabs, one configurable model.

diffusers' FluxControlNetModel semantics (models/controlnets/controlnet_flux.py): the FLUX
embedders and a few double/single blocks (the transformer's own `DoubleBlock` /
`SingleBlock` classes), plus
- `controlnet_x_embedder`: Linear(in_channels -> hidden) on the control input, added to the
  embedded noisy latents. InstantX/Union: the packed VAE latents of the control image.
  XLabs: `input_hint_block` (a small conv stack on [-1, 1] pixels, /8) patchified by
  `patch_size` (2 -> 16 * 4 = 64 channels), as x-flux's `pos_embed_input`;
- Union (`num_mode`): a mode embedding prepended to the text tokens (one more zero text id);
- one Linear(hidden -> hidden) per block (`controlnet_blocks`, `controlnet_single_blocks`)
  on the block's image tokens, then times the conditioning scale.
The transformer adds the residuals through its `controlnet=` argument (ControlResiduals):
diffusers' interval rule, or XLabs' repeat rule (`repeat`, set for hint-block models).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_edit.models.config import check_rope_axes, known_fields
from mlx_edit.models.flux import FluxConfig, FluxTrunk
from mlx_edit.models.layers import ControlResiduals, rope_table

HINT_CHANNELS = (16, 16, 16, 16)  # diffusers' XLabs hint block (x-flux input_hint_block)


@dataclass
class ControlNetConfig:
    """diffusers FluxControlNetModel config (defaults: diffusers' constructor defaults).

    InstantX Union: num_layers 5, num_single_layers 10, num_mode 10, guidance_embeds True.
    XLabs: num_layers 2, num_single_layers 0, conditioning_embedding_channels 16,
    patch_size 2. Raises ValueError from `from_dict` for inconsistent widths.
    """

    in_channels: int = 64
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    num_mode: int | None = None
    conditioning_embedding_channels: int | None = None
    patch_size: int = 1
    theta: float = 10000.0
    mlp_ratio: float = 4.0

    @classmethod
    def from_dict(cls, d: dict) -> ControlNetConfig:
        cfg = cls(**known_fields(cls, d, drop_none=False))
        cfg.axes_dims_rope = check_rope_axes(cfg.axes_dims_rope, cfg.attention_head_dim)
        if cfg.conditioning_embedding_channels is not None:
            hint = cfg.conditioning_embedding_channels * cfg.patch_size**2
            if hint != cfg.in_channels:
                raise ValueError(
                    f"hint block gives {cfg.conditioning_embedding_channels} x patch "
                    f"{cfg.patch_size}^2 = {hint} channels, but in_channels is {cfg.in_channels}"
                )
        return cfg

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def kind(self) -> str:
        """'xlabs' (hint block on pixels), 'union' (mode embedding) or 'instantx'."""
        if self.conditioning_embedding_channels is not None:
            return "xlabs"
        return "union" if self.num_mode else "instantx"

    def block_config(self) -> FluxConfig:
        """The transformer config the shared DoubleBlock/SingleBlock classes are built from."""
        keep = ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                "joint_attention_dim", "pooled_projection_dim", "guidance_embeds",
                "axes_dims_rope", "theta", "mlp_ratio")
        return FluxConfig.from_dict({k: getattr(self, k) for k in keep} | {
            "in_channels": self.in_channels, "out_channels": self.in_channels})


class HintBlock(nn.Module):
    """diffusers ControlNetConditioningEmbedding(c, block_out_channels=(16,16,16,16)):
    conv3x3 -> SiLU, then per level conv3x3 -> SiLU, conv3x3 stride 2 -> SiLU, then a
    conv3x3 to `out_channels`. (B, H, W, 3) NHWC -> (B, H/8, W/8, out_channels)."""

    def __init__(self, out_channels: int, channels=HINT_CHANNELS):
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels[0], 3, padding=1)
        self.blocks = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = nn.silu(self.conv_in(x))
        for conv in self.blocks:
            x = nn.silu(conv(x))
        return self.conv_out(x)


def patchify(x: mx.array, p: int) -> mx.array:
    """(B, H, W, C) -> (B, (H/p)(W/p), C p^2), channel = c p^2 + ph p + pw (diffusers'
    permute(0, 2, 4, 1, 3, 5) of the NCHW map; x-flux's `b c (h ph) (w pw) -> b (h w)
    (c ph pw)`). Raises ValueError if H or W is not a multiple of p."""
    b, h, w, c = x.shape
    if h % p or w % p:
        raise ValueError(f"hint map {h}x{w} is not a multiple of patch size {p}")
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


class FluxControlNet(FluxTrunk):
    """A FLUX ControlNet. See `__call__` for shapes; `config.kind` tells the family."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__(cfg.block_config())
        self.config = cfg
        h = cfg.hidden_size
        self.controlnet_blocks = [nn.Linear(h, h) for _ in range(cfg.num_layers)]
        self.controlnet_single_blocks = [nn.Linear(h, h) for _ in range(cfg.num_single_layers)]
        self.controlnet_x_embedder = nn.Linear(cfg.in_channels, h)
        if cfg.num_mode:
            self.mode_embedder = nn.Embedding(cfg.num_mode, h)
        if cfg.conditioning_embedding_channels is not None:
            self.input_hint_block = HintBlock(cfg.conditioning_embedding_channels)

    @property
    def repeat(self) -> bool:
        """XLabs residuals cycle over the transformer's blocks (diffusers pipelines set
        `controlnet_blocks_repeat` exactly when the model has a hint block)."""
        return self.config.conditioning_embedding_channels is not None

    def rope(self, img_ids: mx.array, n_txt: int) -> mx.array:
        """RoPE table for [text (+1 mode token for Union), image], (L(+1) + N, D/2, 2)."""
        n = n_txt + (1 if self.config.num_mode else 0)
        ids = mx.concatenate([mx.zeros((n, 3), mx.float32), img_ids.astype(mx.float32)], 0)
        return rope_table(ids, self.config.axes_dims_rope, self.config.theta)

    def embed_control(self, cond: mx.array) -> mx.array:
        """The control term added to the embedded latents, (1|B, N, hidden).

        cond: packed control latents (1|B, N, in_channels), or (XLabs) pixels
        (1|B, H, W, 3) in [-1, 1] through the hint block, patchified. It does not depend on
        the step: the pipeline computes it once per run and passes it as `control`.
        """
        dtype = self.img_in.weight.dtype
        cond = cond.astype(dtype)
        if self.config.conditioning_embedding_channels is not None:
            cond = patchify(self.input_hint_block(cond), self.config.patch_size)
        return self.controlnet_x_embedder(cond)

    def __call__(
        self,
        img: mx.array,
        img_ids: mx.array,
        txt: mx.array,
        timestep: mx.array,
        pooled: mx.array,
        guidance: mx.array | None = None,
        *,
        cond: mx.array | None = None,
        control: mx.array | None = None,
        mode: int | None = None,
        scale: float = 1.0,
        rope: mx.array | None = None,
    ) -> ControlResiduals:
        """Residuals for the transformer, already multiplied by `scale`.

        Args:
            img: noisy packed latents (B, N, in_channels) (64 for FLUX, not Fill's 384).
            img_ids: (N, 3) position ids; text ids are zeros (FLUX's convention).
            txt: T5 hidden states (B, L, joint_attention_dim); pooled: (B, pooled_dim).
            timestep: (B,) sigma in [0, 1]; guidance: (B,) or None (ignored unless the
                ControlNet embeds guidance, as diffusers' pipelines do).
            cond: (1|B, N, in_channels) packed control latents, or for XLabs (1|B, H, W, 3)
                pixels in [-1, 1] with H = 16 * token rows (NHWC).
            control: `self.embed_control(cond)` precomputed (give cond or control).
            mode: Union control mode in [0, num_mode) (required for Union models).
            rope: a precomputed `self.rope(img_ids, L)`.
        Returns:
            ControlResiduals with one (B, N, hidden) array per double / single block and
            `repeat` set for XLabs models.
        Raises:
            ValueError: a Union model without a valid mode, or a mode for a non-Union one;
                neither cond nor control given.
        """
        dtype = self.img_in.weight.dtype
        if control is None:
            if cond is None:
                raise ValueError("pass the control input: cond or control")
            control = self.embed_control(cond)
        vec = self.embed_conditioning(timestep, pooled, guidance)
        x = self.img_in(img.astype(dtype)) + control
        ctx = self.embed_text(txt, mode, img.shape[0])
        if rope is None:
            rope = self.rope(img_ids, txt.shape[1])
        return self.residuals(x, ctx, nn.silu(vec), rope, scale)

    def embed_text(self, txt: mx.array, mode: int | None, batch: int) -> mx.array:
        """Text tokens (B, L, hidden) from T5 states (B, L, joint_attention_dim); for Union
        models with the mode's embedding (repeated `batch` times) prepended, (B, L + 1,
        hidden). Raises ValueError (a Union model without a valid mode in [0, num_mode),
        or a mode for a non-Union one)."""
        cfg = self.config
        ctx = self.txt_in(txt.astype(self.img_in.weight.dtype))
        if cfg.num_mode:
            if mode is None or not 0 <= int(mode) < cfg.num_mode:
                raise ValueError(f"Union ControlNet needs a mode in [0, {cfg.num_mode}), got {mode}")
            emb = self.mode_embedder(mx.array([int(mode)]))[None]  # (1, 1, hidden)
            modes = mx.broadcast_to(emb, (batch, 1, emb.shape[-1]))
            ctx = mx.concatenate([modes, ctx], axis=1)
        elif mode is not None:
            raise ValueError("this ControlNet has no mode embedder (not a Union model)")
        return ctx

    def residuals(self, x: mx.array, ctx: mx.array, silu_vec: mx.array, rope: mx.array,
                  scale: float) -> ControlResiduals:
        """The blocks on embedded image x (B, N, hidden) and text ctx (B, L, hidden), given
        silu(modulation vector) (B, hidden): each block's output through its zero-init
        projection, times `scale`."""
        double = []
        for block, proj in zip(self.double_blocks, self.controlnet_blocks):
            x, ctx = block(x, ctx, silu_vec, rope)
            double.append(proj(x) * scale)
        single = []
        if self.single_blocks:
            n_txt = ctx.shape[1]
            xs = mx.concatenate([ctx, x], axis=1)
            for block, proj in zip(self.single_blocks, self.controlnet_single_blocks):
                xs = block(xs, silu_vec, rope)
                single.append(proj(xs[:, n_txt:]) * scale)
        return ControlResiduals(double, single, repeat=self.repeat)
