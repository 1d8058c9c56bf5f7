"""Dump diffusers / transformers reference outputs for the mlx-edit parity harness.

    python scripts/parity_reference.py --model DIR --out ref.safetensors
        [--device cpu|cuda] [--dtype float32|bfloat16] [--size 64x48] [--steps 2]
        [--guidance 30] [--prompt ...] [--seed 0] [--max-sequence-length N]
        [--strengths 1.0,0.5] [--num-images 1]

Loads DIR (a FLUX.1 Fill diffusers folder, e.g. from scripts/make_tiny_checkpoint.py) with
`FluxFillPipeline.from_pretrained`, runs every component and the whole pipeline on fixed,
seeded inputs and writes ONE safetensors file: the inputs it used and the outputs, so that
`mlx-edit parity REF --model DIR` (mlx_edit/parity.py) can feed the same arrays to MLX.

Layout (images and VAE tensors are NHWC, as mlx-edit; float tensors float32, ids int32):
  input.clip_ids (1, 77)   input.t5_ids (1, L)       the pipeline's own tokenizers' ids
  input.image (H, W, 3) uint8   input.mask (H, W) uint8 (255 = repaint)
  input.vae_image (1, H, W, 3) in [-1, 1]   input.vae_latents (1, H/8, W/8, 16) unscaled
  input.transformer.{img (1, N, 384), txt (1, L, D), pooled (1, P), timestep (1,),
                     guidance (1,), img_ids (N, 3), txt_ids (L, 3)}
  clip.pooled (1, P)   t5.hidden (1, L, D)   vae.encode_mean (1, H/8, W/8, 16)
  vae.decode (1, H, W, 3)   transformer.forward (1, N, 64)
  per pipeline case NAME (metadata "cases"): NAME.noise (B, N, 64) packed initial noise,
  NAME.latents.step{i} (B, N, 64) after each Euler step, NAME.image (B, H, W, 3): the VAE
  decode of the final latents, nominally [-1, 1], before any clamping or rounding.

Determinism (RNGs differ between torch and MLX): the initial noise is injected (`latents=`
at strength 1; at strength < 1 diffusers' `randn_tensor` returns it, so `prepare_latents`
still does the `scale_noise` mixing) and the VAE posterior MODE replaces its samples
(`retrieve_latents` patched to sample_mode="argmax"), see flux-architecture.md "Parity
pitfalls". Reference: diffusers/pipelines/flux/pipeline_flux_fill.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_PROMPT = "a red fox sitting in tall grass, golden hour"
DEFAULT_SIZE = (64, 48)  # (W, H): a 4x3 token grid, cheap even at real FLUX widths
TIMESTEP = 0.7  # sigma fed to the transformer component test
WIDE_T5 = 1024  # T5 width from which the default max_sequence_length drops to 128


@dataclass(frozen=True)
class Case:
    """One pipeline run: key prefix, strength, images per prompt (batch)."""

    name: str
    strength: float
    num_images: int


def default_max_sequence_length(model: Path) -> int:
    """512 (FluxFillPipeline's default) for narrow T5s, 128 for wide ones (CPU time)."""
    cfg = json.loads((model / "text_encoder_2" / "config.json").read_text())
    return 512 if cfg.get("d_model", 0) < WIDE_T5 else 128


def make_cases(strengths: list[float], num_images: int) -> list[Case]:
    """The first strength is case "pipeline", the others "pipeline_strength{100 s}"."""
    cases = []
    for j, s in enumerate(strengths):
        if not 0.0 < s <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {s}")
        name = "pipeline" if j == 0 else f"pipeline_strength{round(100 * s)}"
        cases.append(Case(name, float(s), num_images))
    if len({c.name for c in cases}) != len(cases):
        raise ValueError(f"repeated strengths in {strengths}")
    return cases


def make_image(width: int, height: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth colour pattern with seeded grain, uint8 (H, W, 3), and a rectangular mask
    uint8 (H, W) (255 = repaint) whose edges do not fall on the 8 px latent grid."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    base = np.stack([
        0.5 + 0.4 * np.sin(6.0 * xx + 1.0),
        0.5 + 0.4 * np.cos(5.0 * yy - 0.5),
        0.5 + 0.4 * np.sin(4.0 * (xx + yy)),
    ], axis=-1)
    base += rng.normal(0.0, 0.05, base.shape)
    image = np.clip(np.round(base * 255), 0, 255).astype(np.uint8)
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 + 3 : (3 * height) // 4 + 1, width // 5 : (3 * width) // 4 - 2] = 255
    return image, mask


