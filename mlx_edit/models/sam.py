"""SAM 2.1 image model in MLX: image encoder, prompt encoder, two-way mask decoder.

Reference: transformers `models/sam2/modeling_sam2.py` (Sam2Model, Sam2PromptEncoder,
Sam2PositionalEmbedding, Sam2MaskEmbedding, Sam2MaskDecoder, Sam2TwoWayTransformer) and
"SAM 2: Segment Anything in Images and Videos" (Ravi et al. 2024). The Hiera encoder and
FPN neck are in `sam_hiera.py`. Layout is NHWC; point and box coordinates are pixels of the
model's square input (`image_size`, 1024 for the released checkpoints).

Usage: `emb = model.image_embeddings(pixels)` once per image, then any number of
`model.decode(emb, points=..., labels=..., boxes=...)` calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from mlx_edit.models.config import known_fields
from mlx_edit.models.layers import activation
from mlx_edit.models.sam_hiera import FeedForward, LayerNorm, VisionConfig, VisionEncoder

PAD_LABEL = -10  # transformers' padding label: the point contributes a zero embedding
NOT_A_POINT = -1  # SAM's "no point" label


@dataclass
class PromptEncoderConfig:
    """transformers `Sam2PromptEncoderConfig`."""

    hidden_size: int = 256
    image_size: int = 1024
    patch_size: int = 16
    mask_input_channels: int = 16
    num_point_embeddings: int = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    scale: float = 1.0

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid: image_size // patch_size (64 at 1024 px)."""
        return self.image_size // self.patch_size


@dataclass
class MaskDecoderConfig:
    """transformers `Sam2MaskDecoderConfig`."""

    hidden_size: int = 256
    mlp_dim: int = 2048
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    dynamic_multimask_via_stability: bool = True
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98


