"""Image datasets read from a folder or a zip archive, as NVIDIA's StyleGAN2-ADA loader reads them.

Items are ``(image, label)``: ``image`` a ``uint8`` array ``[C, H, W]`` and ``label`` a
``float32`` vector of length ``label_dim`` (empty without labels). Labels come from an optional
``dataset.json`` at the root (``{"labels": [["relative/path.png", 3], ...]}``, as NVIDIA's
``dataset_tool.py`` writes): integers become one-hot vectors, lists stay as given.

Bad files never crash deep inside a loader worker without a name:

* files that are not images (junk in a zip, unreadable headers) are skipped at scan time with a
  warning naming them;
* images whose pixels turn out to be truncated or corrupt are skipped when first read, with a
  warning naming them, and the next good image is returned in their place;
* grayscale, palette and RGBA images are converted (alpha composited over white), and photos
  are turned upright by their EXIF orientation; 16-bit and 32-bit greyscale images are rescaled
  to 8 bits (float images from [0, 1]), and those whose values lie outside their mode's range
  are skipped when first read, with a warning naming them;
* images of another size are centre-cropped and resized, or rejected with an error naming the
  file when ``resize=False``; images smaller than ``min_size`` (8 pixels, or the resolution
  when that is smaller) are skipped with a warning;
* an empty folder or archive, or a file that is not a zip archive, is a ``ValueError``.
"""
from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

_EXIF_ORIENTATION = 0x0112
_LABELS_HINT = (": make the dataset with tools/make_dataset.py --labels-from-folders (one class "
                "per subfolder)")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# Shorter sides below this are thumbnails or icons, not training images (unless the run's
# resolution is smaller still).
DEFAULT_MIN_SIZE = 8


class DatasetError(ValueError):
    """The dataset cannot be used; the message names the file and what is wrong."""


class PixelRangeError(ValueError):
    """An image whose pixel values lie outside the range its mode implies (say, a float image
    beyond [0, 1]): the file is skipped, naming it, rather than trained on at a guessed scale."""


class Dataset:
    """Common interface of the image datasets: length, ``(image, label)`` items, x-flips."""

    name = "dataset"
    resolution: int
    num_channels: int
    label_dim: int = 0

    def __init__(self, raw_size: int, xflip: bool = False):
        self._raw_size = int(raw_size)
        self.xflip = bool(xflip)

    def __len__(self) -> int:
        return self._raw_size * (2 if self.xflip else 1)

    @property
    def image_shape(self) -> list[int]:
        return [self.num_channels, self.resolution, self.resolution]

    @property
    def has_labels(self) -> bool:
        return self.label_dim > 0

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        raw_index = index % self._raw_size
        image, label = self._load_item(raw_index)
        if self.xflip and index >= self._raw_size:
            image = image[:, :, ::-1]
        return np.ascontiguousarray(image), label

    def _load_item(self, raw_index: int):
        raise NotImplementedError

    def get_label(self, raw_index: int) -> np.ndarray:
        raise NotImplementedError

    def label_table(self) -> np.ndarray:
        """Labels of every distinct image, ``[raw size, label_dim]``, without decoding images."""
        return np.stack([self.get_label(i) for i in range(self._raw_size)])


