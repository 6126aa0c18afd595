"""Image datasets read from a folder or a zip archive, as NVIDIA's StyleGAN2-ADA loader reads them.

Items are ``(image, label)``: ``image`` a ``uint8`` array ``[C, H, W]`` and ``label`` a
``float32`` vector of length ``label_dim`` (empty without labels). Labels come from an optional
``dataset.json`` at the root (``{"labels": [["relative/path.png", 3], ...]}``, as NVIDIA's
``dataset_tool.py`` writes): integers become one-hot vectors, lists stay as given.

Bad files never crash deep inside a loader worker without a name:

* files that are not images (junk in a zip, unreadable headers) and files larger than any image
  (``MAX_IMAGE_BYTES``, 2 GiB: a zip bomb) are skipped at scan time with a warning naming them;
* images whose pixels turn out to be truncated or corrupt are skipped when first read, with a
  warning naming them (once a run: loader workers share what they find), and the next good
  image is returned in their place; an error raised in a loader worker reaches the caller as
  its own one-line message (``make_loader``);
* grayscale, palette and RGBA images are converted (alpha, or a colour made transparent,
  composited over white), and photos are turned upright by their EXIF orientation; 16-bit and
  32-bit greyscale images are rescaled to 8 bits (float images from [0, 1]), and those whose
  values lie outside their mode's range are skipped when first read, with a warning naming them;
* images of another size are centre-cropped and resized, or rejected with an error naming the
  file when ``resize=False``; among images of mixed sizes, those smaller than the resolution
  (enlarged, blurred) are counted in one warning naming the first few; images smaller than
  ``min_size`` (8 pixels, or the resolution when that is smaller) are skipped with a warning;
* an empty folder or archive, or a file that is not a zip archive, is a ``ValueError``;
* hidden files and folders (names starting with ``.``: ``.DS_Store``, macOS ``._*`` resource
  forks) and ``__MACOSX`` folders are not read (one warning counts those named like images);
  symbolic links are followed (a folder reached twice is read once), and a broken link, a
  folder that cannot be listed, a zip member whose path leaves the archive (``..``, absolute)
  and a repeated member name are skipped with a warning naming them;
* ``dataset.json`` labels are checked when read: a malformed file, an entry that is not a
  ``[path, label]`` pair, two different labels for one image, a label that is neither a class
  index nor a vector of finite numbers, and a mix of kinds or vector lengths are errors naming
  the image; labels of files that are not in the dataset are ignored;
* a file that cannot be read when first used (deleted or truncated since the scan) is skipped
  as a corrupt one is, and a dataset whose folder or archive is gone altogether is an error
  naming it, not one warning per image;
* Pillow's warnings about a file (a size over its decompression-bomb threshold, corrupt EXIF)
  are given once, at the scan, naming it, and the file is read (twice the threshold: skipped,
  naming it); animated and multi-page files give their first frame.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import multiprocessing
import multiprocessing.context
import os
import posixpath
import warnings
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps

_EXIF_ORIENTATION = 0x0112
_LABELS_HINT = (": make the dataset with tools/make_dataset.py --labels-from-folders (one class "
                "per subfolder)")
_LABELS_FORMAT = ('(dataset.json holds {"labels": [["relative/path.png", label], ...]}, a label '
                  "being a class index or a list of numbers)")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# Shorter sides below this are thumbnails or icons, not training images (unless the run's
# resolution is smaller still).
DEFAULT_MIN_SIZE = 8
# A class index beyond this is a mistake (an image number or an id), not a class: its one-hot
# table would not fit in memory for a dataset of any size. ImageNet-21k has 21841 classes.
MAX_CLASSES = 65536
# Each read loads the whole file into memory: a zip member that inflates to gigabytes (a zip
# bomb) would have a loader worker killed for memory, which names no file. No image Pillow
# decodes is this large: its pixel limit times 8 bytes a pixel is 1.4 GB.
MAX_IMAGE_BYTES = 2 << 30


class DatasetError(ValueError):
    """The dataset cannot be used; the message names the file and what is wrong."""


class PixelRangeError(ValueError):
    """An image whose pixel values lie outside the range its mode implies (say, a float image
    beyond [0, 1]): the file is skipped, naming it, rather than trained on at a guessed scale."""


def _unreadable_reason(error: Exception) -> str:
    if isinstance(error, PixelRangeError):
        return str(error)
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return f"cannot read it ({error.strerror}; it was readable when the dataset was opened)"
    return f"cannot decode it ({error})"


class UnreadableImages:
    """The indices of the images found unreadable when read. A loader's worker processes
    (forked or spawned) share one set, so that a bad file is reported once per run, by the
    first worker to meet it, and decoded once, not once by each worker. The process that made
    the set keeps its own: its reads (image grids, metric statistics) warn on its stderr only,
    and must not take away the worker's warning, which is the one the run's log receives."""

    def __init__(self, count: int):
        self._owner = os.getpid()
        self._own = bytearray(count)
        # A spawn-context lock, because one made in the fork context refuses to be passed to a
        # spawned or forkserver worker; forked workers inherit either kind.
        context = multiprocessing.get_context("spawn")
        try:
            self._flags, self._lock = context.RawArray("B", count), context.Lock()  # zeroed
        except (OSError, ImportError):  # no POSIX semaphores (some sandboxes, AWS Lambda):
            # each worker keeps its own set
            self._flags, self._lock = bytearray(count), contextlib.nullcontext()

    def __contains__(self, index: int) -> bool:
        return bool(self._record()[index])  # a byte read needs no lock

    def claim(self, index: int) -> bool:
        """Marks ``index`` unreadable; True in the one process that marked it first."""
        record = self._record()
        with self._lock if record is self._flags else contextlib.nullcontext():
            first = not record[index]
            record[index] = 1
        return first

    def _record(self):
        return self._own if os.getpid() == self._owner else self._flags

    def __getstate__(self):
        if multiprocessing.context.get_spawning_popen() is not None \
                and not isinstance(self._flags, bytearray):
            # a worker being started: it shares the workers' set
            return {"owner": self._owner, "flags": self._flags, "lock": self._lock}
        return {"known": bytes(self._record())}  # a copy (pickle, deepcopy): its own set

    def __setstate__(self, state):
        if "flags" in state:
            self._owner, self._own = state["owner"], bytearray(0)
            self._flags, self._lock = state["flags"], state["lock"]
            return
        self.__init__(len(state["known"]))
        self._own[:] = state["known"]


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


def _to_rgb(img: Image.Image, channels: int, where: str = "") -> Image.Image:
    """``img`` upright (its EXIF orientation applied, as a viewer shows it) in RGB or L, its
    colours in sRGB where it carries an ICC profile. ``where`` names the file in warnings."""
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        # cameras store portrait shots sideways and say so in EXIF
        img = ImageOps.exif_transpose(img)
    img = _in_srgb(img, where)
    if img.mode == "F" or img.mode.startswith("I"):
        # PIL's convert would clip these at 255 instead of rescaling: [0, 1] floats turn black
        img = Image.fromarray(_wide_to_8bit(np.asarray(img), img.mode), "L")
    # "transparency": a palette entry or, in L / RGB PNGs and GIFs, one colour made transparent
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        ground = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(ground, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def _in_srgb(img: Image.Image, where: str = "") -> Image.Image:
    """An RGB, RGBA or CMYK ``img`` with an embedded ICC profile, converted to sRGB (what the
    generated images are shown in). Scans of printed batik are often CMYK, camera and phone
    photos Adobe RGB or Display P3: read as stored, their colours shift (a P3 red as a duller
    sRGB one, CMYK values as if they were ink-free RGB). A profile that cannot be used leaves
    the pixels as stored, with a warning."""
    profile = img.info.get("icc_profile")
    if not profile or img.mode not in ("RGB", "RGBA", "CMYK"):
        return img
    try:
        transform = _srgb_transform(profile, img.mode)
        return img if transform is None else ImageCms.applyTransform(img, transform)
    except (ImageCms.PyCMSError, OSError, ValueError) as error:
        warnings.warn(f"{where + ': ' if where else ''}its ICC colour profile cannot be applied "
                      f"({error}); its {img.mode} values are read as sRGB", RuntimeWarning,
                      stacklevel=2)
        return img


@functools.lru_cache(maxsize=32)
def _srgb_transform(profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The transform from ``profile`` to sRGB, None where it is an sRGB profile already (most
    camera JPEGs carry one: converting costs ~36 ms a megapixel for no change). Cached:
    building a transform costs more than applying it, and datasets share a few profiles."""
    source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    if mode != "CMYK" and "srgb" in ImageCms.getProfileDescription(source).lower():
        return None
    return ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), mode,
                                   "RGBA" if mode == "RGBA" else "RGB")


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
    # (initial=0 would report 0 as the lowest value of an image of 255s)
    lowest, highest = (pixels.min(), pixels.max()) if pixels.size else (0, 0)
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



