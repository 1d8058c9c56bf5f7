"""Write a real photo and a mask to try mlx-edit with: DIR/photo.png, DIR/mask.png.

The photo is scikit-image's `astronaut` (shipped in its wheel); the mask is a white
rectangle over the helmet. Usage: python scripts/sample_photo.py DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data


def main(folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.astronaut()).save(out / "photo.png")
    mask = np.zeros((512, 512), np.uint8)
    mask[20:200, 150:330] = 255
    Image.fromarray(mask).save(out / "mask.png")
    print(out / "photo.png", out / "mask.png")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
