"""One image in, one model-ready ``uint8`` view out: decoding and the two geometric transforms.

Every path that turns stored images into pixels for a model (training input, evaluation, the
on-disk caches, the preparation script) goes through these functions, so the pixels are the same
whichever path a split takes.

* **Decoding** (:func:`decode_bytes`): libjpeg-turbo through ``torchvision.io.decode_image``
  (JPEG, PNG, WebP, GIF), with PIL as the fallback for everything else (BMP, TIFF, PPM, CMYK
  oddities). torchvision's JPEG decode is bit-identical to PIL's (both are libjpeg-turbo with the
  same settings) and measured 1.3x faster here, mostly by skipping PIL's image object.
* **Size limit** (:func:`check_declared_size`): before any pixel is decoded, the size the file's
  header declares is checked against :func:`max_image_pixels` (89,478,485 pixels by default, PIL's
  default limit; ``RFT_MAX_IMAGE_PIXELS`` changes it, ``0`` lifts it). rftlib keeps its own limit
  because libraries change PIL's global one on import (WILDS' FMoW module sets it to 10 billion).
  A larger declared size is a decompression bomb or a damaged header: the decoders would allocate
  gigabytes (libpng returned a 16k x 16k garbage image from a 100-byte file; libjpeg and libpng
  crashed the process), so it is an :class:`~rftlib.data.base.ImageReadError` naming the file,
  handled like any unreadable image (``on_bad_image="skip"`` drops it from training; evaluation
  stops). Reading the header costs about 30 us per image, under 1% of a decode.
* **Evaluation view** (:func:`center_view`): CLIP's eval transform, with torchvision's geometry:
  ``Resize(S)`` of the shorter side (the longer side *truncated*, as torchvision computes it), then
  ``CenterCrop(S)`` (margins rounded half-to-even, as torchvision does).
* **Training view** (:func:`training_view`): a crop box (from :mod:`rftlib.data.augment`) resized
  to ``S x S``, optionally mirrored.

Resampling is bicubic with antialiasing on ``uint8`` tensors (torch's vectorised uint8 kernel).
Against PIL's bicubic resize (what the reference code runs) the result differs by 0.011/255 on
average (at most 6/255 on a rare pixel) on camera-trap-like 600x448 JPEGs, and it is 4-5x
faster (0.5 ms instead of 2.6 ms per 224-px view on one core).

torchvision 0.29 deprecates its image codecs in favour of TorchCodec (>= 0.16). TorchCodec 0.17
decoded the same JPEGs to identical pixels at the same speed here, but it is built for one torch
release at a time while rftlib supports torch 2.4-2.14, so rftlib stays on torchvision's decoder
(present in every torchvision the pins allow) and silences that one warning.
"""

from __future__ import annotations

import io
import os
import re
import warnings

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from .base import ImageReadError

BICUBIC = TF.InterpolationMode.BICUBIC
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)


