"""The FLUX.1 transformer (MM-DiT): Fill, dev, schnell and the Canny/Depth control models.

One configurable model; the variant comes from the checkpoint's config (in_channels 384
for Fill, 128 for Canny/Depth, 64 for dev/schnell; guidance embedding on or off).
Reference: diffusers `models/transformers/transformer_flux.py` (FluxTransformer2DModel),
BFL `src/flux/model.py` and `modules/layers.py`.

Compute layout (ours, chosen for speed): fused QKV per stream in double blocks, and one
fused input projection (q, k, v, MLP) per single block, as in BFL checkpoints. Loaders
map diffusers' separate projections into it (mlx_edit/weights/flux.py).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from mlx_edit.models.config import TransformerWidths, transformer_config
from mlx_edit.models.layers import (
    ControlResiduals,
    IPAdapterKV,
    MLPEmbedder,
    apply_rope,
    attention,
    embed_scaled,
    gelu_tanh,
    modulate,
    residual_index,
    rope_table,
)


@dataclass
class FluxConfig(TransformerWidths):
    """diffusers FluxTransformer2DModel config (defaults: FLUX.1-Fill-dev)."""

    in_channels: int = 384
    out_channels: int | None = 64
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    patch_size: int = 1
    theta: float = 10000.0
    mlp_ratio: float = 4.0

    @classmethod
    def from_dict(cls, d: dict) -> FluxConfig:
        return transformer_config(cls, d, "FLUX")


class QKNorm(nn.Module):
    """RMSNorm over head_dim for queries and keys (eps 1e-6, learnable weight)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.norm_q = nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(head_dim, eps=1e-6)

    def rotated_heads(self, qkv: mx.array, heads: int, rope: mx.array):
        """q, k, v (B, H, N, D) of a fused projection qkv (B, N, 3*H*D): split into
        heads, QK norm and RoPE (`rope` (N, D/2, 2)) on q and k."""
        q, k, v = _split_heads(qkv, heads)
        return apply_rope(self.norm_q(q), rope), apply_rope(self.norm_k(k), rope), v

    def fused_attention(self, qkv: mx.array, heads: int, rope: mx.array) -> mx.array:
        """Scaled dot-product attention of `rotated_heads(qkv, heads, rope)`, (B, N, H*D)."""
        return attention(*self.rotated_heads(qkv, heads, rope))


def _split_heads(qkv: mx.array, heads: int) -> tuple[mx.array, mx.array, mx.array]:
    """(B, N, 3*H*D) -> three (B, H, N, D)."""
    b, n, _ = qkv.shape
    qkv = qkv.reshape(b, n, 3, heads, -1).transpose(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def append_kv(k: mx.array, v: mx.array, extra=None) -> tuple[mx.array, mx.array]:
    """Keys and values (B, H, N, D) with `extra` (k, v) (B or 1, H, T, D) appended along
    the tokens (batch 1 broadcast to B); (k, v) as they are when `extra` is None."""
    if extra is None:
        return k, v
    shape = (k.shape[0], *extra[0].shape[1:])
    return (mx.concatenate([k, mx.broadcast_to(extra[0], shape)], axis=2),
            mx.concatenate([v, mx.broadcast_to(extra[1], shape)], axis=2))


class StreamAttention(QKNorm):
    """One stream's fused QKV projection, QK norm and output projection (double block);
    `bias=False` for FLUX.2."""

    def __init__(self, hidden: int, head_dim: int, bias: bool = True):
        super().__init__(head_dim)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=bias)
        self.proj = nn.Linear(hidden, hidden, bias=bias)

    def qkv_heads(self, x: mx.array, heads: int):
        q, k, v = _split_heads(self.qkv(x), heads)
        return self.norm_q(q), self.norm_k(k), v


class MLP(nn.Module):
    """Linear -> tanh-GELU -> Linear (diffusers FeedForward 'gelu-approximate')."""

    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(gelu_tanh(self.fc1(x)))


