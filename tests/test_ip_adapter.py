"""IP-Adapter (XLabs) and the CLIP vision tower: parity with transformers/diffusers, strict
loading, preprocessing and errors.

References are built by transformers/diffusers under torch.manual_seed
(scripts/image_prompt_fixtures.py). The diffusers IP-Adapter path is the real one:
`FluxPipeline.load_ip_adapter` on an XLabs-layout file (its key mapping), then
`FluxTransformer2DModel(..., joint_attention_kwargs={"ip_adapter_image_embeds": ...})`.
Metric: max|ours - ref| / max|ref| in float32, tolerance 1e-4; preprocessing is exact.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)


import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file
from skimage import data

from mlx_edit.conditioning.image_prompts import IPAdapterSpec, clip_preprocess, prepare_ip_adapters
from mlx_edit.imaging.images import InputError
from mlx_edit.models.clip import CLIPVisionConfig
from mlx_edit.weights.core import WeightLoadError
from mlx_edit.weights.flux import load_transformer
from mlx_edit.weights.vision import load_clip_vision, load_ip_adapter, resolve_ip_adapter
from conftest import import_script
from contexts import make_context

pytestmark = pytest.mark.parity
torch = pytest.importorskip("torch")  # the parity extra: every test here uses it
fx = import_script("image_prompt_fixtures")

TOL = 1e-4
TINY = dict(
    in_channels=384, out_channels=64, num_layers=2, num_single_layers=1,
    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
    pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=[4, 4, 8], patch_size=1,
)  # fmt: skip
CLIP_L_2LAYERS = dict(fx.clip_vision_config("wide"))  # ViT-L/14 widths, 2 layers


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def photos() -> list[Image.Image]:
    return [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee()),
            Image.fromarray(data.chelsea()).crop((0, 0, 451, 150))]  # wide, short side 150


def torch_pixels(px: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(px.transpose(0, 3, 1, 2)))


# ---------------------------------------------------------------- CLIP vision tower


def test_clip_preprocess_equals_transformers():
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size=224, crop_size=224)  # diffusers' feature_extractor
    for im in photos() + [Image.fromarray(data.rocket())]:
        ref = proc(im, return_tensors="np").pixel_values[0].transpose(1, 2, 0)
        ours = clip_preprocess(im, 224)
        assert ours.dtype == np.float32 and ours.shape == (224, 224, 3)
        assert np.array_equal(ours, ref), np.abs(ours - ref).max()


@pytest.mark.parametrize("cfg", [fx.clip_vision_config("tiny"), CLIP_L_2LAYERS],
                         ids=["tiny", "vit-l-width"])
def test_clip_vision_matches_transformers(cfg, tmp_path):
    ref = fx.make_clip_vision(cfg, seed=3)
    ref.save_pretrained(tmp_path)
    ours = load_clip_vision(tmp_path, mx.float32)
    ims = photos() if cfg["hidden_size"] < 1024 else photos()[:1]  # a batch, then real width
    px = np.stack([clip_preprocess(im, cfg["image_size"]) for im in ims])
    with torch.no_grad():
        want = ref(pixel_values=torch_pixels(px))
    hidden, embeds = ours.encode(mx.array(px))
    assert embeds.shape == (len(ims), cfg["projection_dim"])
    assert rel_err(embeds, want.image_embeds) <= TOL
    assert rel_err(hidden, want.last_hidden_state) <= TOL


def test_clip_vision_from_full_clip_model_and_bare_file(tmp_path):
    """openai/clip-vit-large-patch14 ships a full CLIPModel: its text half is dropped."""
    import transformers

    vcfg = fx.clip_vision_config("tiny")
    tcfg = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                num_attention_heads=4, vocab_size=99, max_position_embeddings=16)
    torch.manual_seed(0)
    full = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=tcfg, vision_config=vcfg, projection_dim=24)).eval()  # top-level wins
    full.save_pretrained(tmp_path / "full")
    ours = load_clip_vision(tmp_path / "full", mx.float32)
    px = clip_preprocess(photos()[0], 224)[None]
    with torch.no_grad():
        pooled = full.vision_model(pixel_values=torch_pixels(px)).pooler_output
        want = full.visual_projection(pooled)
    assert rel_err(ours(mx.array(px)), want) <= TOL
    # a bare file with a config given explicitly (ComfyUI-style clip_vision files)
    bare = load_clip_vision(tmp_path / "full" / "model.safetensors", mx.float32,
                            config=dict(vcfg, projection_dim=24))
    assert rel_err(bare(mx.array(px)), want) <= TOL
    # ... and the ViT-L/14 defaults when none is given: shapes disagree, named in the error
    with pytest.raises(WeightLoadError, match="mis-shaped"):
        load_clip_vision(tmp_path / "full" / "model.safetensors", mx.float32)
    assert CLIPVisionConfig().projection_dim == 768


# ---------------------------------------------------------------- IP-Adapter vs diffusers


@pytest.fixture(scope="module")
def ip_setup(tmp_path_factory):
    """A diffusers FluxPipeline (transformer only) with two XLabs-layout adapters loaded
    by `load_ip_adapter`, and our transformer + adapter folders."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    root = tmp_path_factory.mktemp("ip")
    torch.manual_seed(0)
    ref = FluxTransformer2DModel(**TINY).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(root / "transformer", safe_serialization=True)
    folders = [fx.write_ip_adapter(root / f"ip{i}", TINY, "tiny", seed=10 * i + 1)
               for i in range(2)]
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=ref)
    encoder = str(folders[0] / "image_encoder")
    pipe.load_ip_adapter([str(f) for f in folders], subfolder="",
                         weight_name=["ip_adapter.safetensors"] * 2,
                         image_encoder_pretrained_model_name_or_path=encoder,
                         image_encoder_dtype=torch.float32)  # its default is float16
    ours = load_transformer(root / "transformer", mx.float32)
    return pipe, ours, folders


