"""Turn a folder of photographs into a training archive: centre-crop, resize, store as PNG in a zip.

    python tools/make_dataset.py --source photos/ --dest batik256.zip --resolution 256

Every readable image (searched recursively, following symbolic links, leaving out hidden files and
__MACOSX folders) is turned upright by its EXIF orientation, converted to RGB (alpha over white;
16-bit and float greyscale rescaled, float from [0, 1]), centre-cropped to a square, resized with
Lanczos and written as ``00000/img00000000.png``. Files that cannot be decoded, float images with
values outside [0, 1], and images smaller than ``--min-size``, are skipped with a message naming
them, as are broken links (images kept that are smaller than ``--resolution`` are enlarged, and
counted in one message naming the first few); Pillow's warnings (an image over its decompression-
bomb size) are logged naming the file. ``--resolution`` is a power of two, as training needs. A
``dataset.json`` with labels is written when ``--labels-from-folders`` is given (one class per top-
level subfolder; images directly in ``--source`` belong to no class and are skipped, naming them; a
class folder none of whose images is written is no class), in the format of NVIDIA's dataset tool.
The archive is written to a temporary file and renamed, so an interrupted run never leaves a half-
written dataset behind.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import warnings
import zipfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from batikfast.data.dataset import (IMAGE_EXTENSIONS, PixelRangeError,  # noqa: E402
                                     _centre_crop_resize, _to_rgb, list_folder_images)


def check_options(resolution: int, max_images: int | None) -> None:
    # The networks build the image from 4x4 upwards, doubling it block by block, so training
    # accepts only these sizes (batikfast.training.config.validate_config): any other archive
    # would be resized again at every read.
    if resolution < 4 or resolution & (resolution - 1):
        raise ValueError(f"--resolution must be a power of two >= 4 (4, 8, ..., 256, 512, ...), "
                         f"as the networks need, got {resolution}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"--max-images must be at least 1, got {max_images}")


def make_dataset(source, dest, resolution: int = 256, min_size: int = 8,
                 labels_from_folders: bool = False, max_images: int | None = None,
                 log=print) -> int:
    """Write the archive; returns the number of images stored."""
    source, dest = Path(source), Path(dest)
    check_options(resolution, max_images)
    if not source.is_dir():
        raise ValueError(f"--source {str(source)!r} is not a folder")
    files = _find_images(source, log)
    if not files:
        raise ValueError(f"no images in {str(source)!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    classes = sorted({p.relative_to(source).parts[0] for p in files if len(p.relative_to(source).parts) > 1})
    _make_dest_folder(dest)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        count = _write_archive(tmp, dest, source, files, classes, resolution, min_size,
                               labels_from_folders, max_images, log)
    except OSError as error:
        raise ValueError(f"cannot write --dest {str(dest)!r}: {error.strerror or error}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    log(f"wrote {count} images of {resolution}x{resolution} to {dest}")
    return count


def _find_images(source: Path, log) -> list[Path]:
    """The image files under ``source``, as training reads a folder: symbolic links followed,
    hidden files and __MACOSX folders left out, broken links skipped naming them."""
    try:
        listing = list_folder_images(source)
    except OSError as error:
        raise ValueError(f"--source {str(source)!r}: cannot list it "
                         f"({error.strerror or error})") from None
    for name, reason in listing.skipped:
        log(f"skipping {source / name}: {reason}")
    note = listing.hidden_note(repr(str(source)))
    if note:
        log(note)
    return [source / name for name in listing.names]


def _read_photo(path: Path, log) -> Image.Image:
    """``path`` upright in RGB; Pillow's warnings (a decompression-bomb size, bad metadata),
    which name no file, are logged naming it."""
    with warnings.catch_warnings(record=True) as pillow_warnings:
        warnings.simplefilter("always")
        try:
            with Image.open(path) as img:
                img.load()
                return _to_rgb(img, 3)
        finally:
            for caught in pillow_warnings:
                log(f"{path}: {caught.message}")


def _make_dest_folder(dest: Path) -> None:
    """Before any image is converted: a --dest that cannot be written is found at once."""
    if dest.is_dir():
        raise ValueError(f"--dest {str(dest)!r} is a folder: name the .zip archive to write")
    if dest.parent.exists() and not dest.parent.is_dir():
        raise ValueError(f"--dest {str(dest)!r}: {str(dest.parent)!r} is a file, not a folder")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--dest {str(dest)!r}: cannot create its folder "
                         f"({error.strerror or error})") from None


def _write_archive(tmp: Path, dest: Path, source: Path, files, classes, resolution, min_size,
                   labels_from_folders, max_images, log) -> int:
    """Convert ``files`` into the zip ``tmp``, then rename it to ``dest``; the image count."""
    labels, enlarged, count = [], [], 0
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in files:
            if max_images is not None and count >= max_images:
                break
            if labels_from_folders and len(path.relative_to(source).parts) == 1:
                log(f"skipping {path}: not in a class subfolder, so it has no label")
                continue
            try:
                img = _read_photo(path, log)
            except PixelRangeError as error:
                log(f"skipping {path}: {error}")
                continue
            except Exception as error:
                log(f"skipping {path}: cannot decode it ({error})")
                continue
            if min(img.size) < min_size:
                log(f"skipping {path}: {img.size[0]}x{img.size[1]} is smaller than {min_size} pixels")
                continue
            if min(img.size) < resolution:
                enlarged.append(f"{path} ({img.size[0]}x{img.size[1]})")
            img = _centre_crop_resize(img, resolution)
            name = f"{count // 1000:05d}/img{count:08d}.png"
            buffer = io.BytesIO()
            img.save(buffer, format="png", compress_level=1)
            archive.writestr(name, buffer.getvalue())
            if labels_from_folders:
                parts = path.relative_to(source).parts
                labels.append([name, parts[0]])
            count += 1
        if count == 0:
            raise ValueError(f"no usable images in {str(source)!r}: every file was skipped")
        if enlarged:
            more = ", ..." if len(enlarged) > 3 else ""
            log(f"{len(enlarged)} of the {count} images are smaller than {resolution}x{resolution}"
                f" and were enlarged (blurred): {', '.join(enlarged[:3])}{more}; --min-size "
                f"{resolution} leaves such images out")
        meta = {"labels": None}
        if labels_from_folders:
            # a class folder none of whose images was written would be a class never seen
            written = sorted({folder for _, folder in labels})
            for folder in sorted(set(classes) - set(written)):
                log(f"class folder {str(source / folder)!r} has no image in the archive (all "
                    "skipped, or past --max-images): it is not a class")
            index = {folder: position for position, folder in enumerate(written)}
            meta["labels"] = [[name, index[folder]] for name, folder in labels]
            meta["classes"] = written
        archive.writestr("dataset.json", json.dumps(meta))
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, dest)
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--dest", required=True, help="output .zip archive")
    parser.add_argument("--resolution", type=int, default=256,
                        help="side of the square images, a power of two (default 256)")
    parser.add_argument("--min-size", type=int, default=8, help="skip images smaller than this")
    parser.add_argument("--labels-from-folders", action="store_true",
                        help="one class label per top-level subfolder")
    parser.add_argument("--max-images", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        make_dataset(args.source, args.dest, args.resolution, args.min_size,
                     args.labels_from_folders, args.max_images)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
