"""The FLUX.2 transformer (klein 4B/9B, dev): MM-DiT with shared modulation.

Reference: diffusers `models/transformers/transformer_flux2.py` (Flux2Transformer2DModel,
Flux2TransformerBlock, Flux2SingleTransformerBlock, Flux2SwiGLU, Flux2Modulation,
Flux2PosEmbed, Flux2TimestepGuidanceEmbeddings) and BFL `flux2/src/flux2/model.py`.

What differs from FLUX.1 (mlx_edit/models/flux.py, whose blocks are shared here):
- no biases; SwiGLU MLPs (`layers.swiglu`: silu(first half) * second half);
- one modulation per stream kind for the whole model (`double_mod_img`, `double_mod_txt`,
  `single_mod`: silu(vec) -> Linear), applied by every block of that kind;
- 4-axis RoPE (time, row, column, text position), theta 2000; text ids are
  (0, 0, 0, position), reference images carry time offsets (`scale + scale * i`);
- only a timestep (+ guidance) embedding, no pooled text vector.

The KV variant (klein 9B-KV, diffusers `Flux2KleinKVPipeline`): reference tokens attend
only to themselves, with their own modulation (timestep 0), so their keys and values in
every block depend on the references alone. `reference_kv` computes them once (diffusers'
`kv_cache_mode="extract"` step, `Flux2KVCache`) and every `__call__(..., kv=...)` lets the
text and image tokens attend to them (its `"cached"` steps; the first step too: the same
attention, computed as a cached call).

Compute layout (ours): fused QKV per stream in double blocks and one fused input
projection (q, k, v, MLP gate and value) per single block, as BFL stores them; loaders map
diffusers' separate projections into it (mlx_edit/weights/flux2.py).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from mlx_edit.models.config import TransformerWidths, transformer_config
from mlx_edit.models.flux import FinalLayer, JointBlock, QKNorm, StreamAttention, append_kv
from mlx_edit.models.layers import (
    MLPEmbedder,
    apply_rope,
    attention,
    embed_scaled,
    modulate,
    rope_table,
    swiglu,
)


@dataclass
class Flux2Config(TransformerWidths):
    """diffusers Flux2Transformer2DModel config (its defaults: FLUX.2 [dev]; klein 4B:
    hidden 3072 = 24 heads x 128, 5 double + 20 single blocks, joint_attention_dim 7680,
    no guidance embedding)."""

    patch_size: int = 1
    in_channels: int = 128
    out_channels: int | None = None
    num_layers: int = 8
    num_single_layers: int = 48
    attention_head_dim: int = 128
    num_attention_heads: int = 48
    joint_attention_dim: int = 15360
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: float = 2000.0
    eps: float = 1e-6
    guidance_embeds: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> Flux2Config:
        """From a diffusers config.json dict (unknown keys ignored, null out_channels =
        in_channels). ValueError for a patch size other than 1, an eps other than 1e-6
        (the norms are built with 1e-6) or RoPE axes not summing to the head dim."""
        cfg = transformer_config(cls, d, "FLUX.2")
        if cfg.eps != 1e-6:
            raise ValueError(f"eps {cfg.eps} is not supported (FLUX.2 uses 1e-6)")
        return cfg

    def reference_kv_bytes(self, n_ref_tokens: int, batch: int = 1, itemsize: int = 2) -> int:
        """Bytes of `Flux2Transformer.reference_kv` for `n_ref_tokens` reference tokens:
        a key and a value (batch, n_ref_tokens, hidden) per block, `itemsize` bytes each."""
        blocks = self.num_layers + self.num_single_layers
        return 2 * blocks * batch * n_ref_tokens * self.hidden_size * itemsize


class SwiGLUMLP(nn.Module):
    """Linear (hidden -> 2 * mlp_hidden) -> SwiGLU -> Linear, no biases (Flux2FeedForward)."""

    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, 2 * mlp_hidden, bias=False)
        self.fc2 = nn.Linear(mlp_hidden, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(swiglu(self.fc1(x)))


class Flux2DoubleBlock(JointBlock):
    """Joint [text, image] attention + SwiGLU MLPs; modulation comes from the model."""

    def __init__(self, cfg: Flux2Config):
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.img_attn = StreamAttention(h, cfg.attention_head_dim, bias=False)
        self.txt_attn = StreamAttention(h, cfg.attention_head_dim, bias=False)
        self.img_mlp = SwiGLUMLP(h, cfg.mlp_hidden)
        self.txt_mlp = SwiGLUMLP(h, cfg.mlp_hidden)

    def __call__(self, img, txt, mods, rope, kv=None):
        """(image (B, N, hidden), text (B, L, hidden)) after the block; mods: (image,
        text) lists of 6 vectors (B, hidden) (`Flux2Transformer.modulations`); kv: the
        block's cached reference (k, v) (`ReferenceKV`), attended to by every token."""
        return self.finish(img, txt, mods, self.attend(img, txt, mods, rope, kv=kv))

    def reference(self, ref: mx.array, mods, rope: mx.array):
        """Reference tokens ref (B, R, hidden) through the image stream, attending only to
        themselves (diffusers `_flux2_kv_causal_attention`): (ref after the block, their
        (k, v) (B, H, R, D) after QK norm and RoPE). mods: the image stream's 6 vectors
        at the references' timestep; rope: (R, D/2, 2) of the references' ids."""
        q, k, v = self.img_attn.qkv_heads(modulate(ref, mods[0], mods[1]), self.heads)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        ref = ref + mods[2][:, None] * self.img_attn.proj(attention(q, k, v))
        return ref + mods[5][:, None] * self.img_mlp(modulate(ref, mods[3], mods[4])), (k, v)


