"""Where LoRA files come from: `PATH_OR_REPO[:SCALE]` specs, local files or Hugging Face
repos (through huggingface_hub's cache), and adapter names. Re-exported by
`mlx_edit.weights.lora`."""

from __future__ import annotations

from pathlib import Path

from mlx_edit.weights.core import WeightLoadError


def split_spec(spec: str) -> tuple[str, float | None]:
    """'PATH_OR_REPO[:SCALE]' -> (source, scale or None). A trailing ':number' is the scale;
    'repo/id:file.safetensors' keeps its file part (see `locate`)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, None


def locate(source: str | Path, weight_name: str | None = None) -> Path:
    """The local .safetensors file of a LoRA: a path, or a Hugging Face repo id
    (`owner/name`, `owner/name:file.safetensors` or with `weight_name`) fetched through
    huggingface_hub's cache. Raises WeightLoadError for a missing file, a repo with no
    or several .safetensors files (naming them) and failed downloads."""
    from mlx_edit.weights.sources import is_repo_id

    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    repo, _, file_part = text.partition(":") if ":" in text and "/" in text.split(":")[0] \
        else (text, "", "")
    weight_name = weight_name or file_part or None
    if not is_repo_id(repo):
        raise WeightLoadError(f"{text}: no such LoRA file, and not a Hugging Face repo id")
    from huggingface_hub import hf_hub_download, list_repo_files  # network only when needed

    try:
        if weight_name is None:
            files = [f for f in list_repo_files(repo) if f.endswith(".safetensors")]
            if len(files) != 1:
                raise WeightLoadError(
                    f"{repo}: {'no' if not files else 'several'} .safetensors files "
                    f"({', '.join(files[:6])}); name one as {repo}:FILE or weight_name=")
            weight_name = files[0]
        return Path(hf_hub_download(repo, weight_name))
    except WeightLoadError:
        raise
    except Exception as e:  # hub errors are many; the message names the cause
        raise WeightLoadError(f"could not download LoRA {repo} ({type(e).__name__}: {e})") from e


def default_name(source: str | Path, taken) -> str:
    """A short unique adapter name from a LoRA source ('style', 'style_2', ...)."""
    stem = Path(split_spec(str(source))[0].split(":")[-1]).stem or "lora"
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}_{n}", n + 1
    return name