@dataclass
class SamConfig:
    """transformers `Sam2Config` (a checkpoint's `config.json`; defaults: sam2.1-hiera-tiny)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    prompt_encoder: PromptEncoderConfig = field(default_factory=PromptEncoderConfig)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)

    @classmethod
    def from_dict(cls, d: dict) -> SamConfig:
        """Build from `config.json`; unknown keys are ignored, missing ones take defaults."""
        pe = d.get("prompt_encoder_config") or {}
        md = d.get("mask_decoder_config") or {}
        return cls(VisionConfig.from_dict(d.get("vision_config") or {}),
                   PromptEncoderConfig(**known_fields(PromptEncoderConfig, pe)),
                   MaskDecoderConfig(**known_fields(MaskDecoderConfig, md)))

    @property
    def image_size(self) -> int:
        """Side of the square model input in pixels."""
        return self.prompt_encoder.image_size


class PositionalEmbedding(nn.Module):
    """Random Fourier features of coordinates in [0, 1]^2: (..., 2) -> (..., hidden)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.positional_embedding = mx.zeros((2, hidden // 2))  # a buffer in transformers

    def __call__(self, coords: mx.array) -> mx.array:
        x = (2 * coords - 1) @ self.positional_embedding * (2 * math.pi)
        return mx.concatenate([mx.sin(x), mx.cos(x)], axis=-1)


class MaskEmbedding(nn.Module):
    """Dense prompt from a low-res mask: (B, 4h, 4w, 1) logits -> (B, h, w, hidden)."""

    def __init__(self, cfg: PromptEncoderConfig):
        super().__init__()
        c = cfg.mask_input_channels
        self.conv1 = nn.Conv2d(1, c // 4, 2, stride=2)
        self.layer_norm1 = LayerNorm(c // 4, cfg.layer_norm_eps)
        self.conv2 = nn.Conv2d(c // 4, c, 2, stride=2)
        self.layer_norm2 = LayerNorm(c, cfg.layer_norm_eps)
        self.conv3 = nn.Conv2d(c, cfg.hidden_size, 1)
        self.act = activation(cfg.hidden_act)

    def __call__(self, masks: mx.array) -> mx.array:
        x = self.act(self.layer_norm1(self.conv1(masks)))
        x = self.act(self.layer_norm2(self.conv2(x)))
        return self.conv3(x)


class PromptEncoder(nn.Module):
    """Sam2PromptEncoder: points/labels, boxes and a mask -> sparse and dense embeddings."""

    def __init__(self, cfg: PromptEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.shared_embedding = PositionalEmbedding(cfg.hidden_size)
        self.mask_embed = MaskEmbedding(cfg)
        self.no_mask_embed = nn.Embedding(1, cfg.hidden_size)
        self.point_embed = nn.Embedding(cfg.num_point_embeddings, cfg.hidden_size)
        self.not_a_point_embed = nn.Embedding(1, cfg.hidden_size)

    def embed_points(self, points: mx.array, labels: mx.array, pad: bool) -> mx.array:
        """points (B, P, N, 2) input pixels, labels (B, P, N) int -> (B, P, N[+1], hidden)."""
        points = points + 0.5  # pixel centres
        if pad:  # SAM appends a not-a-point when there is no box
            points = mx.pad(points, [(0, 0), (0, 0), (0, 1), (0, 0)])
            labels = mx.pad(labels, [(0, 0), (0, 0), (0, 1)], constant_values=NOT_A_POINT)
        emb = self.shared_embedding(points / self.cfg.image_size)
        lab = labels[..., None]
        emb = mx.where(lab == NOT_A_POINT, self.not_a_point_embed.weight[0], emb)
        emb = mx.where(lab == PAD_LABEL, 0.0, emb)
        typed = self.point_embed.weight[mx.maximum(labels, 0)]
        return emb + typed * (lab >= 0)

    def embed_boxes(self, boxes: mx.array) -> mx.array:
        """boxes (B, P, 4) x0, y0, x1, y1 input pixels -> (B, P, 3, hidden)."""
        b, p = boxes.shape[:2]
        corners = (boxes + 0.5).reshape(b, p, 2, 2) / self.cfg.image_size
        emb = self.shared_embedding(corners) + self.point_embed.weight[2:4]
        pad = mx.broadcast_to(self.not_a_point_embed.weight, (b, p, 1, emb.shape[-1]))
        return mx.concatenate([emb, pad], axis=2)

    def __call__(self, points, labels, boxes, masks, batch: int) -> tuple[mx.array, mx.array]:
        """-> sparse (B, P, T, hidden), dense (B, h, w, hidden)."""
        parts = []
        if points is not None:
            parts.append(self.embed_points(points, labels, pad=boxes is None))
        if boxes is not None:
            parts.append(self.embed_boxes(boxes))
        sparse = mx.concatenate(parts, axis=2)
        if masks is not None:
            dense = self.mask_embed(masks)
        else:
            n = self.cfg.embedding_size
            dense = mx.broadcast_to(self.no_mask_embed.weight[0], (batch, n, n, self.cfg.hidden_size))
        return sparse, dense


class Attention(nn.Module):
    """Sam2Attention / Sam3Attention: multi-head attention with an internal width
    hidden // downsample (any config with `hidden_size` and `num_attention_heads`)."""

    def __init__(self, cfg: MaskDecoderConfig, downsample: int = 1):
        super().__init__()
        inner = cfg.hidden_size // downsample
        self.heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, inner)
        self.k_proj = nn.Linear(cfg.hidden_size, inner)
        self.v_proj = nn.Linear(cfg.hidden_size, inner)
        self.o_proj = nn.Linear(inner, cfg.hidden_size)

    def __call__(self, q: mx.array, k: mx.array, v: mx.array,
                 mask: mx.array | None = None) -> mx.array:
        """q (B, Lq, C), k/v (B, Lk, C) -> (B, Lq, C). mask: broadcastable to
        (B, heads, Lq, Lk), boolean (True = attend) or an additive float bias."""
        def heads(x):
            return x.reshape(x.shape[0], x.shape[1], self.heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5,
                                                   mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(out.shape[0], out.shape[2], -1))


class TwoWayBlock(nn.Module):
    """Sam2TwoWayAttentionBlock: token self-attention, token->image, MLP, image->token."""

    def __init__(self, cfg: MaskDecoderConfig, skip_first_layer_pe: bool):
        super().__init__()
        d = cfg.attention_downsample_rate
        self.self_attn = Attention(cfg, 1)
        self.cross_attn_token_to_image = Attention(cfg, d)
        self.mlp = FeedForward(cfg.hidden_size, cfg.mlp_dim, cfg.hidden_size, cfg.num_hidden_layers)
        self.cross_attn_image_to_token = Attention(cfg, d)
        for i in range(1, 5):  # torch nn.LayerNorm default eps
            setattr(self, f"layer_norm{i}", LayerNorm(cfg.hidden_size, 1e-5))
        self.skip_first_layer_pe = skip_first_layer_pe

    def __call__(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.layer_norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.layer_norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.layer_norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.layer_norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, cfg: MaskDecoderConfig):
        super().__init__()
        self.layers = [TwoWayBlock(cfg, i == 0) for i in range(cfg.num_hidden_layers)]
        self.final_attn_token_to_image = Attention(cfg, cfg.attention_downsample_rate)
        self.layer_norm_final_attn = LayerNorm(cfg.hidden_size, 1e-5)

    def __call__(self, tokens, image, image_pe):
        """tokens (B, T, C), image/image_pe (B, hw, C) -> tokens, image (same shapes)."""
        queries, keys = tokens, image
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, image_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + image_pe, keys)
        return self.layer_norm_final_attn(queries + attn), keys


class Upsample2x(nn.Module):
    """ConvTranspose2d with kernel = stride = 2 as one matmul and a pixel shuffle.

    weight keeps torch's layout (in, out, 2, 2); (B, h, w, in) -> (B, 2h, 2w, out)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.weight = mx.zeros((dim_in, dim_out, 2, 2))
        self.bias = mx.zeros((dim_out,))

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, _ = x.shape
        c_out = self.weight.shape[1]
        w_mat = self.weight.transpose(0, 2, 3, 1).reshape(self.weight.shape[0], -1)
        y = (x @ w_mat).reshape(b, h, w, 2, 2, c_out).transpose(0, 1, 3, 2, 4, 5)
        return y.reshape(b, 2 * h, 2 * w, c_out) + self.bias


class MaskDecoder(nn.Module):
    """Sam2MaskDecoder: image embedding + prompt tokens -> mask logits, IoU, object score."""

    def __init__(self, cfg: MaskDecoderConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.hidden_size
        self.num_mask_tokens = cfg.num_multimask_outputs + 1
        self.obj_score_token = nn.Embedding(1, c)
        self.iou_token = nn.Embedding(1, c)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, c)
        self.transformer = TwoWayTransformer(cfg)
        self.upscale_conv1 = Upsample2x(c, c // 4)
        self.upscale_layer_norm = LayerNorm(c // 4, 1e-6)
        self.upscale_conv2 = Upsample2x(c // 4, c // 8)
        self.output_hypernetworks_mlps = [FeedForward(c, c, c // 8, 3)
                                          for _ in range(self.num_mask_tokens)]
        self.iou_prediction_head = FeedForward(c, cfg.iou_head_hidden_dim, self.num_mask_tokens,
                                               cfg.iou_head_depth, sigmoid_output=True)
        # 1x1 convolutions on the two high-resolution FPN levels, run once per image
        self.conv_s0 = nn.Linear(c, c // 8)
        self.conv_s1 = nn.Linear(c, c // 4)
        self.pred_obj_score_head = FeedForward(c, c, 1, 3)

    def __call__(self, image, image_pe, sparse, dense, high_res, multimask: bool):
        """image (B, h, w, C), image_pe (1, h, w, C), sparse (B, P, T, C), dense (B, h, w, C),
        high_res [(B, 4h, 4w, C/8), (B, 2h, 2w, C/4)] -> masks (B, P, M, 4h, 4w) logits,
        iou (B, P, M), object score logits (B, P, 1); M = 3 if multimask else 1."""
        b, h, w, c = image.shape
        p = sparse.shape[1]
        out_tokens = mx.concatenate([self.obj_score_token.weight, self.iou_token.weight,
                                     self.mask_tokens.weight], axis=0)
        out_tokens = mx.broadcast_to(out_tokens, (b, p, *out_tokens.shape))
        tokens = mx.concatenate([out_tokens, sparse], axis=2).reshape(b * p, -1, c)

        def per_prompt(x):  # (B, ...) -> (B * P, ...), image-major as repeat_interleave
            return mx.repeat(x, p, axis=0)

        src = per_prompt((image + dense).reshape(b, h * w, c))
        pos = mx.broadcast_to(image_pe.reshape(1, h * w, c), src.shape)
        tokens, src = self.transformer(tokens, src, pos)
        gelu = nn.gelu
        s0, s1 = (per_prompt(f) for f in high_res)
        up = self.upscale_conv1(src.reshape(b * p, h, w, c)) + s1
        up = gelu(self.upscale_layer_norm(up))
        up = gelu(self.upscale_conv2(up) + s0)
        hyper = mx.stack([mlp(tokens[:, 2 + i]) for i, mlp in
                          enumerate(self.output_hypernetworks_mlps)], axis=1)
        hh, ww = up.shape[1:3]
        masks = (hyper @ up.reshape(b * p, hh * ww, -1).transpose(0, 2, 1))
        masks = masks.reshape(b, p, self.num_mask_tokens, hh, ww)
        iou = self.iou_prediction_head(tokens[:, 1]).reshape(b, p, -1)
        obj = self.pred_obj_score_head(tokens[:, 0]).reshape(b, p, 1)
        if multimask:
            return masks[:, :, 1:], iou[:, :, 1:], obj
        if self.cfg.dynamic_multimask_via_stability:
            return (*self.stable_single_mask(masks, iou), obj)
        return masks[:, :, :1], iou[:, :, :1], obj

    def stable_single_mask(self, masks: mx.array, iou: mx.array) -> tuple[mx.array, mx.array]:
        """Single-mask output: token 0's mask when its stability score (IoU of the masks at
        +-delta) reaches the threshold, else the multimask output with the best IoU."""
        delta = self.cfg.dynamic_multimask_stability_delta
        single = masks[:, :, :1]
        flat = single.reshape(*single.shape[:3], -1)
        inter = (flat > delta).sum(axis=-1).astype(mx.float32)
        union = (flat > -delta).sum(axis=-1).astype(mx.float32)
        stable = mx.where(union > 0, inter / mx.maximum(union, 1), 1.0)
        stable = stable >= self.cfg.dynamic_multimask_stability_thresh  # (B, P, 1)
        best = mx.argmax(iou[:, :, 1:], axis=-1)[..., None]  # (B, P, 1)
        best_iou = mx.take_along_axis(iou[:, :, 1:], best, axis=-1)
        best_mask = mx.take_along_axis(masks[:, :, 1:], best[..., None, None], axis=2)
        return (mx.where(stable[..., None, None], single, best_mask),
                mx.where(stable, iou[:, :, :1], best_iou))


@dataclass
class ImageEmbeddings:
    """What the decoder needs from one image batch: `embedding` (B, h, w, C) with the
    no-memory embedding added, `high_res` [(B, 4h, 4w, C/8), (B, 2h, 2w, C/4)]."""

    embedding: mx.array
    high_res: list


class SamModel(nn.Module):
    """transformers Sam2Model (image mode); parameter names follow its checkpoint layout."""

    def __init__(self, cfg: SamConfig):
        super().__init__()
        self.cfg = cfg
        self.shared_image_embedding = PositionalEmbedding(cfg.prompt_encoder.hidden_size)
        self.vision_encoder = VisionEncoder(cfg.vision)
        self.prompt_encoder = PromptEncoder(cfg.prompt_encoder)
        self.mask_decoder = MaskDecoder(cfg.mask_decoder)
        self.no_memory_embedding = mx.zeros((1, 1, cfg.vision.fpn_hidden_size))

    def image_embeddings(self, pixels: mx.array) -> ImageEmbeddings:
        """pixels (B, S, S, 3) float, ImageNet-normalised, S = cfg.image_size."""
        feats = self.vision_encoder(pixels)
        high_res = [self.mask_decoder.conv_s0(feats[0]), self.mask_decoder.conv_s1(feats[1])]
        return ImageEmbeddings(feats[-1] + self.no_memory_embedding[0], high_res)

    def image_positional_embedding(self) -> mx.array:
        """(1, h, w, C) Fourier features of the embedding grid's cell centres."""
        n = self.cfg.prompt_encoder.embedding_size
        centres = (mx.arange(n, dtype=mx.float32) + 0.5) / n
        grid = mx.stack(mx.meshgrid(centres, centres, indexing="xy"), axis=-1)  # (y, x, [x, y])
        return self.shared_image_embedding(grid)[None]

    def decode(self, emb: ImageEmbeddings, points=None, labels=None, boxes=None, masks=None,
               multimask: bool = True) -> tuple[mx.array, mx.array, mx.array]:
        """Prompts -> (mask logits (B, P, M, 4h, 4w), iou (B, P, M), object logits (B, P, 1)).

        points (B, P, N, 2) float x, y in input pixels with labels (B, P, N) int (1 object,
        0 background, -1 not-a-point, -10 padding); boxes (B, P, 4) x0, y0, x1, y1; masks
        (B, 4h, 4w, 1) low-res logits. P is the number of objects; no prompt at all means
        one not-a-point (as transformers). ValueError when P of points and boxes differ.
        """
        b = emb.embedding.shape[0]
        if points is not None and boxes is not None and points.shape[1] != boxes.shape[1]:
            raise ValueError(f"{points.shape[1]} point sets but {boxes.shape[1]} boxes")
        if points is None and boxes is None:
            points = mx.zeros((b, 1, 1, 2))
            labels = mx.full((b, 1, 1), NOT_A_POINT, dtype=mx.int32)
        elif points is not None and labels is None:
            labels = mx.ones(points.shape[:3], dtype=mx.int32)
        sparse, dense = self.prompt_encoder(points, labels, boxes, masks, b)
        return self.mask_decoder(emb.embedding, self.image_positional_embedding(), sparse,
                                 dense, emb.high_res, multimask)