class Flux2SingleBlock(QKNorm):
    """Parallel attention + SwiGLU MLP over the joint sequence, one fused input projection
    (q, k, v, gate, value) and one fused output projection; no biases."""

    def __init__(self, cfg: Flux2Config):
        super().__init__(cfg.attention_head_dim)
        h, m = cfg.hidden_size, cfg.mlp_hidden
        self.heads = cfg.num_attention_heads
        self.hidden = h
        self.linear1 = nn.Linear(h, 3 * h + 2 * m, bias=False)
        self.linear2 = nn.Linear(h + m, h, bias=False)

    def __call__(self, x: mx.array, mods, rope: mx.array, kv=None) -> mx.array:
        """x (B, L + N, hidden) after the block; mods: (shift, scale, gate) (B, hidden);
        kv: the block's cached reference (k, v) (`ReferenceKV`), attended to by every token."""
        return self.forward(x, mods, rope, kv)[0]

    def forward(self, x: mx.array, mods, rope: mx.array, kv=None, attn: mx.array | None = None):
        """(x after the block, the (k, v) (B, H, L + N, D) of x's tokens after QK norm
        and RoPE, `attend`'s output); see `__call__`. attn: a given `attend` output
        (B, L + N, hidden) (a step cache's prediction) used instead: nothing else runs
        and (k, v) is None."""
        k_v = None
        if attn is None:
            attn, k_v = self.attend(x, mods, rope, kv)
        return x + mods[2][:, None] * attn, k_v, attn

    def attend(self, x: mx.array, mods, rope: mx.array, kv=None):
        """(diffusers `single_transformer_blocks.i.attn`, Flux2ParallelSelfAttention: the
        fused attention + SwiGLU MLP after the output projection (B, L + N, hidden), the
        (k, v) of x's tokens); arguments as `__call__`."""
        shift, scale, _ = mods
        qkv, mlp = mx.split(self.linear1(modulate(x, shift, scale)), [3 * self.hidden], axis=-1)
        q, k, v = self.rotated_heads(qkv, self.heads, rope)
        out = mx.concatenate([attention(q, *append_kv(k, v, kv)), swiglu(mlp)], axis=-1)
        return self.linear2(out), (k, v)


def positions(ids: mx.array) -> mx.array:
    """Position ids (N, 4) from (N, 4) or (B, N, 4): the first batch row, as diffusers
    uses (`img_ids[0]`); ValueError for another shape."""
    if ids.ndim == 3:
        ids = ids[0]
    if ids.ndim != 2:
        raise ValueError(f"position ids must be (N, axes) or (B, N, axes), got {ids.shape}")
    return ids


