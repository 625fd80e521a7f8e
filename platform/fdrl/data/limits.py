"""Bounds on untrusted input, in one place: how many pixels an image may declare and how many bytes
one archive member may hold. Every image the data layer decodes (raw inputs of the converters,
shard samples) is opened through ``open_image``; every archive reader (shard tars, the CelebA zip,
LSUN's lmdb) checks ``MAX_MEMBER_BYTES`` against a member's declared size before reading it.

``MAX_IMAGE_PIXELS`` = 8192 x 8192 (67.1 Mpx). The largest legitimate inputs are user photos in
``folder`` sources: a 45 Mpx camera (8256 x 5504) fits. LSUN (about 256 px a side), CelebA
(178 x 218), CIFAR-10 (32 x 32) and every shard sample (the training resolution) are far below.
One image at the bound decodes to 192 MiB as RGB. An image that declares more is refused from its
header, before any pixel is decoded, as a decompression bomb. PIL's own check would only warn up
to twice its limit; here both PIL's warning and its error become ``DecompressionBombError`` with
the image named.

``MAX_MEMBER_BYTES`` = 256 MiB: an encoded image within the pixel bound is at most about its raw
RGBA size (4 bytes a pixel), so a bigger member is no image we would accept anyway.
"""

from __future__ import annotations

import warnings
from typing import IO

from PIL import Image

MAX_IMAGE_PIXELS = 8192 * 8192
MAX_MEMBER_BYTES = 4 * MAX_IMAGE_PIXELS

DecompressionBombError = Image.DecompressionBombError

# PIL reads its bound at each open; it also guards images opened outside ``open_image``.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# PIL only warns between 1x and 2x its bound; a warning is not a refusal. (``open_image`` checks
# the size itself too, so a process that resets the warning filters is still protected.)
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def bomb(what: str, detail: str) -> DecompressionBombError:
    return DecompressionBombError(f"{what}: decompression bomb: {detail} (the bound is "
                                  f"{MAX_IMAGE_PIXELS} pixels, fdrl.data.limits.MAX_IMAGE_PIXELS)")


def open_image(fp: str | IO[bytes], what: str) -> Image.Image:
    """``Image.open`` that refuses an image declaring more than ``MAX_IMAGE_PIXELS`` (read from its
    header; nothing is decoded yet) with a ``DecompressionBombError`` naming ``what``."""
    try:
        img = Image.open(fp)
    except (DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise bomb(what, str(err)) from None
    width, height = img.size
    if max(1, width) * max(1, height) > MAX_IMAGE_PIXELS:
        img.close()
        raise bomb(what, f"it declares {width} x {height} pixels")
    return img


def check_member_size(what: str, size: int) -> None:
    """Refuse an archive member by its declared size, before it is read."""
    if size > MAX_MEMBER_BYTES:
        raise ValueError(f"{what}: archive member declares {size} bytes, over the bound of "
                         f"{MAX_MEMBER_BYTES} (fdrl.data.limits.MAX_MEMBER_BYTES)")
