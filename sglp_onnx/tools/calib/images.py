"""Images into a vision model's input: decoded with Pillow, the short side
resized and the centre cropped to the model's size, colour or grey, laid out
NCHW or NHWC as the graph declares, and normalised as the model was trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import UserError
from ...files.calibration import InputSpec, format_shape

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# Mean and std on the 0..1 scale (Deng et al. 2009 statistics, as torchvision's
# and timm's ImageNet models expect); inception-style models map to [-1, 1].
PRESET_STATS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "unit": ((0.0,), (1.0,)),
}


@dataclass(frozen=True)
class ImageInput:
    """How a model's image input is laid out: channels 1 or 3, size, layout."""

    spec: InputSpec
    channels: int
    height: int
    width: int
    layout: str  # "nchw" or "nhwc"

    def describe(self) -> str:
        return f"{self.layout.upper()}, {self.channels} channel(s), {self.height}x{self.width}"


def is_image_input(spec: InputSpec) -> bool:
    """A rank-4 float or 8-bit input."""
    return spec.shape is not None and len(spec.shape) == 4 and np.dtype(spec.dtype).kind in "fu"


def image_input(spec: InputSpec, *, layout: str | None, size: tuple[int, int] | None) -> ImageInput:
    """The layout (the axis of 1 or 3 channels, or `layout`), channels and size of `spec`."""
    dims = [d if isinstance(d, int) and d > 0 else None for d in spec.shape]
    if layout is None:
        first, last = dims[1] in (1, 3), dims[3] in (1, 3)
        if first == last:
            raise UserError(f"cannot tell the layout of the model input {spec.name!r} {format_shape(spec.shape)} "
                            "(no single axis of 1 or 3 channels); pass --layout nchw or --layout nhwc")
        layout = "nchw" if first else "nhwc"
    channels, hw = (dims[1], dims[2:4]) if layout == "nchw" else (dims[3], dims[1:3])
    if channels not in (1, 3):
        raise UserError(f"the model input {spec.name!r} {format_shape(spec.shape)} read as {layout.upper()} has "
                        f"{channels or 'a variable number of'} channels; images give 1 (grey) or 3 (colour)")
    if size is not None:
        fixed = [(g, w) for g, w in zip(hw, size) if g is not None and g != w]
        if fixed:
            raise UserError(f"--size {size[0]},{size[1]}, but the model input {spec.name!r} is fixed to "
                            f"{format_shape(spec.shape)}")
        hw = list(size)
    if None in hw:
        raise UserError(f"the model input {spec.name!r} {format_shape(spec.shape)} leaves its height or width open; "
                        "pass --size HEIGHT,WIDTH (the size the model was trained at)")
    return ImageInput(spec=spec, channels=channels, height=hw[0], width=hw[1], layout=layout)


def find_images(paths: list[Path]) -> list[Path]:
    """Image files: each file given, and those under each folder (by suffix), sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise UserError(f"no images found in {path} (looked for {', '.join(IMAGE_SUFFIXES)} files)")
            found.extend(inside)
        else:
            found.append(path)
    return found


def load_crop(path: Path, target: ImageInput, crop_fraction: float) -> np.ndarray:
    """The image at `path` as uint8 (height, width, channels): short side resized
    to size / crop_fraction, centre cropped to the model's size."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UserError("reading images needs Pillow: pip install 'sglp-onnx[calib]'") from None
    try:
        with Image.open(path) as image:
            image.load()
            image = image.convert("L" if target.channels == 1 else "RGB")
    except UnidentifiedImageError:
        raise UserError(f"cannot read {path}: not an image Pillow can decode (JPEG, PNG, ...)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise UserError(f"cannot read {path}: corrupt or truncated image ({exc})") from None
    width, height = image.size
    scale = max(target.height / height, target.width / width) / crop_fraction
    resized = (max(target.width, math.ceil(width * scale - 1e-6)), max(target.height, math.ceil(height * scale - 1e-6)))
    image = image.resize(resized, Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (resized[0] - target.width) // 2, (resized[1] - target.height) // 2
    image = image.crop((left, top, left + target.width, top + target.height))
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def normalisation(target: ImageInput, preset: str | None, mean: tuple[float, ...] | None,
                  std: tuple[float, ...] | None) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    """(preset, mean, std) in pixel units (0..255): raw for integer inputs,
    imagenet for 3-channel float inputs and unit for grey ones, unless given."""
    integer = np.dtype(target.spec.dtype).kind in "iu"
    if preset is None:
        preset = "raw" if integer and mean is None and std is None else \
            "imagenet" if target.channels == 3 else "unit"
    if preset == "raw":
        if mean is not None or std is not None:
            raise UserError("--mean and --std go with a 0..1 scale; --preset raw feeds 0..255 as they are")
        return preset, None, None
    if integer:
        raise UserError(f"the model input {target.spec.name!r} is {np.dtype(target.spec.dtype).name}: it takes raw "
                        "pixels (--preset raw), not normalised ones")
    base_mean, base_std = PRESET_STATS[preset]
    mean, std = mean or base_mean, std or base_std
    for flag, values in (("--mean", mean), ("--std", std)):
        if len(values) not in (1, target.channels):
            raise UserError(f"{flag} has {len(values)} values; the model has {target.channels} channel(s)")
    if target.channels == 1 and len(mean) == 3 and preset == "imagenet" and (mean, std) == (base_mean, base_std):
        mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
    return preset, np.asarray(mean, np.float64) * 255.0, np.asarray(std, np.float64) * 255.0


def to_model(pixels: np.ndarray, target: ImageInput, mean: np.ndarray | None, std: np.ndarray | None,
             channel_order: str) -> np.ndarray:
    """uint8 (samples, height, width, channels) as the model's input array."""
    if channel_order == "bgr" and target.channels == 3:
        pixels = pixels[..., ::-1]
    dtype = np.dtype(target.spec.dtype)
    if mean is None:
        array = pixels.astype(dtype)
    else:
        if channel_order == "bgr" and target.channels == 3:
            mean, std = mean[::-1], std[::-1]
        array = ((pixels.astype(np.float64) - mean) / std).astype(dtype)
    return np.ascontiguousarray(array.transpose(0, 3, 1, 2) if target.layout == "nchw" else array)


def write_preview(pixels: np.ndarray, path: Path, *, columns: int = 8, scale: int | None = None) -> None:
    """A grid of the first crops (what the model sees, before normalisation) as a PNG at `path`."""
    from PIL import Image

    tiles = pixels[: columns * 4]
    n, height, width, channels = tiles.shape
    scale = scale or max(1, 96 // max(height, width))
    columns = min(columns, n)
    rows = -(-n // columns)
    grid = np.full((rows * (height + 2), columns * (width + 2), channels), 255, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        grid[r * (height + 2) + 1:r * (height + 2) + 1 + height, c * (width + 2) + 1:c * (width + 2) + 1 + width] = tile
    image = Image.fromarray(grid[:, :, 0] if channels == 1 else grid)
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    image.save(path, format="PNG")

