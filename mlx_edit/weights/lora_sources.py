"""Where LoRA files come from: `PATH_OR_REPO[:SCALE]` specs, local files or Hugging Face
repos (through huggingface_hub's cache), and adapter names. Re-exported by
`mlx_edit.weights.lora`."""

from __future__ import annotations

from pathlib import Path

from mlx_edit.imaging.images import InputError
from mlx_edit.weights.core import WeightLoadError


MAX_LORA_SCALE = 100.0  # |scale| bound: far past any useful strength, far from overflow


def check_scale(scale, what: str = "LoRA scale") -> float:
    """`scale` as a float when it is a finite number with |scale| <= MAX_LORA_SCALE;
    else InputError naming `what`."""
    import math
    import numbers

    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise InputError(f"{what} must be a number, got {type(scale).__name__} {scale!r}")
    if not math.isfinite(scale) or abs(scale) > MAX_LORA_SCALE:
        raise InputError(f"{what} must be a finite number in [-{MAX_LORA_SCALE:g}, "
                         f"{MAX_LORA_SCALE:g}], got {scale}")
    return float(scale)


def split_spec(spec: str) -> tuple[str, float | None]:
    """'PATH_OR_REPO[:SCALE]' -> (source, scale or None): the one parser of --lora specs.
    A trailing ':NUMBER' is the scale (checked: `check_scale`); 'repo/id:file.safetensors'
    keeps its file part (see `locate`); an existing file is taken whole. Raises
    InputError for a scale that is not a number, not finite or out of range."""
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or tail.endswith(".safetensors") or Path(spec).expanduser().exists():
        return spec, None
    try:
        value = float(tail)
    except ValueError:
        raise InputError(f"--lora {spec!r}: the scale {tail!r} after ':' is not a number; "
                         "give PATH_OR_REPO[:SCALE]") from None
    return head, check_scale(value, f"--lora {spec!r}: the scale")


def locate(source: str | Path, weight_name: str | None = None) -> Path:
    """The local .safetensors file of a LoRA: a path, or a Hugging Face repo id
    (`owner/name`, `owner/name:file.safetensors` or with `weight_name`) fetched through
    huggingface_hub's cache (offline or without a network, only cached files are found,
    without retries). Raises WeightLoadError for a missing file, a folder, a repo with no
    or several .safetensors files (naming them) and failed downloads (one line)."""
    from mlx_edit.weights.sources import is_repo_id

    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise WeightLoadError(f"{text} is a folder, not a LoRA file: give its .safetensors "
                              "file")
    repo, _, file_part = text.partition(":") if ":" in text and "/" in text.split(":")[0] \
        else (text, "", "")
    if not is_repo_id(repo):
        raise WeightLoadError(f"{text}: no such LoRA file, and not a Hugging Face repo id")
    try:
        return _hub_file(repo, weight_name or file_part or None)
    except WeightLoadError:
        raise
    except Exception as e:  # hub errors are many; the message names the cause
        reason = " ".join(str(e).split())[:300]
        raise WeightLoadError(f"could not get LoRA {repo} from the Hugging Face Hub "
                              f"({type(e).__name__}: {reason}), and it is not in the hub's "
                              "cache: pass a local .safetensors file") from e


def _hub_file(repo: str, weight_name: str | None) -> Path:
    """The repo's `weight_name` (default: its one .safetensors file) through the hub's
    cache. snapshot_download falls back to the cache at once when the hub is unreachable
    (hf_hub_download and list_repo_files retry for half a minute)."""
    from huggingface_hub import model_info, snapshot_download  # network only when needed

    if weight_name is None:
        try:
            files = [s.rfilename for s in model_info(repo).siblings or []]
        except Exception as e:  # offline: what the cache holds
            try:
                folder = Path(snapshot_download(repo, allow_patterns=["*.safetensors"],
                                                local_files_only=True))
            except Exception:
                raise e from None  # the hub's reason, not the empty cache's
            files = [str(p.relative_to(folder)) for p in folder.rglob("*.safetensors")]
        files = [f for f in files if f.endswith(".safetensors")]
        if len(files) != 1:
            raise WeightLoadError(
                f"{repo}: {'no' if not files else 'several'} .safetensors files "
                f"({', '.join(files[:6])}); name one as {repo}:FILE or weight_name=")
        weight_name = files[0]
    path = Path(snapshot_download(repo, allow_patterns=[weight_name])) / weight_name
    if not path.is_file():
        raise WeightLoadError(f"{repo} has no file {weight_name}")
    return path


def default_name(source: str | Path, taken) -> str:
    """A short unique adapter name from a LoRA source ('style', 'style_2', ...)."""
    stem = Path(split_spec(str(source))[0].split(":")[-1]).stem or "lora"
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}_{n}", n + 1
    return name
