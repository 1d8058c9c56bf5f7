"""`low_memory=True` / `--low-memory` (mlx_edit/resident.py, FluxFill) and quantization
layer by layer at load (weights/core.py `load_into(quantize=)`).

A low-memory edit must give the default pipeline's output exactly, hold only the phase's
own model (checked by what is loaded and by MLX's active memory when each phase starts),
cap MLX's cache, be accepted by the memory check where only it fits, and be reachable
from the CLI.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import import_script
from mlx.utils import tree_flatten
from PIL import Image

import mlx_edit.editing.running as running
from mlx_edit.editing import components, memory, prompts
from mlx_edit.imaging import masks
from mlx_edit.cli import main
from mlx_edit.conditioning.controlnet import ControlNetSpec
from mlx_edit.imaging.images import InputError
from mlx_edit.editing.pipeline import FluxFill
from mlx_edit.weights.quantize import model_nbytes, quantize_t5, quantize_transformer
from mlx_edit.editing.components import LOW_MEMORY_CACHE_BYTES
from mlx_edit.weights.flux import load_transformer
from mlx_edit.weights.text import load_t5

KNOWN_LIMIT = 3 * 2**30  # a cache limit the tests set, to see who changes it


@pytest.fixture(autouse=True)
def restore_cache_limit():
    """Low-memory pipelines cap MLX's cache for the whole process: put it back after."""
    previous = mx.set_cache_limit(KNOWN_LIMIT)
    yield
    mx.set_cache_limit(previous)


def _photo(width=160, height=128, seed=0):
    rng = np.random.default_rng(seed)
    image = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    mask = np.zeros((height, width), np.float32)
    mask[32:96, 40:120] = 1.0
    return Image.fromarray(image), mask


def _edit(pipe, image, mask, **kw):
    """prepare + run: (output image as uint8 array, final latents as float32 array)."""
    job = pipe.prepare(image, mask, masks.blend_mask(mask, 0, 8), "a red apple", steps=2,
                       guidance=30.0, seed=5, num_images=1, strength=1.0, crop_to_mask=None,
                       prompt_2=None, max_sequence_length=32, **kw)
    out = pipe.run(job)
    return np.asarray(out[0]), np.array(job.latents.astype(mx.float32))


def _pipes(ckpt):
    return (FluxFill.from_pretrained(ckpt, mx.float32),
            FluxFill.from_pretrained(ckpt, mx.float32, low_memory=True))


def test_low_memory_inpaint_equals_default(tiny_mlx):
    default, low = _pipes(tiny_mlx)
    assert low.components.resident == ()  # nothing loaded up front
    assert low.variant == "fill" and low.transformer_config == default.transformer.config
    assert low.vae_config == default.vae.config and low.components.resident == ()
    image, mask = _photo()
    ref_px, ref_latents = _edit(default, image, mask)
    px, latents = _edit(low, image, mask)
    assert np.abs(latents - ref_latents).max() <= 1e-6
    assert np.array_equal(px, ref_px)
    assert low.components.resident == ()  # everything freed after the edit
    assert low.components.history == [("load", "vae"), ("release", "vae"),
                                      ("load", "transformer"), ("release", "transformer"),
                                      ("load", "vae"), ("release", "vae")]
    assert default.components.resident == ("transformer", "vae")  # the default keeps both
    stats = low.last_stats  # every phase recorded, plus the per-edit loads
    for phase in ("text_encode", "vae_encode", "vae_decode"):
        assert stats[f"{phase}_s"] > 0 and stats[f"{phase}_peak_gb"] > 0
    assert stats["denoise_peak_gb"] > 0 and stats["step_s"] > 0
    assert stats["load_transformer_s"] > 0 and stats["load_vae_s"] > 0
    assert "load_vae_s" not in default.last_stats


def test_low_memory_controlnet_edit_equals_default(tiny_mlx, tmp_path):
    cf = import_script("controlnet_fixtures")
    cfg = json.loads((tiny_mlx / "transformer" / "config.json").read_text())
    import_script("make_mlx_checkpoint").write_controlnet(
        tmp_path / "instantx", cf.controlnet_config("instantx", cfg), seed=4)
    image, mask = _photo()
    control, _ = _photo(seed=1)
    spec = ControlNetSpec(tmp_path / "instantx", control, "none", scale=0.9)
    default, low = _pipes(tiny_mlx)
    ref_px, ref_latents = _edit(default, image, mask, controlnets=[spec])
    plain_px, _ = _edit(default, image, mask)
    assert not np.array_equal(ref_px, plain_px)  # the ControlNet changes the edit
    px, latents = _edit(low, image, mask, controlnets=[spec])
    assert np.abs(latents - ref_latents).max() <= 1e-6
    assert np.array_equal(px, ref_px)
    assert low.components.resident == ()


