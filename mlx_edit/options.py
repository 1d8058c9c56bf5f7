"""EditOptions: every option of an edit, its default and its check, in one place.

    opts = EditOptions(steps=28, seed=7)              # checked now: InputError if bad
    opts = EditOptions.from_dict(manifest_line)        # unknown keys refused by name
    pipe.inpaint(image, mask, prompt, opts)            # or pipe.inpaint(..., steps=28)

The API (`FluxFill.inpaint/outpaint/restyle/prepare`), the CLI (its defaults and help
come from `FIELDS`), batch manifests and request bodies all build this object, so a bad
value (NaN guidance, steps 0, seed -1, steps "2") is refused with a one-line
`InputError` naming the field before any model loads. No mlx import here: the CLI's
`--help` stays instant.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_edit import variants
from mlx_edit.imaging.blend import BLEND_METHODS, COLOR_MATCH_METHODS
from mlx_edit.imaging.images import InputError

DEFAULT_STEPS = variants.VARIANTS["fill"].steps  # diffusers FluxFillPipeline, BFL cli_fill
DEFAULT_GUIDANCE = variants.VARIANTS["fill"].guidance  # Fill is distilled for high guidance
CONTROL_GUIDANCE = {**variants.CONTROL_GUIDANCE, "none": 30.0}  # BFL cli_control.py
RESTYLE_CONTROL_TYPES = tuple(CONTROL_GUIDANCE)  # the BFL Canny/Depth models' inputs
DEFAULT_FEATHER = 8  # px of soft blend outside the (grown) mask
OUTPAINT_OVERLAP = 32  # px of the original regenerated along an outpainted seam
BFL_CANNY = (50.0, 200.0)  # BFL cli_control.py's Canny thresholds (0-255 scale)
MAX_CFG = 100.0  # true_cfg_scale bound
MAX_SIZE = 8192  # Kontext output width/height bound (px)
CONTROL_TYPES = ("canny", "depth", "pose", "tile", "blur", "gray", "none")  # ControlNet preprocessing
DEFAULT_CANNY = (100.0, 200.0)  # InstantX's cv2.Canny thresholds for ControlNets
MAX_SEED = 2**32 - 1  # seeds are 0..MAX_SEED (every seed of a batch: seed + i)
MAX_STEPS = 1000
MAX_IMAGES = 64
MAX_GUIDANCE = 100.0
MAX_MASK_PX = 1024  # grow/feather radius bound: the disc dilation costs O(px) per pixel
MAX_EXPAND = 16384  # px added on one side by outpaint
MAX_TEXT_TOKENS = 512  # T5's longest sequence in FLUX
MODES = ("inpaint", "outpaint", "restyle", "edit")
TILE_MODES = ("auto", "off", "on")  # tiled denoising of large canvases (mlx_edit.editing.large)
MODEL_PIXELS = 1024 * 1024  # the model-size budget: canvas area the model sees at once
MODEL_PIXELS_RANGE = (256 * 256, 4096 * 4096)
TILE_OVERLAP = 256  # px shared by neighbouring windows (a quarter of a 1 MP window)
GLOBAL_PASS_STRENGTH = 0.5  # refinement of a global pass: keeps its layout, redraws detail
MAX_TILE_OVERLAP = 2048
MASK_THRESHOLD = 0.3  # SAM 3 instance score threshold (transformers' default)
MASK_INSTANCES = ("all", "best")  # or an index >= 0, highest score first


def _int(name: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {type(v).__name__} {v!r}")
    if not lo <= int(v) <= hi:
        raise InputError(f"{name} must be in {lo}..{hi}, got {v}")
    return int(v)


def _float(name: str, v: Any, lo: float, hi: float, *, open_low: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise InputError(f"{name} must be a number, got {type(v).__name__} {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise InputError(f"{name} must be a finite number, got {f}")
    if (f <= lo if open_low else f < lo) or f > hi:
        raise InputError(f"{name} must be in {'(' if open_low else '['}{lo:g}, {hi:g}], got {f:g}")
    return f


def _optional(check, name: str, v: Any, *args):
    return None if v is None else check(name, v, *args)


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise InputError(f"{name} must be true or false, got {type(v).__name__} {v!r}")
    return v


# Prompts are bounded in UTF-8 bytes before any tokenizer sees them (a 50 MB prompt takes
# GBs to tokenize): 512 T5 tokens, the longest a prompt may be, stay far below this.
MAX_PROMPT_BYTES = 64 * 1024


def _text(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise InputError(f"{name} must be a string, got {type(v).__name__}")
    if "\x00" in v:
        raise InputError(f"{name} contains a NUL character")
    size = len(v.encode("utf-8", "surrogatepass")) if len(v) > MAX_PROMPT_BYTES // 4 else 0
    if size > MAX_PROMPT_BYTES:
        raise InputError(f"{name} is {size} bytes, over the limit of {MAX_PROMPT_BYTES} "
                         "(a prompt is at most 512 T5 tokens)")
    return v


def check_prompt(prompt: Any, name: str = "prompt") -> str:
    """The prompt as given, or InputError (not a string, NUL characters, over
    MAX_PROMPT_BYTES UTF-8 bytes)."""
    return _text(name, prompt)


def check_phrase(phrase: Any, name: str = "the text prompt") -> str:
    """A non-empty phrase (a SAM 3 text prompt), stripped; InputError otherwise (also
    for NUL characters or more than MAX_PROMPT_BYTES)."""
    if not isinstance(phrase, str) or not phrase.strip():
        raise InputError(f"{name} must be a non-empty phrase, got {phrase!r}")
    return _text(name, phrase).strip()


def check_threshold(threshold: Any, name: str = "threshold") -> float:
    """A SAM 3 score threshold in [0, 1) as float (scores are in [0, 1] and kept when
    above it); InputError otherwise."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        t = math.nan
    if isinstance(threshold, bool) or not 0.0 <= t < 1.0:
        raise InputError(f"{name} must be a number in [0, 1), got {threshold!r}")
    return t