def _is_metadata(part: str) -> bool:
    """Hidden files and folders (``.DS_Store``, macOS ``._*`` resource forks, ``.git``) and the
    ``__MACOSX`` folder macOS adds to zips: never training images, even when named like one."""
    return part.startswith(".") or part == "__MACOSX"


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class FileListing:
    """Image files found under a folder or in a zip, and what was set aside while looking.

    ``names``: paths relative to the root as read back (posix in folders, as stored in zips),
    sorted; ``skipped``: ``(name, reason)`` of files named like images that cannot be images of
    the dataset, and of folders (``name`` ending in ``/``) that cannot be listed; ``hidden``:
    hidden and macOS metadata files named like images, not read."""

    def __init__(self):
        self.names: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        self.hidden: list[str] = []

    def hidden_note(self, where: str) -> str | None:
        if not self.hidden:
            return None
        return (f"not reading {len(self.hidden)} hidden or macOS metadata files named like images "
                f"in {where} (names starting with '.', __MACOSX folders), e.g. {self.hidden[0]!r}")


def list_folder_images(root) -> FileListing:
    """The image files under ``root``, searched recursively in sorted order.

    Symbolic links to files and folders are followed. A folder is read once: at its own path
    when it is inside ``root`` (links to it are not read again: a link to an ancestor is no
    loop), else at the first link found to it. Broken links and other files that are not
    regular files (pipes, sockets) are set aside, as are folders that cannot be listed."""
    listing, visited = FileListing(), set()
    folders, linked = [("", str(root))], []
    while folders or linked:
        # every real folder first, so that a folder's own path wins over a link to it
        prefix, folder = folders.pop() if folders else linked.pop(0)
        try:
            status = os.stat(folder)
            if (status.st_dev, status.st_ino) in visited:
                continue
            visited.add((status.st_dev, status.st_ino))
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            if not prefix:
                raise
            listing.skipped.append((prefix, f"cannot list it ({error.strerror or error})"))
            continue
        subfolders = []
        for entry in entries:
            name = prefix + entry.name
            if _is_metadata(entry.name):
                if _is_image_name(entry.name) and not entry.is_dir():
                    listing.hidden.append(name)
            elif entry.is_dir():
                (linked if entry.is_symlink() else subfolders).append((name + "/", entry.path))
            elif not _is_image_name(entry.name):
                continue
            elif entry.is_file():
                listing.names.append(name)
            elif entry.is_symlink():
                listing.skipped.append(
                    (name, f"it is a broken symbolic link (to {os.readlink(entry.path)!r})"))
            else:
                listing.skipped.append((name, "it is not a regular file"))
        folders.extend(reversed(subfolders))  # depth first, in name order
    listing.names.sort()
    return listing