def _inputs(batch=2, h=4, w=4, n_txt=6, seed=1):
    g = np.random.default_rng(seed)
    ids = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
    return dict(
        img=g.standard_normal((batch, h * w, 384)).astype(np.float32),
        img_ids=np.concatenate([np.zeros((h * w, 1)), ids], 1).astype(np.float32),
        txt=g.standard_normal((batch, n_txt, 32)).astype(np.float32),
        txt_ids=np.zeros((n_txt, 3), np.float32),
        timestep=np.array([0.7, 0.3][:batch], np.float32),
        pooled=g.standard_normal((batch, 24)).astype(np.float32),
        guidance=np.array([30.0, 3.5][:batch], np.float32),
    )


def _run_ref(model, x, embeds):
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    with torch.no_grad():
        return model(hidden_states=t["img"], encoder_hidden_states=t["txt"],
                     pooled_projections=t["pooled"], timestep=t["timestep"], img_ids=t["img_ids"],
                     txt_ids=t["txt_ids"], guidance=t["guidance"], return_dict=False,
                     joint_attention_kwargs={"ip_adapter_image_embeds": embeds})[0].numpy()


def _run_ours(model, x, ip):
    a = {k: mx.array(v) for k, v in x.items()}
    return np.array(model(a["img"], a["img_ids"], a["txt"], a["txt_ids"], a["timestep"],
                          a["pooled"], a["guidance"], ip=ip))


def test_ip_adapter_end_to_end_matches_diffusers(ip_setup):
    """Photos -> CLIP -> projection -> per-block k/v -> transformer, two adapters (one with
    two reference images), per-layer scales, batch 2."""
    pipe, ours, folders = ip_setup
    refs = photos()
    scales = [[0.8, 1.3], 0.6]
    pipe.set_ip_adapter_scale(scales)
    embeds = pipe.prepare_ip_adapter_image_embeds([[refs[0], refs[1]], [refs[2]]], None,
                                                  torch.device("cpu"), 2)
    x = _inputs()
    want = _run_ref(pipe.transformer, x, embeds)
    # diffusers shares one image encoder between adapters: name it for the second one
    specs = [IPAdapterSpec(folders[0], [refs[0], refs[1]], scales[0]),
             IPAdapterSpec(folders[1], refs[2], scales[1], folders[0] / "image_encoder")]
    ip = prepare_ip_adapters(make_context(ours.config, batch_size=2), specs)
    assert ip[0].k[0].shape == (2, 2, 8, 16) and ip[1].scale == [0.6, 0.6]
    assert rel_err(_run_ours(ours, x, ip), want) <= TOL
    no_ip = _run_ours(ours, x, None)
    assert rel_err(no_ip, want) > 1e-2  # the adapters do change the output