def read_file(path: str) -> bytes:
    """The raw bytes of an image file (any path Python can open, undecodable names included)."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as err:
        raise ImageReadError(f"cannot read image {path!r}: {err}") from err


def decode_bytes(data: bytes, where: str) -> torch.Tensor:
    """Decode an encoded image to RGB ``uint8`` (3, H, W).

    Args:
        data: the encoded bytes.
        where: what to name in an error message (the file path).

    Raises:
        ImageReadError: naming ``where``, when neither decoder can read the bytes, or when the
            declared size is over the limit (:func:`check_declared_size`).
    """
    check_declared_size(data, where)
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        image = decode_image(buffer, mode=ImageReadMode.RGB)
        return image[0] if image.ndim == 4 else image  # an animated GIF: its first frame
    except RuntimeError:
        return _decode_with_pil(data, where)


DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
"""The default of :func:`max_image_pixels` (PIL's own default: about 0.25 GB of RGB pixels)."""


def max_image_pixels() -> int | None:
    """The most pixels an image file may declare: ``$RFT_MAX_IMAGE_PIXELS`` (``0``: no limit), else
    :data:`DEFAULT_MAX_IMAGE_PIXELS`. An environment variable, so decoding worker processes see it."""
    text = os.environ.get("RFT_MAX_IMAGE_PIXELS", "").strip().replace("_", "")
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        limit = int(float(text))
    except ValueError:
        raise ValueError(f"RFT_MAX_IMAGE_PIXELS={text!r} is not a number of pixels (0: no limit)") from None
    return limit if limit > 0 else None


def check_declared_size(data: bytes, where: str) -> None:
    """Refuse an image whose header declares more than :func:`max_image_pixels` pixels.

    Only the header is read (PIL's lazy open). Bytes PIL cannot identify pass: the decoders report
    them.

    Raises:
        ImageReadError: naming ``where``, the declared size and the limit.
    """
    from PIL import Image

    limit = max_image_pixels()
    if limit is None:
        return
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Image.DecompressionBombError as err:  # PIL's own (global) limit, at twice its setting
        declared = re.search(r"\((\d+) pixels\)", str(err))
        if declared is None:
            raise ImageReadError(f"cannot read image {where!r}: {err}") from err
        if int(declared[1]) > limit:
            raise ImageReadError(_too_large(where, f"it declares {int(declared[1]):,} pixels", limit)) from err
        return  # under rftlib's limit: torchvision decodes it (PIL, the fallback, would refuse it)
    except Exception:  # noqa: BLE001 - not PIL's to judge: the decoders below name the file
        return
    if width * height > limit:
        raise ImageReadError(_too_large(where, f"it declares {width} x {height} = {width * height:,} pixels", limit))


def _too_large(where: str, detail: str, limit: int) -> str:
    return (f"cannot read image {where!r}: {detail}, over the limit of {limit:,} pixels: a decompression bomb "
            "or a damaged header. Remove the file, or, if the image is genuine, raise the limit with "
            "RFT_MAX_IMAGE_PIXELS=<pixels> (0: no limit)")


def _decode_with_pil(data: bytes, where: str) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise ImageReadError(f"cannot read image {where!r}: {type(err).__name__}: {err}") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def read_image(path: str) -> torch.Tensor:
    """Read and decode one image file to RGB ``uint8`` (3, H, W); errors name the file."""
    return decode_bytes(read_file(path), path)


def crop_border(image: torch.Tensor, border: int) -> torch.Tensor:
    """``uint8`` (..., 3, H, W) without its outer ``border`` pixels on every side (PIL's
    ``image.crop((b, b, W - b, H - b))``, as WiSE-FT cuts ObjectNet's frame).

    Raises:
        ImageReadError: the image is not larger than twice the border (nothing would be left).
    """
    if border == 0:
        return image
    height, width = image.shape[-2:]
    if height <= 2 * border or width <= 2 * border:
        raise ImageReadError(f"a {width}x{height} image is too small to lose a {border}-px border")
    return image[..., border:height - border, border:width - border]


def resize_geometry(height: int, width: int, size: int) -> tuple[int, int]:
    """The (height, width) that ``torchvision.transforms.Resize(size)`` gives: the shorter side
    becomes ``size`` and the longer one ``int(size * long / short)`` (truncated)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of ``torchvision.transforms.CenterCrop(size)`` (half-to-even rounding)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def center_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP's eval transform on ``uint8`` (..., 3, H, W): shorter side to ``size``, centre crop.

    The geometry is open_clip's (torchvision ``Resize`` + ``CenterCrop``) exactly, tested on awkward
    sizes; the resampling is torch's uint8 bicubic with antialias instead of PIL's bicubic: on
    photo-like images the two differ by at most 1 level and by 0.004 levels on average, against
    2.8-9.5 levels for a one-pixel crop shift (``tests/test_eval_transform.py``).
    """
    height, width = image.shape[-2:]
    new_h, new_w = resize_geometry(height, width, size)
    if (new_h, new_w) != (height, width):
        image = TF.resize(image, [new_h, new_w], interpolation=BICUBIC, antialias=True)
    top, left = center_crop_offsets(new_h, new_w, size)
    return image[..., top:top + size, left:left + size]


def training_view(image: torch.Tensor, box: tuple[int, int, int, int], flip: bool, size: int) -> torch.Tensor:
    """The crop ``box = (top, left, height, width)`` of ``uint8`` (3, H, W) resized to ``size x size``
    (bicubic, antialiased), mirrored left-right when ``flip``."""
    top, left, height, width = box
    view = TF.resized_crop(image, top, left, height, width, [size, size], interpolation=BICUBIC, antialias=True)
    return view.flip(-1) if flip else view