def check_instances(spec: Any, name: str = "instances") -> str | int:
    """"all", "best" or an index >= 0 (int or digits) -> "all" | "best" | int;
    InputError otherwise."""
    if isinstance(spec, str) and spec.strip().lower() in MASK_INSTANCES:
        return spec.strip().lower()
    try:
        index = int(spec)
    except (TypeError, ValueError):
        index = -1
    if index < 0 or isinstance(spec, (bool, float)):
        raise InputError(f"{name} must be 'all', 'best' or an index >= 0, got {spec!r}")
    return index


def _cache(v: Any):
    """None, a step cache config, or its spec string ("fbc:0.12") parsed."""
    if v is None:
        return None
    from mlx_edit.sampling import cache  # imports mlx: only when a cache is asked for
    from mlx_edit.sampling.cache_spec import check_cache, parse_cache

    if isinstance(v, str):
        try:
            return parse_cache(v)
        except ValueError as e:
            raise InputError(f"cache: {e}") from None
    if not isinstance(v, (cache.FirstBlockCache, cache.TaylorSeer, cache.MagCache)):
        raise InputError(f"cache must be a FirstBlockCache, TaylorSeer or MagCache (or a "
                         f"spec such as 'fbc:0.12'), got {type(v).__name__}")
    try:
        return check_cache(v)
    except ValueError as e:
        raise InputError(f"cache: {e}") from None


def _specs(name: str, v: Any, kind: str) -> tuple:
    """A tuple of conditioning specs (dicts are turned into `kind` specs), each validated."""
    if v is None:
        return ()
    if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, Iterable):
        raise InputError(f"{name} must be a list of {kind}, got {type(v).__name__}")
    out = []
    for item in v:
        if isinstance(item, Mapping):
            item = _spec_from_dict(name, item, kind)
        if type(item).__name__ != kind or not hasattr(item, "validate"):
            raise InputError(f"{name} items must be {kind}, got {type(item).__name__}")
        item.validate()
        out.append(item)
    return tuple(out)