def list_zip_images(archive: zipfile.ZipFile) -> FileListing:
    """The image members of ``archive``, sorted; folders are left out, and members whose path
    leaves the archive (absolute, a drive, ``..``), which no archiver of a folder writes, are
    set aside, as are repeated names but the last (the copy ``ZipFile.read`` returns)."""
    listing, copies = FileListing(), {}
    for info in archive.infolist():
        if not info.is_dir() and _is_image_name(info.filename):
            copies[info.filename] = copies.get(info.filename, 0) + 1
    for name, count in copies.items():
        parts = name.replace("\\", "/").split("/")
        if any(_is_metadata(part) for part in parts if part not in ("", ".", "..")):
            listing.hidden.append(name)
            continue
        if not parts[0] or ".." in parts or parts[0].endswith(":"):
            listing.skipped.append((name, "its path leaves the archive (absolute or through "
                                          "'..'), which no archive of a dataset holds"))
            continue
        if count > 1:
            listing.skipped.append((name, f"{count - 1} earlier member(s) of the same name (the "
                                          f"archive holds it {count} times; the last is read)"))
        listing.names.append(name)
    listing.names.sort()
    return listing


def _label_key(path: str) -> str:
    """A path of dataset.json or of the dataset, as both are compared: posix, normalised."""
    return posixpath.normpath(str(path).replace("\\", "/"))


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number"}.get(type(value), "null")


