"""`mlx-edit convert`: a checkpoint -> an mlx-edit folder, quantized or not.

    mlx-edit convert SOURCE DEST [--dtype bfloat16|float16|float32] [--quantize 4|8]
        [--group-size 32|64|128] [--component-bits transformer=4,text_encoder_2=8]
        [--vae PATH] [--text-encoders PATH] [--transformer-config FILE]
        [--max-shard-size 5GB] [--lora PATH_OR_REPO[:SCALE] ...] [--overwrite]

The library is `mlx_edit.weights.convert.convert_checkpoint`; heavy imports happen
inside the command so that `mlx-edit --help` stays fast. Exit status: 0 done, 2 any
error (one line: a usage error, a damaged or mismatching checkpoint, a DEST that is not
an earlier mlx-edit conversion, which --overwrite never replaces).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlx_edit.cli.errors import OneLineCommand
from mlx_edit.cli.lora import lora_option

HELP_SOURCE = """Convert SOURCE into the mlx-edit folder DEST.

SOURCE: a Hugging Face repo id (e.g. black-forest-labs/FLUX.1-Fill-dev), a diffusers
folder, a BFL single file (flux1-fill-dev.safetensors; the VAE and text encoders come
from --vae / --text-encoders, or from ae.safetensors and text_encoder/ next to it), or
an mlx-edit folder (to re-quantize or change the dtype). A FLUX ControlNet (diffusers
FluxControlNetModel folder or repo id, XLabs x-flux .safetensors) is detected and converted
on its own (--dtype, --quantize, --group-size; --transformer-config gives its config).
A SAM 2.1 folder (transformers Sam2Model, Meta's names, or mlx-edit) is converted on its own
too (--dtype; --quantize is refused, quoting the measured mask IoU vs float, while no bit
width measured harmless: benchmarks/RESULTS.md). So is a SAM 3 folder (transformers Sam3Model
or mlx-edit): --dtype only where its masks measured unchanged vs float32, --quantize
refused, each refusal quoting the measurement.

--quantize N quantizes the transformer and T5 (their attention and MLP layers; the
embedders, final layer, VAE and CLIP stay in full precision); --component-bits sets
bits per component (transformer, vae, text_encoder, text_encoder_2; 'none' = full
precision). --lora (repeatable) bakes LoRAs into the transformer before it is cast or
quantized; they are recorded in its config.json. DEST is written next to its final
place and renamed when complete.
"""


def _component_bits(ctx, param, value):
    if not value:
        return None
    from mlx_edit.weights.quantize import parse_component_bits

    try:
        return parse_component_bits(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


def _shard_size(ctx, param, value):
    from mlx_edit.weights.save import parse_size

    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


def _transformer_config(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise click.BadParameter(f"{path}: {e}", param_hint="--transformer-config") from None


@click.command("convert", help=HELP_SOURCE, cls=OneLineCommand)
@click.argument("source")
@click.argument("dest", type=click.Path(path_type=Path, file_okay=False))
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]),
              default="bfloat16", show_default=True, help="Floating-point dtype of DEST.")
@click.option("--quantize", "-q", type=click.Choice(["4", "8"]),
              help="Bits for the transformer and T5 (default: no quantization).")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64",
              show_default=True, help="Weights per quantization scale/bias.")
@click.option("--component-bits", callback=_component_bits,
              help="Per-component bits, e.g. transformer=4,text_encoder_2=8,vae=none.")
@click.option("--vae", help="VAE source: ae.safetensors, a vae/ folder, a model folder or repo id.")
@click.option("--text-encoders",
              help="Folder or repo id with text_encoder/, text_encoder_2/ and tokenizers.")
@click.option("--transformer-config", type=click.Path(path_type=Path, dir_okay=False,
                                                       exists=True),
              help="config.json for a BFL transformer or an x-flux ControlNet (needed when "
                   "head_dim != 128).")
@click.option("--max-shard-size", default="5GB", show_default=True, callback=_shard_size,
              help="Largest safetensors shard.")
@click.option("--overwrite", is_flag=True,
              help="Replace DEST if it is an earlier mlx-edit conversion (anything else is "
                   "refused).")
@lora_option
def convert_command(source, dest, dtype, quantize, group_size, component_bits, vae,
                    text_encoders, transformer_config, max_shard_size, overwrite, lora):
    from mlx_edit.cli.lora import parse_lora_specs
    from mlx_edit.weights.convert import ConversionError, convert_checkpoint
    from mlx_edit.weights.core import WeightLoadError

    try:
        convert_checkpoint(
            source, dest, dtype=dtype, quantize=int(quantize) if quantize else None,
            group_size=int(group_size), component_bits_override=component_bits, vae=vae,
            text_encoders=text_encoders,
            transformer_config=_transformer_config(transformer_config),
            overwrite=overwrite, max_shard_bytes=max_shard_size, log=click.echo,
            loras=parse_lora_specs(lora),
        )
    except ConversionError as e:
        raise click.UsageError(str(e)) from None
    except WeightLoadError as e:
        raise click.UsageError(str(e)) from None


def main(argv: list[str] | None = None, prog_name: str = "mlx-edit convert") -> None:
    """Run the command standalone (`python -m convert`)."""
    convert_command.main(args=argv, prog_name=prog_name)