def _to_rgb(img: Image.Image, channels: int) -> Image.Image:
    """``img`` upright (its EXIF orientation applied, as a viewer shows it) in RGB or L."""
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        # cameras store portrait shots sideways and say so in EXIF
        img = ImageOps.exif_transpose(img)
    if img.mode == "F" or img.mode.startswith("I"):
        # PIL's convert would clip these at 255 instead of rescaling: [0, 1] floats turn black
        img = Image.fromarray(_wide_to_8bit(np.asarray(img), img.mode), "L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        ground = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(ground, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def _wide_to_8bit(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Greyscale pixels of a 16-bit (``I;16*``), 32-bit integer (``I``) or 32-bit float (``F``)
    image as uint8, each value ``v`` of a range ``[0, peak]`` becoming ``round(v * 255 / peak)``.

    The range is a convention these files do not record: 16-bit images span [0, 65535]; ``I``
    images too (what 16-bit PNGs and TIFFs open as in older Pillow), unless no value exceeds 255
    (8-bit data stored wide); float images span [0, 1], as scientific and HDR tools write them.
    Values outside that range are refused, not clipped: a float image stored in [0, 255] or
    [-1, 1] would otherwise train as a washed-out or half-black image, without a word."""
    if mode == "F":
        peak = 1.0
    elif mode.startswith("I;16") or pixels.max(initial=0) > 255:
        peak = 65535
    else:
        peak = 255
    lowest, highest = pixels.min(initial=0), pixels.max(initial=0)
    if not (np.isfinite(lowest) and np.isfinite(highest)) or lowest < 0 or highest > peak:
        kind = "float" if mode == "F" else f"{mode} integer"
        raise PixelRangeError(
            f"its {kind} pixels span [{lowest:g}, {highest:g}], outside [0, {peak:g}], the "
            f"range batikfast reads {kind} images in; convert it to 8 or 16 bits")
    return np.rint(pixels.astype(np.float64) * (255 / peak)).astype(np.uint8)


def _centre_crop_resize(img: Image.Image, resolution: int) -> Image.Image:
    w, h = img.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.LANCZOS)
    return img


class ImageFolderDataset(Dataset):
    """Images from a folder (searched recursively) or a ``.zip`` archive.

    Args:
        path: folder or zip archive.
        resolution: output size (square); None takes the size of the first image, which must
            then be square.
        use_labels: read labels from ``dataset.json`` (an error when it is missing).
        xflip: double the dataset with mirrored copies.
        max_size: use at most this many images (the first ones in sorted order).
        channels: 3 (RGB) or 1 (grayscale).
        resize: centre-crop and resize images of another size; False rejects them.
        min_size: images whose shorter side is smaller are skipped with a warning (thumbnails
            and icons in scraped folders). None: 8 pixels, or ``resolution`` when smaller, so
            that an archive made at resolution 4 reads back.
        verify: decode every image at construction (slow) so that truncated files are found
            before training rather than when first read.
    """

    def __init__(self, path, resolution: int | None = None, use_labels: bool = False,
                 xflip: bool = False, max_size: int | None = None, channels: int = 3,
                 resize: bool = True, min_size: int | None = None, verify: bool = False):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        if resolution is not None and (int(resolution) != resolution or resolution < 1):
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        self.path = str(path)
        self.num_channels = channels
        self.resize = resize
        if min_size is None:
            min_size = min(DEFAULT_MIN_SIZE, resolution or DEFAULT_MIN_SIZE)
        self.min_size = int(min_size)
        self._zipfile, self._zipfile_pid = None, None
        self._type = self._detect_type(self.path)
        self.name = Path(self.path).stem
        names = sorted(n for n in self._all_names() if n.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise DatasetError(
                f"no images found in {self.path!r} (looked for files ending in "
                f"{', '.join(IMAGE_EXTENSIONS)})")
        names, sizes = self._scan(names, resolution, verify)
        if not names:
            raise DatasetError(f"no readable images in {self.path!r}: every file was skipped "
                               "(see the warnings above)")
        if resolution is None:
            w, h = sizes[0]
            if w != h:
                raise DatasetError(
                    f"{self._describe(names[0])} is {w}x{h}, not square: pass resolution= "
                    "(--resolution) to centre-crop and resize every image")
            resolution = w
        self.resolution = int(resolution)
        # the side of every stored image when all are the same square (None otherwise)
        side = sizes[0][0]
        self.stored_resolution = side if all(size == (side, side) for size in sizes) else None
        if not resize:
            for name, (w, h) in zip(names, sizes):
                if (w, h) != (self.resolution, self.resolution):
                    raise DatasetError(
                        f"{self._describe(name)} is {w}x{h} but the dataset is "
                        f"{self.resolution}x{self.resolution}; resize it or allow resizing")
        if max_size is not None:
            names = names[:max_size]
        self._names = names
        self._bad: set[int] = set()
        self._labels = self._read_labels(names) if use_labels else None
        self.label_dim = 0 if self._labels is None else self._labels.shape[1]
        super().__init__(len(names), xflip)

    # ---- file access (folder or zip) -------------------------------------------------------
    @staticmethod
    def _detect_type(path: str) -> str:
        if os.path.isdir(path):
            return "dir"
        if not os.path.exists(path):
            raise DatasetError(f"dataset path {path!r} does not exist")
        if not zipfile.is_zipfile(path):
            raise DatasetError(f"dataset path {path!r} is neither a folder nor a zip archive")
        return "zip"

    def _get_zipfile(self) -> zipfile.ZipFile:
        # One handle per process: forked loader workers inherit the parent's open handle, whose
        # file offset they would share, so concurrent reads seek under each other and return
        # another member's bytes ("Bad magic number", "Bad CRC-32").
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            self._zipfile = zipfile.ZipFile(self.path)
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _all_names(self) -> list[str]:
        if self._type == "dir":
            root = Path(self.path)
            return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        try:
            return [n for n in self._get_zipfile().namelist() if not n.endswith("/")]
        except zipfile.BadZipFile as error:
            raise DatasetError(f"{self.path!r} is a damaged zip archive: {error}") from error

    def _read_bytes(self, name: str) -> bytes:
        if self._type == "dir":
            return (Path(self.path) / name).read_bytes()
        return self._get_zipfile().read(name)

    def _open_file(self, name: str):
        if self._type == "dir":
            return open(Path(self.path) / name, "rb")
        return self._get_zipfile().open(name)

    def _describe(self, name: str) -> str:
        return f"image {name!r} in {self.path!r}"

    def __getstate__(self):
        # Zip handles cannot cross into DataLoader worker processes; each worker reopens.
        return dict(self.__dict__, _zipfile=None)

    def close(self) -> None:
        if self._zipfile is not None:
            self._zipfile.close()
            self._zipfile = None

    # ---- scanning ---------------------------------------------------------------------------
    def _scan(self, names, resolution, verify):
        kept, sizes = [], []
        for name in names:
            try:
                # only the header is read unless verifying: scanning 20k files stays quick
                with self._open_file(name) as handle, Image.open(handle) as img:
                    size = img.size
                    if verify:
                        img.load()
            except Exception as error:  # PIL raises many types for junk
                warnings.warn(f"skipping {self._describe(name)}: cannot read it ({error})",
                              RuntimeWarning, stacklevel=3)
                continue
            if min(size) < self.min_size:
                warnings.warn(f"skipping {self._describe(name)}: {size[0]}x{size[1]} is smaller "
                              f"than the minimum of {self.min_size} pixels", RuntimeWarning,
                              stacklevel=3)
                continue
            kept.append(name)
            sizes.append(size)
        return kept, sizes

    def _read_labels(self, names):
        try:
            meta = json.loads(self._read_bytes("dataset.json"))
        except (FileNotFoundError, KeyError) as error:
            raise DatasetError(f"use_labels=True (--cond) but {self.path!r} has no dataset.json"
                               f"{_LABELS_HINT}") from error
        except json.JSONDecodeError as error:
            raise DatasetError(f"dataset.json in {self.path!r} is not valid JSON: {error}") from error
        table = meta.get("labels")
        if table is None:
            # what the dataset tool writes without --labels-from-folders
            raise DatasetError(f"use_labels=True (--cond) but dataset.json in {self.path!r} has "
                               f"no labels{_LABELS_HINT}")
        table = {str(k).replace("\\", "/"): v for k, v in table}
        missing = [n for n in names if n not in table]
        if missing:
            raise DatasetError(f"dataset.json in {self.path!r} has no label for {missing[0]!r}"
                               f" ({len(missing)} images without labels)")
        raw = [table[n] for n in names]
        if all(isinstance(v, int) for v in raw):
            ints = np.asarray(raw, dtype=np.int64)
            if ints.min() < 0:
                raise DatasetError(f"dataset.json in {self.path!r} has a negative class label")
            onehot = np.zeros((len(raw), int(ints.max()) + 1), dtype=np.float32)
            onehot[np.arange(len(raw)), ints] = 1
            return onehot
        return np.asarray(raw, dtype=np.float32).reshape(len(raw), -1)

    # ---- items ------------------------------------------------------------------------------
    def _decode(self, raw_index: int) -> np.ndarray:
        name = self._names[raw_index]
        with Image.open(io.BytesIO(self._read_bytes(name))) as img:
            img.load()
            img = _to_rgb(img, self.num_channels)
        if img.size != (self.resolution, self.resolution):
            if not self.resize:
                raise DatasetError(f"{self._describe(name)} is {img.size[0]}x{img.size[1]}, "
                                   f"not {self.resolution}x{self.resolution}")
            img = _centre_crop_resize(img, self.resolution)
        array = np.asarray(img, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        return array.transpose(2, 0, 1)

    def _load_item(self, raw_index: int):
        # A truncated file is replaced by the next readable one so that a long run survives it.
        for attempt in range(len(self._names)):
            index = (raw_index + attempt) % len(self._names)
            if index in self._bad:
                continue
            try:
                image = self._decode(index)
            except DatasetError:
                raise
            except Exception as error:
                self._bad.add(index)
                reason = (error if isinstance(error, PixelRangeError)
                          else f"cannot decode it ({error})")
                warnings.warn(f"skipping {self._describe(self._names[index])}: {reason}; using the "
                              "next image instead", RuntimeWarning, stacklevel=3)
                continue
            return image, self.get_label(index)
        raise DatasetError(f"no image in {self.path!r} could be decoded")

    def get_label(self, raw_index: int) -> np.ndarray:
        if self._labels is None:
            return np.zeros([0], dtype=np.float32)
        return self._labels[raw_index].copy()

    @property
    def filenames(self) -> list[str]:
        return list(self._names)