def _short_json(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _label_table(table, where: str) -> dict:
    """``{normalised path: label}`` of dataset.json's ``labels``: ``[[path, label], ...]``."""
    if not isinstance(table, list):
        raise DatasetError(f"{where}: \"labels\" is a JSON {_json_type(table)}, not an array "
                           f"{_LABELS_FORMAT}")
    labels = {}
    for position, entry in enumerate(table):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise DatasetError(f"{where}: entry {position} of \"labels\" is "
                               f"{_short_json(entry)}, not a [path, label] pair {_LABELS_FORMAT}")
        key = _label_key(entry[0])
        if key in labels and labels[key] != entry[1]:
            raise DatasetError(f"{where} gives {entry[0]!r} two labels, "
                               f"{_short_json(labels[key])} and {_short_json(entry[1])}")
        labels[key] = entry[1]
    return labels


def _is_finite_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _label_kind(value) -> str | None:
    """"class" (an integer >= 0; a float of integral value, as some JSON writers store every
    number), "vector" (a non-empty list of finite numbers), or None (not a label)."""
    if _is_finite_number(value) and value >= 0 and float(value).is_integer():
        return "class"
    if isinstance(value, list) and value and all(_is_finite_number(v) for v in value):
        return "vector"
    return None


def _describe_label(label, kind: str) -> str:
    kind_text = "the class index" if kind == "class" else f"a vector of {len(label)}"
    return f"{kind_text} {_short_json(label)}"


def _label_array(names, values, where: str) -> np.ndarray:
    """``[len(names), label_dim]`` float32: class indices one-hot, vectors as given."""
    kinds = [_label_kind(value) for value in values]
    for name, value, kind in zip(names, values, kinds):
        if kind is None:
            hint = (f" (a continuous value goes in a list: [{value}])"
                    if _is_finite_number(value) and value >= 0 else "")
            raise DatasetError(f"{where} gives {name!r} the label {_short_json(value)}: a label "
                               f"is a class index (an integer >= 0) or a vector (a list of finite "
                               f"numbers){hint}")
        if kind != kinds[0] or (kind == "vector" and len(value) != len(values[0])):
            raise DatasetError(f"{where} gives {names[0]!r} {_describe_label(values[0], kinds[0])}"
                               f" but {name!r} {_describe_label(value, kind)}: every image's "
                               "label must be of one kind and length")
    if kinds[0] == "vector":
        return np.asarray(values, dtype=np.float32)
    classes = np.asarray(values, dtype=np.int64)
    if classes.max() >= MAX_CLASSES:
        largest = names[int(classes.argmax())]
        raise DatasetError(f"{where} gives {largest!r} the class index {int(classes.max())}: more "
                           f"than {MAX_CLASSES} classes would be a one-hot table of "
                           f"{len(values)} x {int(classes.max()) + 1} floats (an image number or "
                           "an id where a class index goes?)")
    onehot = np.zeros((len(values), int(classes.max()) + 1), dtype=np.float32)
    onehot[np.arange(len(values)), classes] = 1
    return onehot

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
        if max_size is not None and (int(max_size) != max_size or max_size < 1):
            raise ValueError(f"max_size must be a positive integer or None, got {max_size!r}")
        self.path = str(path)
        self.num_channels = channels
        self.resize = resize
        if min_size is None:
            min_size = min(DEFAULT_MIN_SIZE, resolution or DEFAULT_MIN_SIZE)
        self.min_size = int(min_size)
        self._zipfile, self._zipfile_pid = None, None
        self._type = self._detect_type(self.path)
        self.name = Path(self.path).stem
        # images Pillow warned about at the scan (a decompression-bomb size, corrupt EXIF), said
        # there once naming them: their reads are quiet
        self._warned: set[str] = set()
        names = self._list_images()
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
            names, sizes = names[:max_size], sizes[:max_size]
        if resize and self.stored_resolution is None:
            self._warn_about_upscaling(names, sizes)
        self._names = names
        self._unreadable = UnreadableImages(len(names))
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
            with open(path, "rb") as handle:
                if handle.read(4) == b"PK\x03\x04":
                    raise DatasetError(
                        f"dataset path {path!r} is a damaged zip archive: its end (the central "
                        "directory) is missing, as when a copy or download was cut short")
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

    def _list_images(self) -> list[str]:
        """Sorted names of the image files, warning about those set aside."""
        try:
            if self._type == "dir":
                listing = list_folder_images(self.path)
            else:
                listing = list_zip_images(self._get_zipfile())
        except zipfile.BadZipFile as error:
            raise DatasetError(f"{self.path!r} is a damaged zip archive: {error}") from error
        except OSError as error:
            raise DatasetError(f"cannot read the dataset {self.path!r}: "
                               f"{error.strerror or error}") from error
        for name, reason in listing.skipped:
            what = (f"folder {name!r} in {self.path!r}" if name.endswith("/")
                    else self._describe(name))
            warnings.warn(f"skipping {what}: {reason}", RuntimeWarning, stacklevel=4)
        note = listing.hidden_note(repr(self.path))
        if note:
            warnings.warn(note, RuntimeWarning, stacklevel=4)
        return listing.names

    def _read_bytes(self, name: str) -> bytes:
        if self._type == "dir":
            return (Path(self.path) / name).read_bytes()
        return self._get_zipfile().read(name)

    def _open_file(self, name: str):
        if self._type == "dir":
            return open(Path(self.path) / name, "rb")
        return self._get_zipfile().open(name)

    def _stored_bytes(self, name: str) -> int:
        if self._type == "dir":
            return os.stat(Path(self.path) / name).st_size
        return self._get_zipfile().getinfo(name).file_size

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
            # Pillow's own warnings (a decompression-bomb size, bad metadata) name no file
            with warnings.catch_warnings(record=True) as pillow_warnings:
                warnings.simplefilter("always")
                try:
                    stored_bytes = self._stored_bytes(name)
                    # only the header is read unless verifying: scanning 20k files stays quick
                    with self._open_file(name) as handle, Image.open(handle) as img:
                        size = img.size
                        if verify:
                            img.load()
                except Exception as error:  # PIL raises many types for junk
                    size, reason = None, error
            for caught in pillow_warnings:
                self._warn_for_pillow(name, caught, size)
            if size is None:
                warnings.warn(f"skipping {self._describe(name)}: cannot read it ({reason})",
                              RuntimeWarning, stacklevel=3)
                continue
            if stored_bytes > MAX_IMAGE_BYTES:
                warnings.warn(f"skipping {self._describe(name)}: it is {stored_bytes / 2**30:.1f} "
                              f"GiB (inflated), more than any image it could hold (a zip bomb?); "
                              "reading it would exhaust a loader worker's memory", RuntimeWarning,
                              stacklevel=3)
                continue
            if min(size) < self.min_size:
                warnings.warn(f"skipping {self._describe(name)}: {size[0]}x{size[1]} is smaller "
                              f"than the minimum of {self.min_size} pixels", RuntimeWarning,
                              stacklevel=3)
                continue
            kept.append(name)
            sizes.append(size)
        return kept, sizes

    def _warn_about_upscaling(self, names, sizes) -> None:
        """Images of mixed sizes, some of them smaller than the resolution (thumbnails among
        photos): those are enlarged, blurred, at every read. One warning naming the first few.
        (When every image is smaller, the training loop refuses the dataset.)"""
        small = [(name, size) for name, size in zip(names, sizes)
                 if min(size) < self.resolution]
        if not small:
            return
        examples = ", ".join(f"{name!r} ({w}x{h})" for name, (w, h) in small[:3])
        warnings.warn(f"{len(small)} of the {len(names)} images in {self.path!r} are smaller than "
                      f"{self.resolution}x{self.resolution} and are enlarged (blurred) at every "
                      f"read: {examples}{', ...' if len(small) > 3 else ''}; leave them out or "
                      f"pass a smaller resolution", RuntimeWarning, stacklevel=3)

    def _warn_for_pillow(self, name: str, caught: warnings.WarningMessage, size) -> None:
        self._warned.add(name)
        if issubclass(caught.category, Image.DecompressionBombWarning) and size is not None:
            message = (f"{self._describe(name)} is {size[0]}x{size[1]} "
                       f"({size[0] * size[1] / 1e6:.0f} megapixels), over Pillow's "
                       "decompression-bomb threshold: it is read, but slowly at every use "
                       "(tools/make_dataset.py stores it at the training size once)")
        else:
            message = f"{self._describe(name)}: {caught.message}"
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _read_labels(self, names):
        where = f"dataset.json in {self.path!r}"
        try:
            meta = json.loads(self._read_bytes("dataset.json"))
        except (FileNotFoundError, KeyError) as error:
            raise DatasetError(f"use_labels=True (--cond) but {self.path!r} has no dataset.json"
                               f"{_LABELS_HINT}") from error
        except (OSError, zipfile.BadZipFile, RuntimeError) as error:  # a folder, a bad member
            raise DatasetError(f"cannot read {where}: {error}") from error
        except ValueError as error:  # JSONDecodeError, and UnicodeDecodeError for binary junk
            raise DatasetError(f"{where} is not valid JSON: {error}") from error
        if not isinstance(meta, dict):
            raise DatasetError(f"{where} is a JSON {_json_type(meta)}, not an object "
                               f"{_LABELS_FORMAT}")
        table = meta.get("labels")
        if table is None:
            # what the dataset tool writes without --labels-from-folders
            raise DatasetError(f"use_labels=True (--cond) but {where} has no labels{_LABELS_HINT}")
        labels = _label_table(table, where)
        missing = [n for n in names if _label_key(n) not in labels]
        if missing:
            raise DatasetError(f"{where} has no label for {missing[0]!r}"
                               f" ({len(missing)} images without labels)")
        return _label_array(names, [labels[_label_key(n)] for n in names], where)

    # ---- items ------------------------------------------------------------------------------
    def _decode(self, raw_index: int) -> np.ndarray:
        name = self._names[raw_index]
        data = self._read_bytes(name)
        if self._warned and name in self._warned:
            with warnings.catch_warnings():  # said at the scan, naming the file
                warnings.simplefilter("ignore")
                img = self._open_image(data, name)
        else:
            img = self._open_image(data, name)
        if img.size != (self.resolution, self.resolution):
            if not self.resize:
                raise DatasetError(f"{self._describe(name)} is {img.size[0]}x{img.size[1]}, "
                                   f"not {self.resolution}x{self.resolution}")
            img = _centre_crop_resize(img, self.resolution)
        array = np.asarray(img, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        return array.transpose(2, 0, 1)

    def _open_image(self, data: bytes, name: str) -> Image.Image:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _to_rgb(img, self.num_channels, self._describe(name))

    def _load_item(self, raw_index: int):
        # A truncated file is replaced by the next readable one so that a long run survives it.
        for attempt in range(len(self._names)):
            index = (raw_index + attempt) % len(self._names)
            if index in self._unreadable:
                continue
            try:
                image = self._decode(index)
            except DatasetError:
                raise
            except Exception as error:
                if not os.path.exists(self.path):
                    # not one warning per image of a dataset that was moved or unmounted
                    raise DatasetError(
                        f"the dataset {self.path!r} is gone (moved, deleted or unmounted since "
                        f"it was opened): cannot read {self._names[index]!r}") from error
                if self._unreadable.claim(index):  # another worker may have said it already
                    warnings.warn(f"skipping {self._describe(self._names[index])}: "
                                  f"{_unreadable_reason(error)}; using the next image instead",
                                  RuntimeWarning, stacklevel=3)
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
