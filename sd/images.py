"""Input pictures for img2img and inpainting: reading, resizing, masks, and pasting back.

Preprocessing follows diffusers' VaeImageProcessor so the same picture gives the same
tensor: convert (RGB, or grayscale for masks), Lanczos resize, scale to [0, 1], then
[-1, 1] for images and a 0/1 threshold at 0.5 for masks.
"""

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from .errors import InputError

ImageInput = Image.Image | bytes | bytearray | memoryview | str | Path


def read_image(value: ImageInput, field: str) -> Image.Image:
    """A PIL image from a PIL image, the bytes of an encoded file (PNG, JPEG, WebP, ...) or a path.
    Decoded files are turned upright by their EXIF orientation (as phones store photos), like
    diffusers' load_image; PIL images are taken as they are."""
    if isinstance(value, Image.Image):
        return value
    try:
        if isinstance(value, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, (str, Path)):
            image = Image.open(value)
        else:
            raise InputError(f"{field}: must be a PIL image, the bytes of an image file or a path, "
                             f"got {type(value).__name__}")
        image.load()  # decode now, so a truncated file fails here rather than later
        image = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise InputError(f"{field}: not a readable image (PNG, JPEG or WebP expected): {e}") from None
    return image


def working_size(image: Image.Image, width: int | None, height: int | None, multiple: int) -> tuple[int, int]:
    """The requested size, each side not given taken from the image rounded down to a multiple
    of `multiple`, as diffusers."""
    w, h = (v - v % multiple for v in image.size)
    if (width is None and w < multiple) or (height is None and h < multiple):
        raise InputError(f"image: must be at least {multiple}x{multiple} pixels, got {image.width}x{image.height}")
    return (w if width is None else width), (h if height is None else height)


def _resized(image: Image.Image, width: int, height: int) -> Image.Image:
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """The picture in RGB at the working size."""
    return _resized(image.convert("RGB"), width, height)


def image_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float32 in [-1, 1] from an RGB picture."""
    array = np.asarray(image, dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1


def mask_tensor(mask: Image.Image, width: int, height: int, image_size: tuple[int, int]) -> torch.Tensor:
    """(1, 1, H, W) float32, 1 where the picture is to be repainted (white), 0 where kept (black).

    A mask of another size than the input image is resized to the working size like the image,
    provided it has the same shape; one of a different aspect ratio is an error, as it almost
    surely belongs to another picture."""
    (mw, mh), (iw, ih) = mask.size, image_size
    if abs(mw / mh - iw / ih) > 0.01 * (iw / ih):
        raise InputError(f"mask: must have the image's aspect ratio (same size, or scaled), "
                         f"got {mw}x{mh} for a {iw}x{ih} image")
    array = np.asarray(_resized(mask.convert("L"), width, height), dtype=np.float32) / 255
    return torch.from_numpy((array >= 0.5).astype(np.float32))[None, None]


def paste_unmasked(generated: Image.Image, original: Image.Image, mask: torch.Tensor,
                   feather: int = 3) -> Image.Image:
    """The generated picture inside the mask, the original pixels (exactly) outside it.

    The VAE round trip changes every pixel a little; pasting back keeps what the mask keeps.
    The seam is softened inward only: a linear ramp over the `feather` pixels inside the mask's
    edge (a box blur of the mask, stretched so its 0.5 level maps to 0), so pixels outside the
    mask are the input's bit for bit and pixels deeper inside are the generated ones."""
    binary = mask[0, 0].numpy()
    blurred = Image.fromarray((binary * 255).astype(np.uint8)).filter(ImageFilter.BoxBlur(feather))
    weight = np.clip(2 * np.asarray(blurred, dtype=np.float32) / 255 - 1, 0, 1) * binary
    before = np.asarray(original, dtype=np.float32)
    after = np.asarray(generated, dtype=np.float32)
    blended = before * (1 - weight[..., None]) + after * weight[..., None]
    return Image.fromarray(np.round(blended).astype(np.uint8))