def _spec_from_dict(name: str, d: Mapping, kind: str):
    import mlx_edit.conditioning.controlnet as cn  # imports mlx: only when specs are given
    import mlx_edit.conditioning.image_prompts as ip

    cls = {"ControlNetSpec": cn.ControlNetSpec, "IPAdapterSpec": ip.IPAdapterSpec,
           "ReduxSpec": ip.ReduxSpec}[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise InputError(f"{name}: unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")
    try:
        return cls(**d)
    except TypeError as e:  # a required key missing
        raise InputError(f"{name}: {e}") from None


# field -> (the modes that take it, help text). Defaults live on the dataclass below.
FIELDS: dict[str, tuple[tuple[str, ...], str]] = {
    "steps": (MODES, f"Denoising steps (1..{MAX_STEPS})."),
    "guidance": (MODES, f"Guidance (0..{MAX_GUIDANCE:g})."),
    "seed": (MODES, f"Random seed 0..{MAX_SEED} (image i uses seed + i)."),
    "num_images": (MODES, f"Images generated as one batch (1..{MAX_IMAGES})."),
    "crop_to_mask": (("inpaint", "outpaint", "restyle"), "Edit a ~1 MP window around the mask of a large photo and stitch "
                            "it back (default: automatic)."),
    "prompt_2": (MODES, "T5 prompt (default: the prompt)."),
    "max_sequence_length": (MODES, f"T5 tokens (1..{MAX_TEXT_TOKENS})."),
    "strength": (("inpaint", "restyle", "edit"),
                 "< 1 starts from the photo (img2img style), (0, 1]."),
    "grow_mask": (("inpaint", "restyle", "edit"), f"Dilate the mask (px, 0..{MAX_MASK_PX})."),
    "feather": (("inpaint", "restyle", "edit"), f"Soft blend width (px, 0..{MAX_MASK_PX})."),
    "paste_back": (("inpaint", "restyle"), "Keep the exact original outside the mask."),
    "left": (("outpaint",), "px to add on the left."),
    "right": (("outpaint",), "px to add on the right."),
    "top": (("outpaint",), "px to add at the top."),
    "bottom": (("outpaint",), "px to add at the bottom."),
    "overlap": (("outpaint",), "px of the original regenerated along each seam."),
    "control_type": (("restyle",), "canny: edges of the control image; depth / none: a "
                                   "ready-made map."),
    "canny_low": (("restyle",), "Canny low threshold (0-255 scale)."),
    "canny_high": (("restyle",), "Canny high threshold (0-255 scale)."),
    "ip_adapters": (("inpaint", "outpaint"), "IPAdapterSpec list."),
    "redux": (("inpaint", "outpaint"), "ReduxSpec list."),
    "controlnets": (("inpaint", "outpaint"), "ControlNetSpec list."),
    "color_match": (("inpaint", "restyle", "edit"), "Match the edit's colours to the photo's, measured in a "
                                  "ring just outside the mask (Lab mean-std or histogram; "
                                  "none); fixes the colour drift of the VAE round trip."),
    "blend": (("inpaint", "restyle", "edit"), "feather: soft alpha blend; poisson: seamless cloning (OpenCV, "
                            "pip install 'mlx-edit[blend]')."),
    "soft_mask": (("inpaint", "restyle", "edit"), "Grey levels of the mask are per-pixel strengths "
                                "(differential diffusion): darker areas change less."),
    "seam_fix": (("inpaint",), "Then redraw a band of this many px each side of the mask "
                               "boundary at low strength (0.3); 0 = off."),
    "rank": (("inpaint",), "clip: order the candidates by CLIP similarity of the edited "
                           "region to the prompt (scores in the metadata)."),
    "keep_best": (("inpaint",), "With --rank: keep only the best K candidates."),
    "rank_model": (("inpaint",), "Ranking CLIP (a CLIPModel folder or repo; default: the "
                                 "model folder's ranker/, else openai/clip-vit-large-patch14)."),
    "cache": (MODES, "Skip transformer evaluations: fbc:0.12 (First Block Cache threshold), "
                     "taylorseer:5 (cache interval), mag:0.06 (MagCache threshold); "
                     "diffusers' settings. Default: none."),
    "segment_model": (("inpaint", "edit"), "SAM 2.1 checkpoint for --mask-point/--mask-box "
                                           "(default: the model folder's segmenter/, else "
                                           "facebook/sam2.1-hiera-large)."),
    "mask_text": (("inpaint", "edit"), "Segment every instance of this phrase as the mask "
                                       "(SAM 3: 'the sky', 'all the people')."),
    "mask_threshold": (("inpaint", "edit"), "With --mask-text: keep instances scoring above "
                                            "this, [0, 1)."),
    "mask_instances": (("inpaint", "edit"), "With --mask-text: all (merged), best, or an "
                                            "index N (0 = highest score)."),
    "text_segment_model": (("inpaint", "edit"), "SAM 3 checkpoint for --mask-text (default: "
                                                "the model folder's text-segmenter/, else "
                                                "facebook/sam3)."),
    "negative_prompt": (("edit",), "Negative prompt for true CFG (with --true-cfg > 1)."),
    "true_cfg_scale": (("edit",), f"True classifier-free guidance scale (1..{MAX_CFG:g}; "
                                  "1 = off; > 1 doubles the work per step)."),
    "width": (("edit",), "Output width px (default: the image's preferred Kontext size)."),
    "height": (("edit",), "Output height px (default: the image's preferred Kontext size)."),
    "keep_size": (("edit",), "Return the edit at the input image's own size."),
    "auto_resize": (("edit",), "Resize references to the preferred Kontext resolution."),
    "tile_mode": (MODES, "Large canvases: on = denoise an edit window larger than "
                         "--max-model-pixels at its own resolution in overlapping windows "
                         "(MultiDiffusion); off = shrink it for the model; auto = windows "
                         "unless a step cache is set (edit: only with a mask)."),
    "max_model_pixels": (MODES, "Model-size budget: pixels the model sees at once (a window, "
                                f"or the shrunk canvas), {MODEL_PIXELS_RANGE[0]}.."
                                f"{MODEL_PIXELS_RANGE[1]}."),
    "tile_overlap": (MODES, f"px shared by neighbouring windows (0..{MAX_TILE_OVERLAP}; "
                            "blended with cosine ramps)."),
    "window_batch": (MODES, "Windows evaluated together (default: as many as memory "
                            "allows, up to 4)."),
    "detail_pass": (("inpaint", "outpaint", "restyle"),
                    "After the (shrunk) edit, redraw its masked area at full resolution in "
                    "windows from this strength, (0, 1]; 0 = off. Twice the work or more."),
    "global_pass": (("inpaint", "outpaint", "restyle"),
                    f"Edit the whole window shrunk first (layout), then refine it at full "
                    f"resolution in windows at strength {GLOBAL_PASS_STRENGTH} (or "
                    "--detail-pass)."),
}


@dataclass(frozen=True)
class EditOptions:
    """The options of one edit, checked when made (InputError naming the field).

    Numbers: steps 1..1000 (int), guidance finite 0..100 or None (the variant's default:
    30, 10 for restyle depth), seed 0..2**32-1 (int; seed + num_images - 1 too),
    num_images 1..64, strength (0, 1], grow_mask / feather 0..1024 px, max_sequence_length
    1..512, outpaint sides 0..16384 px (ints), canny thresholds 0 <= low <= high <= 1000.
    Large canvases (mlx_edit.editing.large): tile_mode auto|off|on, max_model_pixels
    65536..16777216, tile_overlap 0..2048 px, window_batch 1..64 or None, detail_pass
    [0, 1] (0 = off), global_pass; tile_mode on refuses a step cache.
    Masks from words (SAM 3, mlx_edit.editing.text_segment): mask_text a non-empty phrase,
    mask_threshold [0, 1), mask_instances "all" | "best" | an index >= 0 (both need
    mask_text).
    Integers must be ints (not bools, floats or strings); numbers must be real numbers.
    Which fields each mode takes: `FIELDS`.
    """

    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    num_images: int = 1
    crop_to_mask: bool | None = None
    prompt_2: str | None = None
    max_sequence_length: int = MAX_TEXT_TOKENS
    strength: float = 1.0
    grow_mask: float = 0.0
    feather: float = float(DEFAULT_FEATHER)
    paste_back: bool = True
    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0
    overlap: int = OUTPAINT_OVERLAP
    control_type: str = "canny"
    canny_low: float = BFL_CANNY[0]
    canny_high: float = BFL_CANNY[1]
    ip_adapters: tuple = field(default=())
    redux: tuple = field(default=())
    controlnets: tuple = field(default=())
    color_match: str = "mean-std"  # benchmarks/RESULTS.md (bench_blend): cuts a cast's dE ~98%
    blend: str = "feather"  # Poisson adds nothing once colours match, and needs OpenCV
    soft_mask: bool = False
    seam_fix: float = 0.0
    rank: str | None = None
    keep_best: int | None = None
    rank_model: str | None = None
    segment_model: str | None = None
    mask_text: str | None = None
    mask_threshold: float = MASK_THRESHOLD
    mask_instances: str | int = "all"
    text_segment_model: str | None = None
    cache: Any = None  # a step cache config (mlx_edit.sampling.cache) or its spec string
    negative_prompt: str | None = None
    true_cfg_scale: float = 1.0
    width: int | None = None
    height: int | None = None
    keep_size: bool = False
    auto_resize: bool = True
    tile_mode: str = "auto"
    max_model_pixels: int = MODEL_PIXELS
    tile_overlap: int = TILE_OVERLAP
    window_batch: int | None = None
    detail_pass: float = 0.0
    global_pass: bool = False

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen)
        set_("steps", _optional(_int, "steps", self.steps, 1, MAX_STEPS))
        set_("guidance", _optional(_float, "guidance", self.guidance, 0.0, MAX_GUIDANCE))
        set_("seed", _int("seed", self.seed, 0, MAX_SEED))
        set_("num_images", _int("num_images", self.num_images, 1, MAX_IMAGES))
        if self.seed + self.num_images - 1 > MAX_SEED:
            raise InputError(f"seed + num_images - 1 must be <= {MAX_SEED}, got "
                             f"{self.seed + self.num_images - 1}")
        set_("crop_to_mask", _optional(_bool, "crop_to_mask", self.crop_to_mask))
        set_("prompt_2", _optional(_text, "prompt_2", self.prompt_2))
        set_("max_sequence_length", _int("max_sequence_length", self.max_sequence_length,
                                         1, MAX_TEXT_TOKENS))
        set_("strength", _float("strength", self.strength, 0.0, 1.0, open_low=True))
        for name in ("grow_mask", "feather"):
            set_(name, _float(name, getattr(self, name), 0.0, MAX_MASK_PX))
        set_("paste_back", _bool("paste_back", self.paste_back))
        for name in ("left", "right", "top", "bottom", "overlap"):
            set_(name, _int(name, getattr(self, name), 0, MAX_EXPAND))
        if self.control_type not in CONTROL_GUIDANCE:
            raise InputError(f"control_type must be one of {', '.join(CONTROL_GUIDANCE)}, "
                             f"got {self.control_type!r}")
        set_("canny_low", _float("canny_low", self.canny_low, 0.0, 1000.0))
        set_("canny_high", _float("canny_high", self.canny_high, 0.0, 1000.0))
        if self.canny_low > self.canny_high:
            raise InputError(f"canny_low must be <= canny_high, got {self.canny_low:g} > "
                             f"{self.canny_high:g}")
        set_("ip_adapters", _specs("ip_adapters", self.ip_adapters, "IPAdapterSpec"))
        set_("redux", _specs("redux", self.redux, "ReduxSpec"))
        set_("controlnets", _specs("controlnets", self.controlnets, "ControlNetSpec"))
        self._check_paste_back(set_)
        set_("negative_prompt", _optional(_text, "negative_prompt", self.negative_prompt))
        set_("true_cfg_scale", _float("true_cfg_scale", self.true_cfg_scale, 1.0, MAX_CFG))
        for name in ("width", "height"):
            set_(name, _optional(_int, name, getattr(self, name), 16, MAX_SIZE))
        for name in ("keep_size", "auto_resize"):
            set_(name, _bool(name, getattr(self, name)))
        self._check_tiles(set_)

    def _check_tiles(self, set_) -> None:
        if self.tile_mode not in TILE_MODES:
            raise InputError(f"tile_mode must be one of {', '.join(TILE_MODES)}, got "
                             f"{self.tile_mode!r}")
        set_("max_model_pixels", _int("max_model_pixels", self.max_model_pixels,
                                      *MODEL_PIXELS_RANGE))
        set_("tile_overlap", _int("tile_overlap", self.tile_overlap, 0, MAX_TILE_OVERLAP))
        set_("window_batch", _optional(_int, "window_batch", self.window_batch, 1, MAX_IMAGES))
        set_("detail_pass", _float("detail_pass", self.detail_pass, 0.0, 1.0))
        set_("global_pass", _bool("global_pass", self.global_pass))
        if (self.detail_pass or self.global_pass) and self.tile_mode == "off":
            raise InputError("detail_pass / global_pass refine in windows: they need "
                             "tile_mode auto or on")
        if self.tile_mode == "on" and self.cache is not None:
            raise InputError("tile_mode on cannot run with a step cache (its decisions "
                             "assume one evaluation per step): use tile_mode auto or off")

    def _check_paste_back(self, set_) -> None:
        for name, methods in (("color_match", COLOR_MATCH_METHODS), ("blend", BLEND_METHODS)):
            if getattr(self, name) not in methods:
                raise InputError(f"{name} must be one of {', '.join(methods)}, got "
                                 f"{getattr(self, name)!r}")
        set_("soft_mask", _bool("soft_mask", self.soft_mask))
        set_("seam_fix", _float("seam_fix", self.seam_fix, 0.0, MAX_MASK_PX))
        if self.rank not in (None, "clip"):
            raise InputError(f"rank must be clip (or unset), got {self.rank!r}")
        set_("keep_best", _optional(_int, "keep_best", self.keep_best, 1, MAX_IMAGES))
        if self.keep_best is not None and self.rank is None:
            raise InputError("keep_best needs rank clip")
        set_("rank_model", _optional(_text, "rank_model", self.rank_model))
        set_("segment_model", _optional(_text, "segment_model", self.segment_model))
        self._check_mask_text(set_)
        set_("cache", _cache(self.cache))

    def _check_mask_text(self, set_) -> None:
        if self.mask_text is not None:
            set_("mask_text", check_phrase(self.mask_text, "mask_text"))
        set_("mask_threshold", check_threshold(self.mask_threshold, "mask_threshold"))
        set_("mask_instances", check_instances(self.mask_instances, "mask_instances"))
        set_("text_segment_model", _optional(_text, "text_segment_model",
                                             self.text_segment_model))
        if self.mask_text is None and (self.mask_threshold != MASK_THRESHOLD
                                       or self.mask_instances != "all"):
            name = "mask_threshold" if self.mask_threshold != MASK_THRESHOLD \
                else "mask_instances"
            raise InputError(f"{name} chooses the instances of mask_text: give mask_text too")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], mode: str | None = None,
                  variant: variants.Variant | None = None) -> EditOptions:
        """Options from a manifest line or request body, field by field. Unknown keys, and
        keys the `mode` does not take, are refused (InputError naming the key); defaults
        resolved for `variant` (`for_mode`)."""
        if not isinstance(d, Mapping):
            raise InputError(f"options must be a mapping, got {type(d).__name__}")
        _check_keys(d, mode)
        opts = cls(**d)
        return opts.for_mode(mode, variant) if mode else opts

    @classmethod
    def of(cls, options: EditOptions | None, overrides: Mapping[str, Any],
           mode: str | None = None, variant: variants.Variant | None = None) -> EditOptions:
        """`options` (or the defaults) with keyword `overrides` applied and checked; with
        `mode`, also the mode's rules (`for_mode`, defaults of `variant`). The public
        methods' entry point."""
        if options is not None and not isinstance(options, EditOptions):
            raise InputError(f"options must be an EditOptions, got {type(options).__name__}")
        _check_keys(overrides, mode)
        opts = dataclasses.replace(options or cls(), **overrides)
        return opts.for_mode(mode, variant) if mode else opts

    def for_mode(self, mode: str, variant: variants.Variant | None = None) -> EditOptions:
        """Check the mode's rules and resolve steps / guidance None to the defaults of
        `variant` (mlx_edit.variants; None: the FLUX.1 variant serving `mode`).
        Raises InputError (a field the mode or the variant (`refuses`) does not take set
        to a non-default value, an outpaint without any expansion)."""
        if mode not in MODES:
            raise InputError(f"unknown edit mode {mode!r}; choose from {', '.join(MODES)}")
        defaults = EditOptions()
        for name, (modes, _) in FIELDS.items():
            if mode not in modes and getattr(self, name) != getattr(defaults, name):
                raise InputError(f"{mode} does not take {name}")
        if mode == "outpaint" and not (self.left or self.right or self.top or self.bottom):
            raise InputError("outpaint needs at least one of left/right/top/bottom > 0")
        variant = variant or variants.for_edit(mode)
        for name in variant.refuses:
            if getattr(self, name) != getattr(defaults, name):
                raise InputError(f"{name} is not available with {variant.title}")
        steps = variant.steps if self.steps is None else self.steps
        guidance = self.guidance
        if guidance is None:
            guidance = CONTROL_GUIDANCE[self.control_type] if mode == "restyle" \
                else variant.guidance
        return dataclasses.replace(self, steps=steps, guidance=guidance)

    @property
    def effective_guidance(self) -> float:
        """guidance, or Fill's default when it was left None."""
        return DEFAULT_GUIDANCE if self.guidance is None else self.guidance

    @property
    def effective_steps(self) -> int:
        """steps, or Fill's default when it was left None."""
        return DEFAULT_STEPS if self.steps is None else self.steps

    @property
    def seeds(self) -> list[int]:
        """The seed of each image: seed, seed + 1, ..."""
        return [self.seed + i for i in range(self.num_images)]

    def input_files(self) -> list[Path]:
        """Every image file the ControlNet / IP-Adapter / Redux specs read (given as paths):
        an output must never replace one."""
        paths = []
        for spec in (*self.controlnets, *self.ip_adapters, *self.redux):
            images = spec.image if isinstance(spec.image, (list, tuple)) else [spec.image]
            paths += [Path(i).expanduser() for i in images if isinstance(i, (str, Path))]
        return paths