@contextlib.contextmanager
def _patched(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


@contextlib.contextmanager
def deterministic(noise: torch.Tensor | None):
    """Inside: diffusers' Fill pipeline encodes with the posterior mode, and its
    `randn_tensor` returns `noise` (unpacked (B, 16, h, w)) when given."""
    from diffusers.pipelines.flux import pipeline_flux_fill as pff

    original = pff.retrieve_latents

    def mode_latents(encoder_output, generator=None, sample_mode="sample"):
        return original(encoder_output, generator, sample_mode="argmax")

    def fixed_noise(shape, generator=None, device=None, dtype=None, layout=None):
        if noise is None or tuple(shape) != tuple(noise.shape):
            raise RuntimeError(f"unexpected randn_tensor{tuple(shape)}: no injected noise of "
                               "that shape")
        return noise.to(device=device, dtype=dtype)

    with _patched(pff, "retrieve_latents", mode_latents), \
            _patched(pff, "randn_tensor", fixed_noise):
        yield


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().copy()


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return _np(t.permute(0, 2, 3, 1))


class Dumper:
    """Runs the reference on one pipeline; collects arrays into `self.arrays`."""

    def __init__(self, pipe, device: str, dtype: torch.dtype, seed: int):
        self.pipe, self.device, self.dtype = pipe, device, dtype
        self.rng = np.random.default_rng(seed)
        self.arrays: dict[str, np.ndarray] = {}
        self.timings: dict[str, float] = {}

    def tensor(self, key: str, a: np.ndarray) -> torch.Tensor:
        """Input `a` as a torch tensor in the model dtype; stores its (rounded) values."""
        t = torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(self.device, self.dtype)
        self.arrays[key] = _np(t)
        return t

    def randn(self, key: str, *shape: int) -> torch.Tensor:
        return self.tensor(key, self.rng.standard_normal(shape))

    @contextlib.contextmanager
    def timed(self, name: str):
        t0 = time.perf_counter()
        yield
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.timings[name] = round(time.perf_counter() - t0, 3)

    def text(self, prompt: str, max_sequence_length: int) -> None:
        pipe = self.pipe
        clip_ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        t5_ids = pipe.tokenizer_2(prompt, padding="max_length", max_length=max_sequence_length,
                                  truncation=True, return_tensors="pt").input_ids
        self.arrays["input.clip_ids"] = clip_ids.numpy().astype(np.int32)
        self.arrays["input.t5_ids"] = t5_ids.numpy().astype(np.int32)
        with self.timed("clip"):
            pooled = pipe.text_encoder(clip_ids.to(self.device)).pooler_output
        self.arrays["clip.pooled"] = _np(pooled)
        with self.timed("t5"):
            hidden = pipe.text_encoder_2(t5_ids.to(self.device))[0]
        self.arrays["t5.hidden"] = _np(hidden)

    def vae(self, width: int, height: int) -> None:
        vae, f = self.pipe.vae, self.pipe.vae_scale_factor
        x = self.tensor("input.vae_image", self.rng.uniform(-1, 1, (1, height, width, 3)))
        with self.timed("vae_encode"):
            mean = vae.encode(x.permute(0, 3, 1, 2)).latent_dist.mode()
        self.arrays["vae.encode_mean"] = _nhwc(mean)
        z = self.randn("input.vae_latents", 1, height // f, width // f,
                       vae.config.latent_channels)
        with self.timed("vae_decode"):
            image = vae.decode(z.permute(0, 3, 1, 2)).sample
        self.arrays["vae.decode"] = _nhwc(image)

    def transformer(self, width: int, height: int, txt_len: int, guidance: float) -> None:
        pipe = self.pipe
        cfg = pipe.transformer.config
        h, w = height // (2 * pipe.vae_scale_factor), width // (2 * pipe.vae_scale_factor)
        k = "input.transformer."
        img = self.randn(k + "img", 1, h * w, cfg.in_channels)
        txt = self.randn(k + "txt", 1, txt_len, cfg.joint_attention_dim)
        pooled = self.randn(k + "pooled", 1, cfg.pooled_projection_dim)
        timestep = self.tensor(k + "timestep", np.array([TIMESTEP]))
        g = self.tensor(k + "guidance", np.array([guidance]))
        img_ids = pipe._prepare_latent_image_ids(1, h, w, self.device, self.dtype)
        txt_ids = torch.zeros(txt_len, 3, device=self.device, dtype=self.dtype)
        self.arrays[k + "img_ids"], self.arrays[k + "txt_ids"] = _np(img_ids), _np(txt_ids)
        with self.timed("transformer"):
            out = pipe.transformer(
                hidden_states=img, timestep=timestep, guidance=g if cfg.guidance_embeds else None,
                pooled_projections=pooled, encoder_hidden_states=txt, txt_ids=txt_ids,
                img_ids=img_ids, return_dict=False,
            )[0]
        self.arrays["transformer.forward"] = _np(out)

    def pipeline(self, case: Case, image, mask, prompt: str, *, steps: int, guidance: float,
                 max_sequence_length: int) -> None:
        from PIL import Image

        pipe = self.pipe
        height, width = mask.shape
        n_tok = (height // 16) * (width // 16)
        noise = self.randn(f"{case.name}.noise", case.num_images, n_tok,
                           4 * pipe.vae.config.latent_channels)
        latents_per_step: list[np.ndarray] = []

        def on_step(_pipe, i, t, kwargs):
            latents_per_step.append(_np(kwargs["latents"]))
            return {}

        # Strength 1: `latents=` (diffusers skips scale_noise); below 1, randn_tensor returns
        # the same noise unpacked, so diffusers' own prepare_latents mixes it in.
        unpacked = pipe._unpack_latents(noise, height, width, pipe.vae_scale_factor)
        with deterministic(unpacked), self.timed(case.name):
            latents = pipe(
                prompt=prompt, image=Image.fromarray(image), mask_image=Image.fromarray(mask),
                height=height, width=width, strength=case.strength,
                num_inference_steps=steps, guidance_scale=guidance,
                num_images_per_prompt=case.num_images,
                latents=noise if case.strength == 1.0 else None,
                max_sequence_length=max_sequence_length, output_type="latent",
                callback_on_step_end=on_step, return_dict=False,
            )[0]
            # diffusers' own decode path (pipeline step 8), without postprocess clamping
            z = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
            z = z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            decoded = pipe.vae.decode(z, return_dict=False)[0]
        for i, a in enumerate(latents_per_step):
            self.arrays[f"{case.name}.latents.step{i}"] = a
        self.arrays[f"{case.name}.image"] = _nhwc(decoded)


def load_pipeline(model: Path, device: str, dtype: torch.dtype):
    """FluxFillPipeline.from_pretrained(model) on `device` in `dtype`, quiet."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():  # diffusers 0.42 renamed torch_dtype; older ones need it
        warnings.simplefilter("ignore", FutureWarning)
        pipe = diffusers.FluxFillPipeline.from_pretrained(str(model), torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def dump(
    model: str | Path,
    out: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    size: tuple[int, int] = DEFAULT_SIZE,
    steps: int = 2,
    guidance: float = 30.0,
    prompt: str = DEFAULT_PROMPT,
    seed: int = 0,
    max_sequence_length: int | None = None,
    strengths: tuple[float, ...] | list[float] = (1.0, 0.5),
    num_images: int = 1,
    components: bool = True,
) -> Path:
    """Run the reference on `model` and write the safetensors dump `out`; returns its Path.

    size: (W, H) pixels, multiples of 16. max_sequence_length None: see
    `default_max_sequence_length`. strengths: one pipeline case each (the first is
    "pipeline"); num_images: batch of every case (one injected noise per image).
    components: False skips the CLIP/T5/VAE/transformer tests (pipeline cases only).
    Raises ValueError on bad sizes/strengths, KeyError on an unknown dtype.
    """
    import diffusers
    import transformers
    from safetensors.numpy import save_file

    model, out = Path(model), Path(out)
    width, height = size
    if width % 16 or height % 16 or width <= 0 or height <= 0:
        raise ValueError(f"size {width}x{height} must be positive multiples of 16")
    msl = max_sequence_length or default_max_sequence_length(model)
    cases = make_cases(list(strengths), num_images)
    torch_dtype = DTYPES[dtype]
    t0 = time.perf_counter()
    pipe = load_pipeline(model, device, torch_dtype)
    d = Dumper(pipe, device, torch_dtype, seed)
    d.timings["load"] = round(time.perf_counter() - t0, 3)
    image, mask = make_image(width, height, seed)
    d.arrays["input.image"], d.arrays["input.mask"] = image, mask
    with torch.inference_mode():
        if components:
            d.text(prompt, msl)
            d.vae(width, height)
            d.transformer(width, height, msl, guidance)
        for case in cases:
            d.pipeline(case, image, mask, prompt, steps=steps, guidance=guidance,
                       max_sequence_length=msl)
    metadata = {
        "format": "mlx-edit parity reference 1", "model": str(model.resolve()),
        "device": device if device != "cuda" else torch.cuda.get_device_name(),
        "dtype": dtype, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "size": f"{width}x{height}",
        "steps": str(steps), "guidance": repr(float(guidance)), "prompt": prompt,
        "seed": str(seed), "max_sequence_length": str(msl), "timestep": repr(TIMESTEP),
        "cases": json.dumps([asdict(c) for c in cases]), "timings": json.dumps(d.timings),
        "components": str(components).lower(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in d.arrays.items()}, str(out), metadata)
    return out


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"size must look like 64x48, got {text!r}") from e
    return w, h


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="FLUX.1 Fill diffusers folder")
    ap.add_argument("--out", type=Path, required=True, help="output .safetensors")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--size", type=_size, default=DEFAULT_SIZE, help="WxH, multiples of 16")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=30.0)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-sequence-length", type=int, default=None,
                    help="T5 length (default 512, or 128 when T5 is >= 1024 wide)")
    ap.add_argument("--strengths", default="1.0,0.5",
                    help="comma-separated, one pipeline run each (first: 'pipeline')")
    ap.add_argument("--num-images", type=int, default=1)
    ap.add_argument("--pipeline-only", action="store_true",
                    help="skip the per-component tests (CLIP, T5, VAE, transformer)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    out = dump(args.model, args.out, device=args.device, dtype=args.dtype, size=args.size,
               steps=args.steps, guidance=args.guidance, prompt=args.prompt, seed=args.seed,
               max_sequence_length=args.max_sequence_length,
               strengths=[float(s) for s in args.strengths.split(",")],
               num_images=args.num_images, components=not args.pipeline_only)
    print(f"{out}: reference of {args.model} on {args.device} ({args.dtype}), "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