class JointBlock(nn.Module):
    """What FLUX.1 and FLUX.2 double blocks share: joint attention over [text, image] with
    separate weights per stream, then gated residuals and one MLP per stream. Subclasses
    set `heads`, `img_attn` / `txt_attn` (StreamAttention) and `img_mlp` / `txt_mlp`;
    `mods` are (image, text) lists of 6 vectors (B, hidden): shift, scale, gate of the
    attention, then of the MLP."""

    def attend(self, img, txt, mods, rope, ip: Sequence[IPAdapterKV] = (), index: int = 0,
               kv=None):
        """The block's attention (diffusers `transformer_blocks.i.attn`): (image output
        (B, N, hidden), text output (B, L, hidden)) after the output projections, plus the
        IP-Adapter sum (B, N, hidden) as a third item when `ip` is given. kv: extra keys
        and values (after RoPE) every token also attends to (`append_kv`; FLUX.2's
        cached reference tokens)."""
        img_mod, txt_mod = mods
        iq, ik, iv = self.img_attn.qkv_heads(modulate(img, img_mod[0], img_mod[1]), self.heads)
        tq, tk, tv = self.txt_attn.qkv_heads(modulate(txt, txt_mod[0], txt_mod[1]), self.heads)
        q = apply_rope(mx.concatenate([tq, iq], axis=2), rope)
        k = apply_rope(mx.concatenate([tk, ik], axis=2), rope)
        out = attention(q, *append_kv(k, mx.concatenate([tv, iv], axis=2), kv))
        n_txt = txt.shape[1]
        outs = (self.img_attn.proj(out[:, n_txt:]), self.txt_attn.proj(out[:, :n_txt]))
        if not ip:
            return outs
        # IP-Adapter: image query after QK norm, before RoPE, summed over adapters
        # (FluxIPAdapterAttnProcessor's third output).
        ip_out = ip[0].scale[index] * attention(iq, ip[0].k[index], ip[0].v[index])
        for adapter in ip[1:]:
            ip_out = ip_out + adapter.scale[index] * attention(iq, adapter.k[index], adapter.v[index])
        return (*outs, ip_out)

    def finish(self, img, txt, mods, outs):
        """Gated attention residuals and the two MLPs, given `attend`'s outputs."""
        img_mod, txt_mod = mods
        img = img + img_mod[2][:, None] * outs[0]
        img = img + img_mod[5][:, None] * self.img_mlp(modulate(img, img_mod[3], img_mod[4]))
        if len(outs) > 2:
            img = img + outs[2]
        txt = txt + txt_mod[2][:, None] * outs[1]
        txt = txt + txt_mod[5][:, None] * self.txt_mlp(modulate(txt, txt_mod[3], txt_mod[4]))
        return img, txt