def check_used(o: EditOptions, masked: bool) -> None:
    """Before an edit: options it would ignore. soft_mask without a mask is refused
    (InputError: nothing has grey levels to follow); true CFG set by half, a
    true_cfg_scale > 1 without negative_prompt or the reverse, is a one-line warning, as
    diffusers' FluxKontextPipeline warns (it runs without true CFG then); shown once per
    process where Python's default warning filter applies (the CLI checks, then the API)."""
    import warnings

    if o.soft_mask and not masked:
        raise InputError("soft_mask reads the mask's grey levels as strengths, but no mask "
                         "was given: give a mask or drop soft_mask")
    if o.true_cfg_scale > 1 and not o.negative_prompt:
        warnings.warn(f"true_cfg_scale {o.true_cfg_scale:g} does nothing without a "
                      "negative_prompt: true CFG is off", UserWarning, stacklevel=1)
    elif o.negative_prompt and o.true_cfg_scale <= 1:
        warnings.warn("negative_prompt does nothing with true_cfg_scale <= 1: true CFG is "
                      "off (give true_cfg_scale > 1, e.g. 4)", UserWarning, stacklevel=1)


def _check_keys(d: Mapping[str, Any], mode: str | None) -> None:
    for key in d:
        if key not in FIELDS:
            raise InputError(f"unknown option {key!r}; known: {', '.join(FIELDS)}")
        if mode is not None and mode not in FIELDS[key][0]:
            raise InputError(f"{mode} does not take {key}")


def default(name: str) -> Any:
    """The library default of option `name` (what the CLI shows and uses)."""
    return getattr(EditOptions(), name)


CANVAS_BYTES_PER_PIXEL = 48  # canvas uint8 + model/blend masks + float32 copies while preparing


def check_canvas(width: int, height: int, available_bytes: int | None = None) -> None:
    """Refuse a canvas before it is allocated: more pixels than Pillow's decompression
    bomb limit (what `load_image` accepts), or more memory for its arrays than the machine
    has. Raises InputError (one line, with the size)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS or 2 * 89_478_485
    if width * height > limit:
        raise InputError(f"the canvas would be {width}x{height} px, over the limit of "
                         f"{limit / 1e6:.0f} MP: add fewer pixels")
    if available_bytes is None:
        from mlx_edit.editing.memory import available_memory

        available_bytes = available_memory()
    need = width * height * CANVAS_BYTES_PER_PIXEL
    if need > available_bytes:
        raise InputError(f"the canvas would be {width}x{height} px and need about "
                         f"{need / 1e9:.1f} GB, more than this machine's "
                         f"{available_bytes / 1e9:.1f} GB: add fewer pixels")