class Flux2Transformer(nn.Module):
    """FLUX.2 MM-DiT. See `__call__` for shapes; the loop's hook points are `rope`,
    `embed`, `modulations`, `blocks` and `final` (`__call__` composes them)."""

    def __init__(self, cfg: Flux2Config):
        super().__init__()
        self.config = cfg
        h, channels = cfg.hidden_size, cfg.timestep_guidance_channels
        self.img_in = nn.Linear(cfg.in_channels, h, bias=False)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, h, bias=False)
        self.time_in = MLPEmbedder(channels, h, bias=False)
        if cfg.guidance_embeds:
            self.guidance_in = MLPEmbedder(channels, h, bias=False)
        self.double_mod_img = nn.Linear(h, 6 * h, bias=False)
        self.double_mod_txt = nn.Linear(h, 6 * h, bias=False)
        self.single_mod = nn.Linear(h, 3 * h, bias=False)
        self.double_blocks = [Flux2DoubleBlock(cfg) for _ in range(cfg.num_layers)]
        self.single_blocks = [Flux2SingleBlock(cfg) for _ in range(cfg.num_single_layers)]
        self.final_layer = FinalLayer(h, cfg.out_channels, bias=False)

    def rope(self, img_ids: mx.array, txt_ids: mx.array) -> mx.array:
        """RoPE table for [text, image] tokens, (L + N, head_dim/2, 2) float32; ids (N, 4)
        / (L, 4), or batched (B, N, 4) whose first row is used (see `positions`)."""
        ids = mx.concatenate([positions(txt_ids), positions(img_ids)], axis=0)
        return rope_table(ids, self.config.axes_dims_rope, self.config.rope_theta)

    def conditioning(self, timestep: mx.array, guidance: mx.array | None = None) -> mx.array:
        """The conditioning vector vec (B, hidden): the timestep (+ guidance) embedding.

        timestep (B,): sigma in [0, 1] (the klein pipelines pass `t / 1000`); guidance
        (B,): the raw guidance scale; both are multiplied by 1000 here, as diffusers does.
        Raises ValueError when guidance is given to a model without guidance embedding.
        """
        dtype = self.img_in.weight.dtype
        channels = self.config.timestep_guidance_channels
        vec = embed_scaled(self.time_in, timestep, dtype, channels)
        if guidance is not None:  # diffusers: no guidance -> the timestep embedding alone
            if not self.config.guidance_embeds:
                raise ValueError("this FLUX.2 model has no guidance embedding: pass guidance=None")
            vec = vec + embed_scaled(self.guidance_in, guidance, dtype, channels)
        return vec

    def embed(self, img, txt, timestep, guidance=None):
        """(image tokens (B, N, hidden), text tokens (B, L, hidden), vec (B, hidden)): the
        input projections and `conditioning(timestep, guidance)`."""
        dtype = self.img_in.weight.dtype
        vec = self.conditioning(timestep, guidance)
        return self.img_in(img.astype(dtype)), self.txt_in(txt.astype(dtype)), vec

    def modulations(self, vec: mx.array) -> Flux2Mods:
        """The shared modulation vectors of every block from vec (B, hidden)."""
        s = nn.silu(vec)
        return Flux2Mods(
            (mx.split(self.double_mod_img(s), 6, axis=-1),
             mx.split(self.double_mod_txt(s), 6, axis=-1)),
            mx.split(self.single_mod(s), 3, axis=-1),
        )

    def reference_kv(self, ref: mx.array, ref_ids: mx.array, guidance: mx.array | None = None,
                     *, timestep: float = 0.0) -> ReferenceKV:
        """The keys and values of reference tokens in every block, for `__call__(kv=...)`
        (the KV variant: references attend only to themselves; diffusers
        `Flux2Transformer2DModel.forward(kv_cache_mode="extract")`, `Flux2KVCache`).

        ref: packed reference latents (B, R, in_channels) (B = 1 serves any batch);
        ref_ids: (R, 4) or (B, R, 4) their position ids (time `scale + scale * i`);
        guidance: as for `__call__`, (B,) or None; timestep: the references' fixed
        modulation timestep (diffusers `ref_fixed_timestep`, 0). Returns (k, v) pairs
        (B, heads, R, head_dim) in the model dtype, after QK norm and RoPE; memory:
        `Flux2Config.reference_kv_bytes`.
        """
        dtype = self.img_in.weight.dtype
        mods = self.modulations(self.conditioning(mx.full((ref.shape[0],), timestep), guidance))
        rope = rope_table(positions(ref_ids), self.config.axes_dims_rope, self.config.rope_theta)
        x, double, single = self.img_in(ref.astype(dtype)), [], []
        for block in self.double_blocks:
            x, kv = block.reference(x, mods.double[0], rope)
            double.append(kv)
        for block in self.single_blocks:
            x, kv, _ = block.forward(x, mods.single, rope)
            single.append(kv)
        return ReferenceKV(double, single)

    def blocks(self, x: mx.array, ctx: mx.array, mods: Flux2Mods, rope: mx.array, *,
               start: int = 0, stop: int | None = None, kv: ReferenceKV | None = None,
               replace: Mapping[str, tuple[mx.array, ...]] | None = None,
               record: Collection[str] = (), taps: dict | None = None,
               ) -> tuple[mx.array, mx.array]:
        """Blocks `start` to `stop` (exclusive) of the stack (double blocks, then single
        blocks): x (B, N, hidden) and ctx (B, L, hidden) entering block `start` ->
        (image stream, text stream) after block `stop - 1`; kv: `reference_kv`'s.

        Step-cache units by diffusers' Flux2Transformer2DModel names: replace maps a unit
        to outputs standing in for it, the units in record have their outputs put in
        `taps` (in place). Outputs: `transformer_blocks.i` (text, image),
        `transformer_blocks.i.attn` (image, text) after the output projections,
        `single_transformer_blocks.i` (joint,), `single_transformer_blocks.i.attn`
        (joint,) (the fused attention + MLP before the gate)."""
        n_double = len(self.double_blocks)
        stop = n_double + len(self.single_blocks) if stop is None else stop
        kv_double, kv_single = kv or ([None] * n_double, [None] * len(self.single_blocks))
        replace, taps = replace or {}, {} if taps is None else taps
        for i in range(start, min(stop, n_double)):
            name = f"transformer_blocks.{i}"
            if name in replace:
                ctx, x = replace[name]
            else:
                block = self.double_blocks[i]
                outs = replace.get(f"{name}.attn") or block.attend(x, ctx, mods.double, rope,
                                                                   kv=kv_double[i])
                _tap(taps, record, f"{name}.attn", outs)
                x, ctx = block.finish(x, ctx, mods.double, outs)
            _tap(taps, record, name, (ctx, x))
        if stop <= n_double:
            return x, ctx
        n_txt = ctx.shape[1]
        joint = mx.concatenate([ctx, x], axis=1)
        for j in range(max(start - n_double, 0), stop - n_double):
            name = f"single_transformer_blocks.{j}"
            if name in replace:
                joint = replace[name][0]
            else:
                given = replace.get(f"{name}.attn", (None,))[0]
                joint, _, attn = self.single_blocks[j].forward(joint, mods.single, rope,
                                                               kv_single[j], given)
                _tap(taps, record, f"{name}.attn", (attn,))
            _tap(taps, record, name, (joint,))
        return joint[:, n_txt:], joint[:, :n_txt]

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
        guidance: mx.array | None = None,
        *,
        rope: mx.array | None = None,
        kv: ReferenceKV | None = None,
    ) -> mx.array:
        """One denoiser evaluation: the flow velocity of every image token given.

        Args:
            img: packed tokens (B, N, in_channels): the noisy latents' tokens, then any
                reference images' tokens (the caller keeps the velocity of the first ones).
            img_ids: (N, 4) or (B|1, N, 4) position ids (time, row, col, 0); references
                carry time `scale + scale * i` (diffusers `_prepare_image_ids`).
            txt: prompt embeddings (B, L, joint_attention_dim) (stacked Qwen3 layers).
            txt_ids: (L, 4) or (B|1, L, 4) ids (0, 0, 0, position).
            timestep: (B,) sigma in [0, 1] (not diffusers' 0..1000 scheduler timestep).
            guidance: (B,) guidance scale for guidance-embedding models, else None.
            rope: a precomputed `self.rope(img_ids, txt_ids)` (computed here if None).
            kv: `reference_kv(...)` of the references (KV variant): every text and image
                token also attends to them; `img` then holds no reference tokens.
        Returns:
            (B, N, out_channels) in the model dtype.
        Raises:
            ValueError: guidance given to a model without guidance embedding; malformed ids.
        """
        if rope is None:
            rope = self.rope(img_ids, txt_ids)
        x, ctx, vec = self.embed(img, txt, timestep, guidance)
        x, _ = self.blocks(x, ctx, self.modulations(vec), rope, kv=kv)
        return self.final(x, vec)


class Flux2Mods(NamedTuple):
    """`Flux2Transformer.modulations`: `double` = (image, text) lists of 6 vectors
    (B, hidden) for every double block; `single` = (shift, scale, gate) for every single
    block."""

    double: tuple[list[mx.array], list[mx.array]]
    single: list[mx.array]


class ReferenceKV(NamedTuple):
    """`Flux2Transformer.reference_kv`: one (k, v) pair per double block (`double`) and
    per single block (`single`), each (B, heads, R, head_dim) after QK norm and RoPE."""

    double: list[tuple[mx.array, mx.array]]
    single: list[tuple[mx.array, mx.array]]


def _tap(taps: dict, record: Collection[str], name: str, outputs: tuple) -> None:
    if name in record:
        taps[name] = outputs