class DoubleBlock(JointBlock):
    """FLUX.1 double block: its own modulation, tanh-GELU MLPs, biases."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.img_mod = nn.Linear(h, 6 * h)
        self.txt_mod = nn.Linear(h, 6 * h)
        self.img_attn = StreamAttention(h, cfg.attention_head_dim)
        self.txt_attn = StreamAttention(h, cfg.attention_head_dim)
        self.img_mlp = MLP(h, cfg.mlp_hidden)
        self.txt_mlp = MLP(h, cfg.mlp_hidden)

    def modulation(self, vec: mx.array) -> tuple[list[mx.array], list[mx.array]]:
        """Shift/scale/gate vectors of both streams from silu(vec) (B, hidden): 6 + 6."""
        return mx.split(self.img_mod(vec), 6, axis=-1), mx.split(self.txt_mod(vec), 6, axis=-1)

    def __call__(self, img, txt, vec, rope, ip: Sequence[IPAdapterKV] = (), index: int = 0):
        mods = self.modulation(vec)
        return self.finish(img, txt, mods, self.attend(img, txt, mods, rope, ip, index))


class SingleBlock(QKNorm):
    """Parallel attention + MLP over the joint sequence, one fused input projection."""

    def __init__(self, cfg: FluxConfig):
        super().__init__(cfg.attention_head_dim)
        h = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.hidden = h
        self.modulation = nn.Linear(h, 3 * h)
        self.linear1 = nn.Linear(h, 3 * h + cfg.mlp_hidden)
        self.linear2 = nn.Linear(h + cfg.mlp_hidden, h)

    def __call__(self, x, vec, rope):
        return self.forward(x, vec, rope)[0]

    def forward(self, x, vec, rope, attn: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """(output, attention output) for the joint sequence x (B, L + N, hidden).

        attn: a given attention output (B, L + N, hidden) (diffusers
        `single_transformer_blocks.i.attn`, before linear2) replaces the computed one;
        then only the MLP rows of the fused input projection run."""
        shift, scale, gate = mx.split(self.modulation(vec), 3, axis=-1)
        h = modulate(x, shift, scale)
        if attn is None:
            qkv, mlp = mx.split(self.linear1(h), [3 * self.hidden], axis=-1)
            attn = self.fused_attention(qkv, self.heads, rope)
        else:
            mlp = linear_rows(self.linear1, 3 * self.hidden, h)
        out = mx.concatenate([attn, gelu_tanh(mlp)], axis=-1)
        return x + gate[:, None] * self.linear2(out), attn


def linear_rows(layer: nn.Module, start: int, x: mx.array) -> mx.array:
    """`layer(x)[..., start:]`, computing only those output rows for plain and quantized
    Linear layers (other wrappers, e.g. LoRA, run whole and are sliced)."""
    if type(layer) is nn.Linear:
        y = x @ layer.weight[start:].T
    elif type(layer) is nn.QuantizedLinear and getattr(layer, "mode", "affine") == "affine":
        y = mx.quantized_matmul(x, layer.weight[start:], layer.scales[start:],
                                layer.biases[start:], transpose=True,
                                group_size=layer.group_size, bits=layer.bits)
    else:
        return layer(x)[..., start:]
    return y + layer.bias[start:] if "bias" in layer else y


class FinalLayer(nn.Module):
    """AdaLayerNormContinuous (scale, shift order as diffusers) + output projection;
    `bias=False` for FLUX.2."""

    def __init__(self, hidden: int, out: int, bias: bool = True):
        super().__init__()
        self.modulation = nn.Linear(hidden, 2 * hidden, bias=bias)
        self.linear = nn.Linear(hidden, out, bias=bias)

    def __call__(self, x, vec):
        scale, shift = mx.split(self.modulation(nn.silu(vec)), 2, axis=-1)
        return self.linear(modulate(x, shift, scale))


def embed_conditioning(model: nn.Module, timestep, pooled, guidance=None) -> mx.array:
    """Time + guidance + pooled-text embeddings of a FLUX transformer or ControlNet
    (`img_in`, `time_in`, `vector_in`, optional `guidance_in`), (B, hidden).

    `timestep` (B,) is sigma in [0, 1] and `guidance` (B,) the raw guidance scale; both
    are multiplied by 1000 after a cast to the model dtype, as diffusers does.
    Raises ValueError when the model embeds guidance and none is given.
    """
    dtype = model.img_in.weight.dtype
    vec = embed_scaled(model.time_in, timestep, dtype)
    if model.config.guidance_embeds:
        if guidance is None:
            raise ValueError("this FLUX model embeds guidance: pass guidance (B,)")
        vec = vec + embed_scaled(model.guidance_in, guidance, dtype)
    return vec + model.vector_in(pooled.astype(dtype))


class FluxTrunk(nn.Module):
    """What the FLUX transformer and its ControlNets share, built from `cfg` (a
    ControlNet's `block_config()`): the input projections `img_in`, `txt_in`, the
    embedders `time_in`, `vector_in` (+ `guidance_in` when guidance is embedded) and the
    `double_blocks` / `single_blocks` stacks. Subclasses set `config`."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        h = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, h)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, h)
        self.time_in = MLPEmbedder(256, h)
        self.vector_in = MLPEmbedder(cfg.pooled_projection_dim, h)
        if cfg.guidance_embeds:
            self.guidance_in = MLPEmbedder(256, h)
        self.double_blocks = [DoubleBlock(cfg) for _ in range(cfg.num_layers)]
        self.single_blocks = [SingleBlock(cfg) for _ in range(cfg.num_single_layers)]

    def embed_conditioning(self, timestep, pooled, guidance=None) -> mx.array:
        """The modulation vector (B, hidden); see `embed_conditioning`."""
        return embed_conditioning(self, timestep, pooled, guidance)


class FluxTransformer(FluxTrunk):
    """FLUX.1 MM-DiT. See `__call__` for shapes."""

    def __init__(self, cfg: FluxConfig):
        super().__init__(cfg)
        self.config = cfg
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.out_channels)

    def rope(self, img_ids: mx.array, txt_ids: mx.array) -> mx.array:
        """RoPE table for [text, image] tokens, (L + N, head_dim/2, 2) float32."""
        ids = mx.concatenate([txt_ids, img_ids], axis=0)
        return rope_table(ids, self.config.axes_dims_rope, self.config.theta)

    def embed(self, img, txt, timestep, pooled, guidance=None):
        """(image tokens (B, N, hidden), text tokens (B, L, hidden), modulation vector
        (B, hidden)): the input projections and `embed_conditioning`."""
        dtype = self.img_in.weight.dtype
        vec = self.embed_conditioning(timestep, pooled, guidance)
        return self.img_in(img.astype(dtype)), self.txt_in(txt.astype(dtype)), vec

    def blocks(
        self,
        x: mx.array,
        ctx: mx.array,
        vec: mx.array,
        rope: mx.array,
        *,
        start: int = 0,
        stop: int | None = None,
        controlnet: Sequence[ControlResiduals] = (),
        ip: Sequence[IPAdapterKV] = (),
        replace: Mapping[str, tuple[mx.array, ...]] | None = None,
        record: Collection[str] = (),
    ) -> BlockPass:
        """Blocks `start` to `stop` (exclusive) of the stack (double blocks, then single
        blocks), each followed by its ControlNet residual.

        x (B, N, hidden), ctx (B, L, hidden): the streams entering block `start`; vec
        (B, hidden) from `embed`. replace: unit name (see `cache_units`) -> outputs that
        stand in for that unit (a step cache's prediction); record: unit names whose
        outputs are returned in `BlockPass.taps`. Unit outputs: `transformer_blocks.i`
        (text, image), `transformer_blocks.i.attn` `DoubleBlock.attend`'s tuple,
        `single_transformer_blocks.i[.attn]` one joint (B, L + N, hidden) array.
        """
        n_double = len(self.double_blocks)
        stop = n_double + len(self.single_blocks) if stop is None else stop
        replace, taps = replace or {}, {}
        silu_vec = nn.silu(vec)
        x, ctx, raw = self._double_pass(x, ctx, silu_vec, rope, range(start, min(stop, n_double)),
                                        controlnet, ip, replace, record, taps)
        if stop <= n_double:
            return BlockPass(x, ctx, raw, taps)
        return self._single_pass(x, ctx, raw, silu_vec, rope,
                                 range(max(start - n_double, 0), stop - n_double),
                                 controlnet, replace, record, taps)

    def _double_pass(self, x, ctx, silu_vec, rope, indices, controlnet, ip, replace, record,
                     taps) -> tuple[mx.array, mx.array, mx.array]:
        """Double blocks `indices` of `blocks` (arguments as there; `taps` filled in place):
        (image stream after its ControlNet residual, text stream, image stream before it)."""
        n_double, n_single = len(self.double_blocks), len(self.single_blocks)
        raw = x
        for i in indices:
            name = f"transformer_blocks.{i}"
            if name in replace:
                ctx, x = replace[name]
            else:
                block = self.double_blocks[i]
                mods = block.modulation(silu_vec)
                outs = replace.get(f"{name}.attn") or block.attend(x, ctx, mods, rope, ip, i)
                if f"{name}.attn" in record:
                    taps[f"{name}.attn"] = outs
                x, ctx = block.finish(x, ctx, mods, outs)
            if name in record:
                taps[name] = (ctx, x)
            raw, x = x, add_control(x, controlnet, i, i + 1, n_double, n_single)
        return x, ctx, raw

    def _single_pass(self, x, ctx, raw, silu_vec, rope, indices, controlnet, replace, record,
                     taps) -> BlockPass:
        """Single blocks `indices` of `blocks` on the joint [text, image] stream (arguments
        as there; raw: the image stream before the last ControlNet residual; `taps` filled
        in place)."""
        n_double, n_single = len(self.double_blocks), len(self.single_blocks)
        n_txt = ctx.shape[1]
        joint = mx.concatenate([ctx, x], axis=1)
        for j in indices:
            name = f"single_transformer_blocks.{j}"
            if name in replace:
                joint = replace[name][0]
            else:
                given = replace.get(f"{name}.attn", (None,))[0]
                joint, attn = self.single_blocks[j].forward(joint, silu_vec, rope, given)
                if f"{name}.attn" in record:
                    taps[f"{name}.attn"] = (attn,)
            if name in record:
                taps[name] = (joint,)
            raw = joint[:, n_txt:]
            if any(res.single for res in controlnet):
                img = add_control(raw, controlnet, n_double + j, n_double + j + 1, n_double,
                                  n_single)
                joint = mx.concatenate([joint[:, :n_txt], img], axis=1)
        return BlockPass(joint[:, n_txt:], joint[:, :n_txt], raw, taps)

    def final(self, x: mx.array, vec: mx.array) -> mx.array:
        """The output layer (diffusers norm_out + proj_out): (B, N, out_channels)."""
        return self.final_layer(x, vec)

    def __call__(
        self,
        img: mx.array,
        img_ids: mx.array,
        txt: mx.array,
        txt_ids: mx.array,
        timestep: mx.array,
        pooled: mx.array,
        guidance: mx.array | None = None,
        *,
        controlnet: Sequence[ControlResiduals] | None = None,
        ip: Sequence[IPAdapterKV] | None = None,
        rope: mx.array | None = None,
    ) -> mx.array:
        """One denoiser evaluation: the flow velocity for the image tokens.

        Args:
            img: packed image tokens (B, N, in_channels) (Fill: [noisy 64|masked 64|mask 256]).
            img_ids: (N, 3) position ids (0, row, col); txt_ids: (L, 3), zeros for text.
            txt: T5 hidden states (B, L, joint_attention_dim).
            timestep: (B,) sigma in [0, 1]; guidance: (B,) guidance scale (None if the
                model has no guidance embedding); pooled: CLIP pooled (B, pooled_dim).
            controlnet: residuals per ControlNet, added after each block (interval rule).
            ip: precomputed IP-Adapter keys/values (see IPAdapterKV).
            rope: a precomputed `self.rope(img_ids, txt_ids)` (computed here if None).
        Returns:
            (B, N, out_channels) in the model dtype. Step caches compose the same pieces
            (`embed`, `blocks`, `add_control`, `final`; mlx_edit/sampling/cache.py).
        """
        if rope is None:
            rope = self.rope(img_ids, txt_ids)
        x, ctx, vec = self.embed(img, txt, timestep, pooled, guidance)
        out = self.blocks(x, ctx, vec, rope, controlnet=controlnet or (), ip=ip or ())
        return self.final(out.img, vec)