def test_ip_adapter_keys_follow_diffusers_loader(tmp_path):
    """k from k_proj, v from v_proj, proj from proj, norm from norm (the standalone
    conversion script gets two of these wrong)."""
    folder = fx.write_ip_adapter(tmp_path / "ip", TINY, "tiny", seed=4)
    raw = load_file(folder / "ip_adapter.safetensors")
    model = load_ip_adapter(folder / "ip_adapter.safetensors", mx.float32)
    c = model.config
    assert (c.image_embed_dim, c.cross_attention_dim, c.num_tokens, c.hidden_size,
            c.num_layers) == (32, 32, 4, 32, 2)
    for i in range(2):
        for kv in "kv":
            src = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.weight"
            assert np.array_equal(np.array(getattr(model.layers[i], f"to_{kv}_ip").weight),
                                  raw[src])
    assert np.array_equal(np.array(model.image_proj.proj.weight),
                          raw["ip_adapter_proj_model.proj.weight"])
    assert np.array_equal(np.array(model.image_proj.norm.bias),
                          raw["ip_adapter_proj_model.norm.bias"])


def test_ip_adapter_loading_is_strict(tmp_path):
    folder = fx.write_ip_adapter(tmp_path / "ip", TINY, "tiny", seed=4)
    raw = load_file(folder / "ip_adapter.safetensors")
    extra = dict(raw, **{"double_blocks.0.processor.extra.weight": np.zeros(3, np.float32)})
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(WeightLoadError, match="unexpected: double_blocks.0.processor.extra"):
        load_ip_adapter(tmp_path / "extra.safetensors", mx.float32)
    missing = {k: v for k, v in raw.items() if "1.processor.ip_adapter_double_stream_v" not in k}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(WeightLoadError, match="missing: layers.1.to_v_ip"):
        load_ip_adapter(tmp_path / "missing.safetensors", mx.float32)
    save_file({"foo.weight": np.zeros(3, np.float32)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightLoadError, match="not a FLUX IP-Adapter"):
        load_ip_adapter(tmp_path / "other.safetensors", mx.float32)


def test_ip_adapter_input_errors(ip_setup, tmp_path):
    _, ours, folders = ip_setup
    pipe_like = make_context(ours.config)
    img = photos()[1]
    with pytest.raises(InputError, match="scale has 3 values; the transformer has 2"):
        prepare_ip_adapters(pipe_like, [IPAdapterSpec(folders[0], img, [1.0, 1.0, 1.0])])
    with pytest.raises(InputError, match="--ip-scale must be finite"):
        prepare_ip_adapters(pipe_like, [IPAdapterSpec(folders[0], img, float("nan"))])
    with pytest.raises(InputError, match="does not exist|not found|No such"):
        prepare_ip_adapters(pipe_like, [IPAdapterSpec(folders[0], tmp_path / "nope.png")])
    # an adapter for another transformer (3 double blocks)
    other = fx.write_ip_adapter(tmp_path / "other", dict(TINY, num_layers=3), "tiny", seed=2)
    with pytest.raises(InputError, match="3 double blocks; this one has 32, 32, 2"):
        prepare_ip_adapters(pipe_like, [IPAdapterSpec(other, img)])
    # the adapter file alone: no vision tower beside it
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "ip_adapter.safetensors").write_bytes((folders[0] / "ip_adapter.safetensors")
                                                  .read_bytes())
    with pytest.raises(WeightLoadError, match="no CLIP vision tower"):
        resolve_ip_adapter(lone / "ip_adapter.safetensors")
    adapter, enc = resolve_ip_adapter(lone, image_encoder=folders[0] / "image_encoder")
    assert adapter.name == "ip_adapter.safetensors" and enc.name == "image_encoder"
    with pytest.raises(WeightLoadError, match="not a Hugging Face repo id"):
        resolve_ip_adapter(tmp_path / "missing" / "x.safetensors")
