"""Write sklearn's 1797 handwritten 8x8 digits as PNG files, one folder per digit."""
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

digits = load_digits()
for i, (image, label) in enumerate(zip(digits.images, digits.target)):
    folder = Path("my-digits") / str(label)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = (image * 255 / 16).round().astype(np.uint8)  # 0..16 -> 0..255
    Image.fromarray(pixels, "L").save(folder / f"{i:04d}.png")