class BlockPass(NamedTuple):
    """`FluxTransformer.blocks`' result: the image (B, N, hidden) and text (B, L, hidden)
    streams after the last block and its ControlNet residual; `raw`, the last block's image
    output before that residual (diffusers' hooks see block outputs, not the residuals);
    `taps`, the recorded unit outputs."""

    img: mx.array
    txt: mx.array
    raw: mx.array
    taps: dict[str, tuple[mx.array, ...]]


def add_control(x: mx.array, controlnet: Sequence[ControlResiduals], start: int, stop: int,
                n_double: int, n_single: int) -> mx.array:
    """Image tokens x (B, N, hidden) plus the ControlNet residuals of blocks start..stop-1
    (double blocks first, then single), in block order, as diffusers adds them after each
    block (also after blocks a step cache skipped)."""
    for b in range(start, stop):
        for res in controlnet:
            if b < n_double and res.double:
                x = x + res.double[residual_index(b, n_double, len(res.double), res.repeat)]
            elif b >= n_double and res.single:
                x = x + res.single[residual_index(b - n_double, n_single, len(res.single), False)]
    return x


def cache_units(cfg: FluxConfig) -> list[str]:
    """The units a step cache may replace or record, by their diffusers module names
    (FluxTransformer2DModel), in call order: each block and its attention, then proj_out."""
    names = []
    for i in range(cfg.num_layers):
        names += [f"transformer_blocks.{i}", f"transformer_blocks.{i}.attn"]
    for i in range(cfg.num_single_layers):
        names += [f"single_transformer_blocks.{i}", f"single_transformer_blocks.{i}.attn"]
    return [*names, "proj_out"]
