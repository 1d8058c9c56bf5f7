"""The channel conditioning of the BFL FLUX.1-Canny/Depth-dev models (in_channels 128).

The control image (Canny edges computed here, depth maps given ready-made) is aligned to
the edit like a ControlNet's (`controlnet.align_control`), VAE-encoded (posterior mode),
scaled and packed: (1, N, 64), concatenated after the 64 noisy-latent channels by the
loop (BFL src/flux/sampling.py prepare_control; diffusers FluxControlPipeline).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_edit.conditioning.context import Conditioner, ConditioningContext
from mlx_edit.conditioning.controlnet import ControlNetSpec, align_control
from mlx_edit.imaging.images import InputError, load_image, to_array

BFL_CANNY = (50.0, 200.0)  # BFL cli_control.py's thresholds for FLUX.1-Canny-dev
# Control types of the BFL Canny/Depth models: edges computed here, or a ready-made map.
RESTYLE_TYPES = ("canny", "depth", "none")


def bfl_conditioner(control_image, control_type: str = "canny", *,
                    canny_low: float = BFL_CANNY[0], canny_high: float = BFL_CANNY[1]
                    ) -> Conditioner:
    """A `Conditioner` (ctx, canvas pixels, model mask) -> (1, N, 64): the latents of
    `control_image` (path, PIL or uint8 array, the framing of the edited image) aligned to
    ctx.plan and preprocessed for `control_type` (RESTYLE_TYPES; thresholds on the 0-255
    scale). The mask is not an input of these models.

    The image and numbers are checked here, so a bad file fails before the prompt is
    encoded. Raises InputError (type, thresholds, unreadable image; at build time, a
    transformer that is not a 128-channel control model).
    """
    if control_type not in RESTYLE_TYPES:
        raise InputError(f"control type {control_type!r} is not one of the BFL control "
                         f"models' ({', '.join(RESTYLE_TYPES)})")
    spec = ControlNetSpec(None, None, control_type, canny_low=canny_low, canny_high=canny_high)
    spec.validate()
    control_image = load_image(control_image)

    def build(ctx: ConditioningContext, pixels: np.ndarray, mask: np.ndarray) -> mx.array:
        in_ch = ctx.transformer.in_channels
        if in_ch != 2 * ctx.latent_channels:
            raise InputError(f"the transformer takes {in_ch} input channels; BFL Canny/Depth "
                             "control models take 128 (FLUX.1-Canny-dev / FLUX.1-Depth-dev)")
        control = align_control(control_image, ctx.plan.image_size, ctx.plan, spec)
        cond = ctx.encode_image(to_array(control))
        mx.eval(cond)
        return cond

    return build