def test_each_phase_holds_only_its_model(small_mlx, monkeypatch):
    """What is loaded, and MLX's active memory, when each phase's computation starts."""
    default, low = _pipes(small_mlx)
    nbytes = {n: model_nbytes(default.components.get(n)) for n in ("transformer", "vae")}
    seen: list[tuple[str, tuple, int]] = []

    def spy(phase, module, name):
        fn = getattr(module, name)

        def wrapped(*args, **kwargs):
            seen.append((phase, pipe.components.resident, mx.get_active_memory()))
            return fn(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapped)

    for phase, module, name in (("text", prompts, "load_t5"), ("encode", components, "encode_auto"),
                                ("denoise", running, "denoise"),
                                ("decode", components, "decode_auto")):
        spy(phase, module, name)
    image, mask = _photo()
    pipe = default
    _edit(default, image, mask)
    assert [(p, r) for p, r, _ in seen] == [
        (p, ("transformer", "vae")) for p in ("text", "encode", "denoise", "decode")]
    seen.clear()
    pipe = low
    base = mx.get_active_memory()
    _edit(low, image, mask)
    assert [(p, r) for p, r, _ in seen] == [
        ("text", ()), ("encode", ("vae",)), ("denoise", ("transformer",)), ("decode", ("vae",))]
    # The model in use is in memory and the other one is not (the latents, embeddings
    # and conditioning in between are far smaller than either model).
    t, v = nbytes["transformer"], nbytes["vae"]
    active = {p: a - base for p, _, a in seen}
    assert active["text"] < min(t, v)
    assert v <= active["encode"] < v + t and v <= active["decode"] < v + t
    assert t <= active["denoise"] < t + v
    assert mx.get_active_memory() - base < min(t, v)  # both freed after the edit


def test_closing_the_denoise_generator_frees_the_transformer(tiny_mlx):
    low = FluxFill.from_pretrained(tiny_mlx, mx.float32, low_memory=True)
    image, mask = _photo()
    job = low.prepare(image, mask, mask, "x", steps=3, guidance=30.0, seed=0, num_images=1,
                      strength=1.0, crop_to_mask=None, prompt_2=None, max_sequence_length=16)
    assert low.components.resident == ()
    steps = low.steps(job)
    next(steps)
    assert low.components.resident == ("transformer",)
    steps.close()  # a caller that stops early (preview, cancel)
    assert low.components.resident == ()


def test_cache_limit_set_only_by_low_memory(tiny_mlx):
    FluxFill.from_pretrained(tiny_mlx, mx.float32)
    assert mx.set_cache_limit(KNOWN_LIMIT) == KNOWN_LIMIT  # default: untouched
    low = FluxFill.from_pretrained(tiny_mlx, mx.float32, low_memory=True)
    assert mx.set_cache_limit(LOW_MEMORY_CACHE_BYTES) == LOW_MEMORY_CACHE_BYTES
    assert low.low_memory and low.components.resident == ()


def test_memory_check_uses_the_low_memory_peak(tiny_mlx, monkeypatch):
    default, low = _pipes(tiny_mlx)
    image, mask = _photo()
    est = default.memory_estimate(*image.size)
    assert est == low.memory_estimate(*image.size)  # same models, configs only
    assert est["peak_low_memory"] < est["peak"]
    between = (est["peak_low_memory"] + est["peak"]) / 2
    monkeypatch.setattr(memory, "available_memory", lambda: int(between * memory.GB))
    with pytest.raises(InputError, match="--low-memory"):
        _edit(default, image, mask)
    px, _ = _edit(low, image, mask)  # fits in low-memory mode
    assert px.shape == (128, 160, 3)


def test_cli_low_memory_end_to_end(tiny_mlx, tmp_path):
    image, mask = _photo()
    image.save(tmp_path / "photo.png")
    Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    assert "--low-memory" in CliRunner().invoke(main, ["restyle", "--help"]).output
    assert "--low-memory" in CliRunner().invoke(main, ["outpaint", "--help"]).output
    outputs = {}
    for flags in ((), ("--low-memory",)):
        out = tmp_path / f"out{len(flags)}.png"
        args = ["inpaint", "--model", tiny_mlx, "--image", tmp_path / "photo.png", "--mask",
                tmp_path / "mask.png", "--prompt", "a red apple", "--steps", 2, "--seed", 3,
                "--output", out, "--metadata", *flags]
        r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        outputs[flags] = np.asarray(Image.open(out).convert("RGB"))
        stats = json.loads(out.with_suffix(".json").read_text())["stats"]
        assert ("load_transformer_s" in stats) == bool(flags)
    assert np.array_equal(outputs[()], outputs[("--low-memory",)])


# ---------------------------------------------------------------- quantization at load


def _params(model):
    return dict(tree_flatten(model.parameters()))


@pytest.mark.parametrize("component", ["transformer", "text_encoder_2"])
def test_quantize_at_load_is_identical_and_never_full_precision(small_mlx, component):
    load, quantize = {"transformer": (load_transformer, quantize_transformer),
                      "text_encoder_2": (load_t5, quantize_t5)}[component]
    folder = small_mlx / component
    full = load(folder, mx.float32)
    full_bytes = model_nbytes(full)
    quantize(full, 4)  # the old way: load in full precision, then quantize
    mx.eval(full.parameters())
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    q = load(folder, mx.float32, quantize=4)
    peak = mx.get_peak_memory() - before
    a, b = _params(full), _params(q)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item() for k in a)
    q_bytes = model_nbytes(q)
    # The old way peaks at full_bytes or more; this one at about q_bytes + one layer.
    assert peak < q_bytes + 0.5 * (full_bytes - q_bytes), (peak, q_bytes, full_bytes)


def test_loading_with_a_cast_holds_no_source_copy(small_mlx):
    """A float32 checkpoint loaded as bfloat16: the float32 sources are freed as they are
    cast (they used to stay referenced until the load returned: peak 3x the model)."""
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    model = load_transformer(small_mlx / "transformer", mx.bfloat16)
    peak = mx.get_peak_memory() - before
    assert peak < 1.3 * model_nbytes(model), (peak, model_nbytes(model))
