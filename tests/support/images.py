"""What a rendered PNG must look like to count as a picture, not an empty frame."""
from __future__ import annotations

from collections import Counter

import numpy as np


def not_blank(png: str) -> None:
    import matplotlib.image as mpimg
    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 400
    flat = (img[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    colours = np.unique(flat, axis=0)
    assert len(colours) > 20                        # slices in many task colours, text, axes
    background = Counter(map(tuple, flat[::7].tolist())).most_common(1)[0][1] / len(flat[::7])
    assert background < 0.95
