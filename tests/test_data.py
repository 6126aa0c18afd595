"""Datasets: folders, zips, labels, x-flips, bad files, the procedural batik set, the sampler."""
import contextlib
import json
import multiprocessing
import os
import pickle
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from batikfast.data import (MOTIFS, BuiltinBatikDataset, DatasetError, ImageFolderDataset,
                            InfiniteSampler, make_loader, open_dataset)
from tests._support import png_bytes

REPO = Path(__file__).resolve().parent.parent


def _png(path, size=(16, 16), mode="RGB", colour=None, seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    if colour is not None:
        array[:] = colour
    img = Image.fromarray(array[:, :, 0] if mode == "L" else array, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return array


def test_folder_dataset_gives_uint8_chw_images_sorted_by_name(tmp_path):
    a = _png(tmp_path / "b.png", seed=1)
    b = _png(tmp_path / "sub" / "a.png", seed=2)
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 2 and ds.resolution == 16 and ds.image_shape == [3, 16, 16]
    image, label = ds[0]  # "b.png" sorts before "sub/a.png"
    assert image.dtype == np.uint8 and image.shape == (3, 16, 16) and label.shape == (0,)
    np.testing.assert_array_equal(image, a.transpose(2, 0, 1))
    np.testing.assert_array_equal(ds[1][0], b.transpose(2, 0, 1))


def test_xflip_doubles_the_dataset_with_mirrored_copies(tmp_path):
    a = _png(tmp_path / "a.png")
    ds = ImageFolderDataset(tmp_path, xflip=True)
    assert len(ds) == 2
    np.testing.assert_array_equal(ds[1][0], a.transpose(2, 0, 1)[:, :, ::-1])


def test_zip_dataset_reads_labels_from_dataset_json(tmp_path):
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i, cls in enumerate([2, 0, 1]):
            image = Image.new("RGB", (8, 8), (i * 40, 0, 0))
            z.writestr(f"00000/img{i:08d}.png", png_bytes(image))
        z.writestr("dataset.json", json.dumps(
            {"labels": [[f"00000/img{i:08d}.png", c] for i, c in enumerate([2, 0, 1])]}))
    ds = ImageFolderDataset(archive, use_labels=True)
    assert ds.label_dim == 3 and len(ds) == 3
    np.testing.assert_array_equal(ds[0][1], [0, 0, 1])
    np.testing.assert_array_equal(ds[1][1], [1, 0, 0])
    assert ds[2][0][0, 0, 0] == 80


def test_grayscale_and_rgba_images_are_converted_to_rgb(tmp_path):
    _png(tmp_path / "gray.png", mode="L", colour=100)
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent: composited over white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    ds = ImageFolderDataset(tmp_path)
    gray, transparent = ds[0][0], ds[1][0]
    assert gray.shape == (3, 16, 16) and (gray == 100).all()
    assert (transparent == 255).all()


def test_sixteen_bit_and_cmyk_images_are_rescaled_and_converted(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "a16.png")
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "b.jpg")
    ds = ImageFolderDataset(tmp_path)
    assert (ds[0][0] == 128).all() and ds[0][0].shape == (3, 8, 8)  # not clipped to 255
    assert ds[1][0].shape == (3, 8, 8) and ds[1][0].min() > 240


EIGHT_BIT_RAMP = np.rint(np.linspace(0, 255, 64)).reshape(8, 8)


def _ramp(dtype, peak):
    """An 8x8 greyscale image whose values are those of EIGHT_BIT_RAMP times ``peak / 255``."""
    return (EIGHT_BIT_RAMP * (peak / 255)).astype(dtype)


def test_wide_greyscale_images_map_their_full_range_onto_eight_bits(tmp_path):
    """16-bit (I;16), 32-bit integer (I) and float (F) images: each value v of the mode's range
    [0, peak] becomes round(v * 255 / peak), where peak is 65535, 65535 (255 when no value
    exceeds it: 8-bit data stored wide) and 1."""
    sixteen, floats = _ramp(np.uint16, 65535), _ramp(np.float32, 1.0)
    Image.fromarray(sixteen).save(tmp_path / "a_i16.tif")
    Image.fromarray(sixteen).save(tmp_path / "b_i16.png")
    Image.fromarray(sixteen.astype(np.int32)).save(tmp_path / "c_i32.tif")
    Image.fromarray(_ramp(np.int32, 255)).save(tmp_path / "d_i32_8bit_values.tif")
    Image.fromarray(floats).save(tmp_path / "e_float.tif")
    modes = [Image.open(tmp_path / n).mode for n in sorted(p.name for p in tmp_path.iterdir())]
    assert modes == ["I;16", "I;16", "I", "I", "F"]
    ds = ImageFolderDataset(tmp_path)
    for index in range(5):
        image = ds[index][0]
        assert image.shape == (3, 8, 8), index
        np.testing.assert_array_equal(image[0], EIGHT_BIT_RAMP, err_msg=str(index))
        assert (image[0] == image[2]).all()
    stored = tmp_path.parent / "d.zip"
    _make_dataset_tool().make_dataset(tmp_path, stored, resolution=8, log=lambda m: None)
    for index, (image, _) in enumerate(ImageFolderDataset(stored)):
        np.testing.assert_array_equal(image[0], EIGHT_BIT_RAMP, err_msg=str(index))


@pytest.mark.parametrize("values", [(0.0, 255.0), (-1.0, 1.0), (0.0, float("nan")),
                                    (0.0, float("inf"))])
def test_float_images_outside_zero_to_one_are_skipped_naming_the_file(tmp_path, values):
    """The scale of a float image is not stored in the file: [0, 1] is read, anything else is
    refused rather than clipped to a washed-out or black image, in the loader and the tool."""
    folder = tmp_path / "photos"
    _png(folder / "a_good.png", size=(8, 8), colour=60)
    bad = np.full((8, 8), values[0], np.float32)
    bad[0, 0] = values[1]
    Image.fromarray(bad).save(folder / "b_float.tif")
    ds = ImageFolderDataset(folder)
    with pytest.warns(RuntimeWarning, match=r"b_float.tif.*float pixels span .*outside \[0, 1\]"):
        image = ds[1][0]
    assert (image == 60).all()  # the next readable image in its place
    messages = []
    count = _make_dataset_tool().make_dataset(folder, tmp_path / "d.zip", resolution=8,
                                              log=messages.append)
    assert count == 1
    assert any("b_float.tif" in m and "outside [0, 1]" in m for m in messages), messages


def test_images_of_another_size_are_centre_cropped_and_resized(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 10:30] = 255  # the centre square is white, the sides black
    Image.fromarray(img).save(tmp_path / "wide.png")
    ds = ImageFolderDataset(tmp_path, resolution=8)
    assert ds[0][0].shape == (3, 8, 8) and ds[0][0].min() > 240


def test_wrong_size_is_rejected_naming_the_file_when_resizing_is_off(tmp_path):
    _png(tmp_path / "a.png", size=(16, 16))
    _png(tmp_path / "odd_one.png", size=(12, 12))
    with pytest.raises(DatasetError, match="odd_one.png"):
        ImageFolderDataset(tmp_path, resolution=16, resize=False)


def test_non_square_images_need_a_resolution(tmp_path):
    _png(tmp_path / "wide.png", size=(16, 12))
    with pytest.raises(DatasetError, match="wide.png.*resolution"):
        ImageFolderDataset(tmp_path)


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="no images found"):
        ImageFolderDataset(tmp_path)


def test_missing_path_and_non_zip_file_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(DatasetError, match="junk.zip.*neither a folder nor a zip"):
        ImageFolderDataset(junk)


def test_junk_entries_in_a_zip_are_skipped_with_a_warning_naming_them(tmp_path):
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("good.png", png_bytes(Image.new("RGB", (8, 8))))
        z.writestr("junk.png", b"\x89PNG but really garbage")
    with pytest.warns(RuntimeWarning, match="junk.png"):
        ds = ImageFolderDataset(archive)
    assert len(ds) == 1


def test_zip_of_only_junk_is_a_clear_error(tmp_path):
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("junk.jpg", b"garbage")
    with pytest.warns(RuntimeWarning, match="junk.jpg"), \
            pytest.raises(DatasetError, match="no readable images"):
        ImageFolderDataset(archive)


def test_truncated_image_is_skipped_when_read_with_a_warning_naming_it(tmp_path):
    first = _png(tmp_path / "a.png", size=(32, 32), seed=3)
    _png(tmp_path / "b_truncated.png", size=(32, 32), seed=4)
    data = (tmp_path / "b_truncated.png").read_bytes()
    (tmp_path / "b_truncated.png").write_bytes(data[: len(data) // 2])
    _png(tmp_path / "c.png", size=(32, 32), seed=5)
    ds = ImageFolderDataset(tmp_path)  # the header is intact: found only when decoded
    with pytest.warns(RuntimeWarning, match="b_truncated.png"):
        image, _ = ds[1]
    assert image.shape == (3, 32, 32)
    np.testing.assert_array_equal(ds[0][0], first.transpose(2, 0, 1))


def test_verify_finds_truncated_images_up_front(tmp_path):
    _png(tmp_path / "a.png", size=(32, 32))
    _png(tmp_path / "bad.png", size=(32, 32), seed=1)
    data = (tmp_path / "bad.png").read_bytes()
    (tmp_path / "bad.png").write_bytes(data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match="bad.png"):
        ds = ImageFolderDataset(tmp_path, verify=True)
    assert ds.filenames == ["a.png"]


def test_tiny_images_are_skipped_with_a_warning(tmp_path):
    _png(tmp_path / "a.png", size=(16, 16))
    _png(tmp_path / "tiny.png", size=(3, 3))
    with pytest.warns(RuntimeWarning, match="tiny.png.*smaller"):
        ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 1


def test_an_archive_made_below_eight_pixels_reads_back_at_its_resolution(tmp_path):
    # The thumbnail floor (8 px) must not reject every image of a resolution-4 run.
    _png(tmp_path / "photos" / "a.png", size=(20, 20))
    _make_dataset_tool().make_dataset(tmp_path / "photos", tmp_path / "d.zip", resolution=4,
                                      log=lambda m: None)
    ds = ImageFolderDataset(tmp_path / "d.zip", resolution=4)
    assert len(ds) == 1 and ds[0][0].shape == (3, 4, 4)
    with pytest.warns(RuntimeWarning, match="smaller than the minimum of 8 pixels"), \
            pytest.raises(DatasetError, match="every file was skipped"):
        ImageFolderDataset(tmp_path / "d.zip", resolution=16)


def test_missing_labels_are_a_clear_error(tmp_path):
    _png(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="no dataset.json"):
        ImageFolderDataset(tmp_path, use_labels=True)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["other.png", 0]]}))
    with pytest.raises(DatasetError, match="no label for 'a.png'"):
        ImageFolderDataset(tmp_path, use_labels=True)


def test_conditioning_on_an_archive_made_without_labels_says_how_to_make_one(tmp_path):
    _png(tmp_path / "photos" / "a.png")
    _make_dataset_tool().make_dataset(tmp_path / "photos", tmp_path / "d.zip", resolution=16,
                                      log=lambda m: None)
    with pytest.raises(DatasetError, match=r"use_labels=True \(--cond\) but dataset.json in .* "
                                           r"has no labels: make the dataset with "
                                           r"tools/make_dataset.py --labels-from-folders"):
        ImageFolderDataset(tmp_path / "d.zip", use_labels=True)


def test_builtin_batik_is_deterministic_per_index_and_varied():
    ds = BuiltinBatikDataset(resolution=32, size=100, seed=7, use_labels=True)
    a, label = ds[5]
    b, _ = BuiltinBatikDataset(resolution=32, size=100, seed=7, use_labels=True)[5]
    assert a.dtype == np.uint8 and a.shape == (3, 32, 32)
    np.testing.assert_array_equal(a, b)
    assert label.shape == (len(MOTIFS),) and label.sum() == 1
    images = np.stack([ds[i][0] for i in range(8)]).astype(np.float32)
    assert images.std(axis=(1, 2, 3)).min() > 5  # each image has structure
    assert np.abs(images[0] - images[4]).mean() > 5  # same motif, different draw
    assert not np.array_equal(ds[5][0], BuiltinBatikDataset(32, 100, seed=8)[5][0])


@pytest.mark.parametrize("resolution", [4, 17, 64])
def test_builtin_batik_renders_any_resolution_and_every_motif(resolution):
    ds = BuiltinBatikDataset(resolution=resolution, size=len(MOTIFS), xflip=True)
    assert len(ds) == 2 * len(MOTIFS)
    for i in range(len(MOTIFS)):
        image = ds[i][0]
        assert image.shape == (3, resolution, resolution)
        np.testing.assert_array_equal(ds[i + len(MOTIFS)][0], image[:, :, ::-1])


def test_builtin_batik_rejects_bad_arguments():
    with pytest.raises(ValueError, match="resolution"):
        BuiltinBatikDataset(resolution=2)
    with pytest.raises(ValueError, match="motifs"):
        BuiltinBatikDataset(motifs=("paisley",))
    with pytest.raises(ValueError, match="size"):
        BuiltinBatikDataset(size=0)


def test_sampler_shards_one_global_stream_across_ranks_and_resumes():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    single = take(InfiniteSampler(10, seed=3), 24)
    rank0 = take(InfiniteSampler(10, 0, 2, seed=3), 12)
    rank1 = take(InfiniteSampler(10, 1, 2, seed=3), 12)
    assert single[0::2] == rank0 and single[1::2] == rank1
    assert sorted(single[:10]) == list(range(10))  # each epoch is a permutation
    assert take(InfiniteSampler(10, seed=3, start=8), 16) == single[8:]
    assert take(InfiniteSampler(10, 1, 2, seed=3, start=8), 8) == single[9::2]


def test_loader_yields_batches_from_the_requested_stream_position():
    ds = BuiltinBatikDataset(resolution=8, size=6, use_labels=True)
    images, labels = next(make_loader(ds, batch_gpu=4, num_workers=0, start=2))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 8, 8)
    assert labels.shape == (4, 4)
    order = [next(iter(InfiniteSampler(6, start=i))) for i in range(2, 6)]
    np.testing.assert_array_equal(images[0].numpy(), ds[order[0]][0])


def test_open_dataset_builtin_and_folder(tmp_path):
    assert isinstance(open_dataset("builtin", resolution=16), BuiltinBatikDataset)
    _png(tmp_path / "a.png")
    assert isinstance(open_dataset(str(tmp_path)), ImageFolderDataset)


def test_make_dataset_tool_writes_a_zip_the_dataset_reads(tmp_path):
    photos = tmp_path / "photos"
    _png(photos / "kawung" / "a.jpg", size=(40, 30))
    _png(photos / "parang" / "b.png", size=(30, 50), mode="RGBA")
    _png(photos / "parang" / "c.png", size=(30, 50), mode="L")
    (photos / "parang" / "broken.png").write_bytes(b"not an image")
    dest = tmp_path / "out" / "batik.zip"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_dataset.py"), "--source", str(photos),
         "--dest", str(dest), "--resolution", "16", "--labels-from-folders"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "broken.png" in result.stdout and "wrote 3 images" in result.stdout
    ds = ImageFolderDataset(dest, use_labels=True)
    assert len(ds) == 3 and ds.resolution == 16 and ds.label_dim == 2
    np.testing.assert_array_equal(ds[0][1], [1, 0])
    np.testing.assert_array_equal(ds[2][1], [0, 1])
    assert not list(dest.parent.glob(".*tmp*"))


def _make_dataset_tool():
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_dataset", REPO / "tools" / "make_dataset.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _sideways_portrait(path):
    """A portrait photo as cameras store it: pixels landscape, EXIF orientation 6 (rotate 90
    degrees clockwise to view), white on the stored left, which is the viewed top."""
    stored = np.zeros((20, 30, 3), np.uint8)
    stored[:, :15] = 255
    img = Image.fromarray(stored)
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, exif=exif)


def test_photos_are_turned_upright_by_their_exif_orientation(tmp_path):
    _sideways_portrait(tmp_path / "photos" / "portrait.jpg")
    upright = ImageFolderDataset(tmp_path / "photos", resolution=8)[0][0]
    assert upright[:, :4].min() > 200 and upright[:, 4:].max() < 50  # white on top
    dest = tmp_path / "d.zip"
    _make_dataset_tool().make_dataset(tmp_path / "photos", dest, resolution=8, log=lambda m: None)
    stored = ImageFolderDataset(dest)[0][0]
    assert stored[:, :4].min() > 200 and stored[:, 4:].max() < 50


def test_make_dataset_tool_skips_images_outside_class_folders_when_labelling_by_folder(tmp_path):
    photos = tmp_path / "photos"
    _png(photos / "kawung" / "a.png", colour=10)
    _png(photos / "parang" / "b.png", colour=20)
    _png(photos / "loose.png", colour=30)  # no folder, so no class: not the first class
    messages = []
    count = _make_dataset_tool().make_dataset(photos, tmp_path / "d.zip", resolution=16,
                                              labels_from_folders=True, log=messages.append)
    assert count == 2 and any("loose.png" in m and "no label" in m for m in messages)
    ds = ImageFolderDataset(tmp_path / "d.zip", use_labels=True)
    assert [int(ds[i][0][0, 0, 0]) for i in range(2)] == [10, 20]
    np.testing.assert_array_equal(ds.label_table(), [[1, 0], [0, 1]])


def test_make_dataset_tool_fails_clearly_on_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_dataset.py"), "--source",
         str(tmp_path / "empty"), "--dest", str(tmp_path / "x.zip")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no images" in result.stderr
    assert not (tmp_path / "x.zip").exists()


def test_make_dataset_tool_refuses_a_resolution_the_networks_cannot_train(tmp_path, capsys):
    """Training needs a power of two >= 4 (the networks double from 4x4): the tool says so
    before reading anything, not training after the archive is written."""
    _png(tmp_path / "photos" / "a.png")
    tool = _make_dataset_tool()
    for resolution in ("100", "2", "0", "-8"):
        assert tool.main(["--source", str(tmp_path / "photos"), "--dest",
                          str(tmp_path / "d.zip"), f"--resolution={resolution}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"error: --resolution must be a power of two >= 4 (4, 8, ..., 256, 512, "
                       f"...), as the networks need, got {resolution}"), err
    assert tool.main(["--source", str(tmp_path / "photos"), "--dest", str(tmp_path / "d.zip"),
                      "--max-images", "0"]) == 2
    assert "--max-images must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "d.zip").exists()
    assert tool.main(["--source", str(tmp_path / "photos"), "--dest", str(tmp_path / "d.zip"),
                      "--resolution", "8"]) == 0
    assert ImageFolderDataset(tmp_path / "d.zip").resolution == 8


def test_make_dataset_tool_says_when_dest_cannot_be_written_before_converting(tmp_path,
                                                                              capsys):
    _png(tmp_path / "photos" / "a.png")
    (tmp_path / "a_file").write_text("")
    tool = _make_dataset_tool()
    for dest, message in ((tmp_path / "photos", "is a folder: name the .zip archive"),
                          (tmp_path / "a_file" / "d.zip", "is a file, not a folder")):
        assert tool.main(["--source", str(tmp_path / "photos"), "--dest", str(dest),
                          "--resolution", "8"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --dest {str(dest)!r}") and message in err, err
        assert "\n" not in err


def test_loader_workers_read_a_zip_in_their_own_processes(tmp_path):
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(5):
            z.writestr(f"img{i}.png", png_bytes(Image.new("RGB", (8, 8), (i * 50, 0, 0))))
    ds = ImageFolderDataset(archive)
    ds[0]  # opens the zip in this process; workers must reopen their own handle
    loader = make_loader(ds, batch_gpu=4, num_workers=1)
    images, _ = next(loader)
    stream = iter(InfiniteSampler(5, seed=0))
    expected = [int(ds[next(stream)][0][0, 0, 0]) for _ in range(4)]
    assert images.shape == (4, 3, 8, 8) and images[:, 0, 0, 0].tolist() == expected


def test_several_loader_workers_read_a_zip_opened_before_they_fork(tmp_path):
    """Forked workers inherit an open zip handle; sharing its file offset, concurrent reads
    returned other members' bytes, and the images were skipped and replaced by neighbours."""
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(24):
            pixels = np.random.default_rng(i).integers(0, 256, (32, 32, 3), np.uint8)
            z.writestr(f"img{i:02d}.png", png_bytes(Image.fromarray(pixels)))
    ds = ImageFolderDataset(archive)
    ds[0]  # opens the zip in this process, as training does (the reals grid) before forking
    expected = make_loader(ds, batch_gpu=4, num_workers=0)
    loader = make_loader(ds, batch_gpu=4, num_workers=2)
    for _ in range(18):  # three epochs
        assert torch.equal(next(loader)[0], next(expected)[0])


def test_label_tables_come_without_decoding_images(tmp_path, monkeypatch):
    ds = BuiltinBatikDataset(resolution=8, size=6, use_labels=True)
    monkeypatch.setattr(ds, "_load_item", lambda i: (_ for _ in ()).throw(AssertionError("decoded")))
    table = ds.label_table()
    assert table.shape == (6, 4) and (table.sum(1) == 1).all()


def test_a_truncated_image_read_in_a_worker_does_not_stop_the_loader(tmp_path):
    for i in range(4):
        _png(tmp_path / f"{i}.png", size=(16, 16), seed=i)
    data = (tmp_path / "2.png").read_bytes()
    (tmp_path / "2.png").write_bytes(data[: len(data) // 2])
    ds = ImageFolderDataset(tmp_path)
    loader = make_loader(ds, batch_gpu=4, num_workers=1)
    for _ in range(3):  # every image, the truncated one included, is asked for
        images, _ = next(loader)
        assert images.shape == (4, 3, 16, 16)


# ---- bad data, end to end: through the dataset and through loader worker processes ---------

@contextlib.contextmanager
def _warnings_logged_to(path):
    """Every warning of this process and of the loader workers it forks in the block, one line
    each in ``path``: pytest records warnings in the memory of the process that raised them,
    where a worker's would be lost to the test."""
    def log(message, category, filename, lineno, file=None, line=None):
        with open(path, "a") as handle:
            handle.write(f"{category.__name__}: {message}\n")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = log
        yield


def _read_all_through_workers(ds, log_path, num_workers=2, batch=4):
    """Every item of ``ds`` (x-flips included) as the training loop reads it, in stream order:
    a loader with worker processes, enough batches for two epochs."""
    with _warnings_logged_to(log_path):
        loader = make_loader(ds, batch_gpu=batch, num_workers=num_workers, seed=1)
        images = torch.cat([next(loader)[0] for _ in range(-(-2 * len(ds) // batch))])
        del loader  # its workers stop before the warnings go back to pytest
    return images


def _logged(log_path):
    return log_path.read_text() if log_path.exists() else ""


def _solid(path, colour, size=(16, 16), mode="RGB", **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, **save)


def test_images_of_every_mode_and_frame_count_are_converted_through_loader_workers(tmp_path):
    """Palette (with and without transparency), greyscale with alpha, RGB and greyscale PNGs
    with a colour made transparent (tRNS), 1-bit, 16-bit, CMYK, animated GIFs and multi-page
    TIFFs (their first frame), upper-case extensions, other sizes and shapes: each becomes the
    3x16x16 image a viewer shows, in workers as in the process."""
    folder = tmp_path / "photos"
    expected = {}
    _solid(folder / "a_palette.png", (200, 0, 0), mode="RGB")
    Image.open(folder / "a_palette.png").convert("P", palette=Image.Palette.ADAPTIVE).save(
        folder / "a_palette.png")
    expected["a_palette.png"] = (200, 0, 0)
    transparent = Image.new("P", (16, 16), 1)
    transparent.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    transparent.save(folder / "b_palette_transparent.png", transparency=1)
    expected["b_palette_transparent.png"] = (255, 255, 255)  # over white
    _solid(folder / "c_grey_alpha.png", (50, 255), mode="LA")
    expected["c_grey_alpha.png"] = (50, 50, 50)
    _solid(folder / "c_rgb_colour_key.png", (0, 0, 0), transparency=(0, 0, 0))
    expected["c_rgb_colour_key.png"] = (255, 255, 255)  # as a viewer shows it: over white
    _solid(folder / "c_grey_colour_key.png", 7, mode="L", transparency=7)
    expected["c_grey_colour_key.png"] = (255, 255, 255)
    _solid(folder / "d_one_bit.bmp", 1, mode="1")
    expected["d_one_bit.bmp"] = (255, 255, 255)
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(folder / "e_sixteen_bit.png")
    expected["e_sixteen_bit.png"] = (255, 255, 255)
    _solid(folder / "f_cmyk.jpg", (0, 0, 0, 255), mode="CMYK")
    expected["f_cmyk.jpg"] = (0, 0, 0)
    frames = [Image.new("RGB", (16, 16), (0, 0, 255 - 80 * i)).convert(
        "P", palette=Image.Palette.ADAPTIVE) for i in range(3)]
    frames[0].save(folder / "g_animated.gif", save_all=True, append_images=frames[1:])
    expected["g_animated.gif"] = (0, 0, 255)
    pages = [Image.new("RGB", (16, 16), (0, 80 * i, 0)) for i in range(1, 4)]
    pages[0].save(folder / "h_pages.tif", save_all=True, append_images=pages[1:])
    expected["h_pages.tif"] = (0, 80, 0)
    _solid(folder / "I_UPPER.PNG", (1, 2, 3))
    expected["I_UPPER.PNG"] = (1, 2, 3)
    _solid(folder / "j_wide.jpeg", (0, 128, 0), size=(40, 24), quality=100)
    expected["j_wide.jpeg"] = (0, 128, 0)
    _solid(folder / "k_large.webp", (9, 9, 9), size=(64, 64), lossless=True)
    expected["k_large.webp"] = (9, 9, 9)
    ds = ImageFolderDataset(folder, resolution=16, xflip=True)
    assert ds.filenames == sorted(expected)
    for index, name in enumerate(ds.filenames):
        image = ds[index][0]
        assert image.shape == (3, 16, 16), name
        np.testing.assert_allclose(image.reshape(3, -1).mean(1), expected[name], atol=1.5,
                                   err_msg=name)
    read = _read_all_through_workers(ds, tmp_path / "warnings.log")
    assert read.shape == (2 * 2 * len(expected), 3, 16, 16)
    colours = {tuple(np.round(image.float().mean((1, 2)).numpy()).astype(int))
               for image in read}
    assert colours == {tuple(np.round(ds[i][0].reshape(3, -1).mean(1)).astype(int))
                       for i in range(len(expected))}
    assert _logged(tmp_path / "warnings.log") == ""
    messages = []  # the tool converts each the same way
    assert _make_dataset_tool().make_dataset(folder, tmp_path / "d.zip", resolution=16,
                                             log=messages.append) == len(expected)
    assert len(messages) == 1, messages
    stored = ImageFolderDataset(tmp_path / "d.zip")
    for index, name in enumerate(sorted(expected)):
        np.testing.assert_allclose(stored[index][0].reshape(3, -1).mean(1), expected[name],
                                   atol=1.5, err_msg=name)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_files_that_are_not_usable_images_are_skipped_naming_them_through_loader_workers(
        tmp_path):
    """Junk and empty files named like images and tiny images are skipped at the scan; truncated
    images and float images outside [0, 1] when a worker first decodes them, each with a
    warning naming it and the next image in its place. Other files (notes, dataset.json) are not
    images; hidden files and macOS metadata (.DS_Store, ._* forks) are not read, said once."""
    folder = tmp_path / "photos"
    for index in range(4):
        _solid(folder / f"good{index}.png", (10 + index, 0, 0), size=(32, 32))
    (folder / "junk.png").write_bytes(b"<html>not found</html>")
    (folder / "empty.jpg").write_bytes(b"")
    _solid(folder / "tiny.png", (0, 0, 0), size=(4, 4))
    _png(folder / "truncated.png", size=(32, 32))
    _truncate(folder / "truncated.png")
    Image.fromarray(np.full((32, 32), 255.0, np.float32)).save(folder / "float_255.tif")
    (folder / "notes.txt").write_text("where these came from")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "._good0.png").write_bytes(b"\0\5\26\7AppleDouble resource fork")
    log = tmp_path / "warnings.log"
    with _warnings_logged_to(log):
        ds = ImageFolderDataset(folder, resolution=32)
    scan = _logged(log).splitlines()
    assert [line.split("'")[1] for line in scan if "skipping" in line] == [
        "empty.jpg", "junk.png", "tiny.png"]
    assert scan[0].startswith("RuntimeWarning: not reading 1 hidden or macOS metadata files "
                              "named like images") and "'._good0.png'" in scan[0]
    assert len(scan) == 4
    log.unlink()
    images = _read_all_through_workers(ds, log)
    assert set(images[:, 0, 0, 0].tolist()) == {10, 11, 12, 13}
    read = _logged(log)
    float_reason = r"its float pixels span \[255, 255\], outside \[0, 1\]"
    for name, reason in (("truncated.png", "cannot decode it"), ("float_255.tif", float_reason)):
        assert re.search(rf"skipping image '{name}' in .*: {reason}.*using the next image", read), \
            read
    assert "Traceback" not in read
    messages = []  # the tool skips the same files, naming each
    assert _make_dataset_tool().make_dataset(folder, tmp_path / "d.zip", resolution=32,
                                             log=messages.append) == 4
    assert messages[0].startswith("not reading 1 hidden or macOS metadata files")
    assert [m.split(": ")[0] for m in messages[1:-1]] == [
        f"skipping {folder / name}" for name in ("empty.jpg", "float_255.tif", "junk.png",
                                                  "tiny.png", "truncated.png")]


def test_symbolic_links_are_followed_once_and_a_broken_one_is_skipped_naming_it(tmp_path):
    """A dataset folder assembled from links (to files, to class folders elsewhere) is read as
    its copy would be; a link back to an ancestor is not a loop, and a broken link is named."""
    elsewhere = tmp_path / "elsewhere"
    _solid(elsewhere / "kawung" / "k.png", (30, 0, 0))
    _solid(elsewhere / "single.png", (40, 0, 0))
    folder = tmp_path / "photos"
    _solid(folder / "a.png", (20, 0, 0))
    (folder / "b_file_link.png").symlink_to(elsewhere / "single.png")
    (folder / "kawung").symlink_to(elsewhere / "kawung")
    (folder / "kawung_again").symlink_to(elsewhere / "kawung")  # one folder, read once
    (folder / "loop").symlink_to(folder)
    _solid(folder / "z_real" / "z.png", (50, 0, 0))
    (folder / "a_link_to_z_real").symlink_to(folder / "z_real")  # read at its own path
    (folder / "c_broken.png").symlink_to(tmp_path / "moved_away.png")
    log = tmp_path / "warnings.log"
    with _warnings_logged_to(log):
        ds = ImageFolderDataset(folder, resolution=16)
    assert ds.filenames == ["a.png", "b_file_link.png", "kawung/k.png", "z_real/z.png"]
    assert _logged(log).splitlines() == [
        f"RuntimeWarning: skipping image 'c_broken.png' in {str(folder)!r}: it is a broken "
        f"symbolic link (to {str(tmp_path / 'moved_away.png')!r})"]
    images = _read_all_through_workers(ds, tmp_path / "workers.log")
    assert sorted(set(images[:, 0, 0, 0].tolist())) == [20, 30, 40, 50]


def test_images_deleted_or_truncated_after_the_scan_are_skipped_naming_them_in_workers(
        tmp_path):
    """Files that change between the scan and their first read (a sync still running, a
    cleanup) are skipped in the worker that reads them, naming them, as corrupt ones are."""
    folder = tmp_path / "photos"
    for index in range(6):
        _png(folder / f"{index}.png", size=(16, 16), colour=index * 10)
    ds = ImageFolderDataset(folder)
    (folder / "2.png").unlink()
    _truncate(folder / "4.png")
    log = tmp_path / "warnings.log"
    images = _read_all_through_workers(ds, log)
    assert set(images[:, 0, 0, 0].tolist()) == {0, 10, 30, 50}
    read = _logged(log)
    assert re.search(r"skipping image '2.png' in .*: cannot read it \(No such file or directory; "
                     r"it was readable when the dataset was opened\); using the next image", read)
    assert re.search(r"skipping image '4.png' in .*: cannot decode it", read), read
    # once each, whichever of the two workers met it first, in either epoch
    assert sorted(re.findall(r"skipping image '([^']*)'", read)) == ["2.png", "4.png"], read


def _three_shades(tmp_path):
    """A folder of 0.png, 1.png, 2.png, solid red 0, 10 and 20, and its dataset."""
    folder = tmp_path / "photos"
    for index in range(3):
        _png(folder / f"{index}.png", size=(16, 16), colour=index * 10)
    return folder, ImageFolderDataset(folder)


def _read_item(ds, index, results):
    """In a worker-like process: ``ds[index]``'s first pixel and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image, _ = ds[index]
    results.put((int(image[0, 0, 0]), [str(warning.message) for warning in caught]))


def _read_in_a_new_process(ds, index, start_method):
    """``ds[index]`` in a process started as loader workers are ("spawn" pickles ``ds``)."""
    context = multiprocessing.get_context(start_method)
    results = context.Queue()
    process = context.Process(target=_read_item, args=(ds, index, results))
    process.start()
    outcome = results.get(timeout=120)
    process.join(timeout=60)
    return outcome


@pytest.mark.skipif(sys.platform != "linux", reason="the fork start method is Linux's")
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_an_image_one_worker_found_unreadable_is_skipped_quietly_by_the_others(tmp_path,
                                                                             start_method):
    """Loader workers share what they learn: the worker that meets a corrupt file first warns
    and the others (and later epochs) skip it without decoding it again or a second warning."""
    folder, ds = _three_shades(tmp_path)
    _truncate(folder / "1.png")
    pixel, said = _read_in_a_new_process(ds, 1, start_method)
    assert pixel == 20 and len(said) == 1 and "skipping image '1.png'" in said[0]
    _png(folder / "1.png", size=(16, 16), colour=99)  # readable again: no worker reads it now
    assert _read_in_a_new_process(ds, 1, start_method) == (20, [])


def test_the_training_process_keeps_its_own_record_of_unreadable_images(tmp_path):
    """Its reads (image grids, metric statistics) warn on its stderr only: taking a bad file
    from the workers' record would silence the worker's warning, the one log.txt receives."""
    folder, ds = _three_shades(tmp_path)
    _truncate(folder / "1.png")
    with pytest.warns(RuntimeWarning, match="'1.png'"):
        assert ds[1][0][0, 0, 0] == 20
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ds[1][0][0, 0, 0] == 20  # known here: skipped without decoding or warning
    assert caught == []
    pixel, said = _read_in_a_new_process(ds, 1, "fork")
    assert pixel == 20 and len(said) == 1 and "skipping image '1.png'" in said[0]


def test_without_posix_semaphores_a_dataset_still_skips_unreadable_images(tmp_path,
                                                                          monkeypatch):
    """Some sandboxes have no sem_open: the workers then keep a set each, as before."""
    import multiprocessing as mp

    class NoSemaphores:
        def RawArray(self, *args):
            raise ImportError("This platform lacks a functioning sem_open implementation")
    real_context = mp.get_context
    monkeypatch.setattr(mp, "get_context", lambda method=None: NoSemaphores()
                        if method == "spawn" else real_context(method))
    folder, ds = _three_shades(tmp_path)
    monkeypatch.undo()
    _truncate(folder / "1.png")
    pixel, said = _read_in_a_new_process(ds, 1, "fork")
    assert pixel == 20 and "skipping image '1.png'" in said[0]
    with pytest.warns(RuntimeWarning, match="'1.png'"):
        assert pickle.loads(pickle.dumps(ds))[1][0][0, 0, 0] == 20


def test_a_copy_of_a_dataset_remembers_its_unreadable_images_but_shares_nothing(tmp_path):
    """A pickled copy (not a worker being started) keeps the set as it was; a file found bad
    in the copy later is not marked in the original."""
    folder, ds = _three_shades(tmp_path)
    _truncate(folder / "0.png")
    with pytest.warns(RuntimeWarning, match="'0.png'"):
        assert ds[0][0][0, 0, 0] == 10
    copy = pickle.loads(pickle.dumps(ds))
    _truncate(folder / "2.png")
    with pytest.warns(RuntimeWarning, match="'2.png'"):
        assert copy[2][0][0, 0, 0] == 10  # 2.png skipped, 0.png known bad: 1.png
    with pytest.warns(RuntimeWarning, match="'2.png'"):
        assert ds[2][0][0, 0, 0] == 10


def test_a_loader_given_a_warning_log_appends_its_workers_warnings_to_it(tmp_path):
    """The run's log.txt must name a file skipped mid-run; the warning is raised in a worker
    process, whose stderr is all a user would otherwise have."""
    folder = tmp_path / "photos"
    for index in range(4):
        _png(folder / f"{index}.png", size=(16, 16), colour=index * 10)
    ds = ImageFolderDataset(folder)
    (folder / "1.png").unlink()
    log = tmp_path / "log.txt"
    log.write_text("earlier line\n")
    loader = make_loader(ds, batch_gpu=4, num_workers=1, warning_log=log)
    next(loader)
    del loader
    lines = log.read_text().splitlines()
    assert lines[0] == "earlier line"
    assert any(re.fullmatch(r"warning: skipping image '1.png' in .*: cannot read it .*", line)
               for line in lines[1:]), lines


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_a_dataset_gone_while_workers_read_it_is_one_error_naming_it(tmp_path, kind):
    """A dataset moved, deleted or unmounted under a run is one DatasetError naming it (what
    train.py prints as one line), not a warning for each of its images and then a worker
    traceback."""
    folder = tmp_path / "photos"
    for index in range(40):
        _png(folder / f"{index:02d}.png", size=(8, 8), seed=index)
    path = folder
    if kind == "zip":
        path = tmp_path / "d.zip"
        _make_dataset_tool().make_dataset(folder, path, resolution=8, log=lambda m: None)
    ds = ImageFolderDataset(path)
    (tmp_path / "moved").mkdir()
    path.rename(tmp_path / "moved" / path.name)
    log = tmp_path / "warnings.log"
    with pytest.raises(DatasetError) as caught:
        _read_all_through_workers(ds, log)
    assert str(caught.value).startswith(
        f"the dataset {str(path)!r} is gone (moved, deleted or unmounted since it was opened): "
        "cannot read '")
    assert "\n" not in str(caught.value)
    assert "skipping" not in _logged(log)


def test_a_dataset_error_in_a_loader_worker_is_raised_as_its_one_line_message(tmp_path):
    """With resizing off, an image replaced by one of another size after the scan is an error
    naming it; raised in a worker, the DataLoader wraps it in the worker's traceback, which
    train.py would print where it prints one line."""
    for index in range(3):
        _png(tmp_path / f"{index}.png", size=(16, 16))
    ds = ImageFolderDataset(tmp_path, resize=False)
    _png(tmp_path / "1.png", size=(12, 12))
    with pytest.raises(DatasetError) as caught:
        _read_all_through_workers(ds, tmp_path.parent / f"{tmp_path.name}.log", num_workers=1)
    assert str(caught.value) == f"image '1.png' in {str(tmp_path)!r} is 12x12, not 16x16"


def test_zip_members_that_are_folders_metadata_outside_the_archive_or_repeated_are_named(
        tmp_path):
    """Folders are not images; __MACOSX and hidden members are metadata, counted once; a member
    whose path leaves the archive is skipped naming it; a repeated name is read once (its last
    copy, as zipfile reads it), naming it; through loader workers the rest reads back."""
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it writes
        z.writestr("folder.png/", b"")
        z.writestr("a.png", png_bytes(Image.new("RGB", (8, 8), (10, 0, 0))))
        z.writestr("__MACOSX/._a.png", b"\0\5\26\7AppleDouble")
        z.writestr("sub/.hidden.png", png_bytes(Image.new("RGB", (8, 8), (99, 0, 0))))
        z.writestr("../outside.png", png_bytes(Image.new("RGB", (8, 8), (99, 0, 0))))
        z.writestr("/absolute.png", png_bytes(Image.new("RGB", (8, 8), (99, 0, 0))))
        z.writestr("twice.png", png_bytes(Image.new("RGB", (8, 8), (98, 0, 0))))
        z.writestr("twice.png", png_bytes(Image.new("RGB", (8, 8), (20, 0, 0))))
    log = tmp_path / "warnings.log"
    with _warnings_logged_to(log):
        ds = ImageFolderDataset(archive)
    assert ds.filenames == ["a.png", "twice.png"]
    where = repr(str(archive))
    assert _logged(log).splitlines() == [
        f"RuntimeWarning: skipping image '../outside.png' in {where}: its path leaves the archive "
        "(absolute or through '..'), which no archive of a dataset holds",
        f"RuntimeWarning: skipping image '/absolute.png' in {where}: its path leaves the archive "
        "(absolute or through '..'), which no archive of a dataset holds",
        f"RuntimeWarning: skipping image 'twice.png' in {where}: 1 earlier member(s) of the same "
        "name (the archive holds it 2 times; the last is read)",
        f"RuntimeWarning: not reading 2 hidden or macOS metadata files named like images in "
        f"{where} (names starting with '.', __MACOSX folders), e.g. '__MACOSX/._a.png'"]
    images = _read_all_through_workers(ds, tmp_path / "workers.log")
    assert sorted(set(images[:, 0, 0, 0].tolist())) == [10, 20]
    assert _logged(tmp_path / "workers.log") == ""


def _write_labels(folder, labels, names=("a.png", "b.png", "c.png")):
    for index, name in enumerate(names):
        _solid(folder / name, (index, 0, 0), size=(8, 8))
    if not isinstance(labels, (str, bytes)):
        labels = json.dumps(labels)
    (folder / "dataset.json").write_bytes(labels.encode() if isinstance(labels, str) else labels)


@pytest.mark.parametrize("labels, message", [
    ("{'labels': []}", r" is not valid JSON: Expecting property name"),
    (b'{"labels": "\xff"}', r" is not valid JSON: 'utf-8' codec can't decode byte 0xff"),
    ([["a.png", 0]], r" is a JSON array, not an object \(dataset.json holds \{\"labels\": "
                     r"\[\[\"relative/path.png\", label\], ...\]\}"),
    ({"labels": {"a.png": 0}}, r": \"labels\" is a JSON object, not an array"),
    ({"labels": [["a.png", 0], ["b.png"]]}, r": entry 1 of \"labels\" is \[\"b.png\"\], not a "
                                            r"\[path, label\] pair"),
    ({"labels": [["a.png", 0], ["b.png", 1], ["c.png", 0], ["a.png", 1]]},
     r" gives 'a.png' two labels, 0 and 1"),
    ({"labels": [["a.png", 0], ["b.png", 1]]}, r" has no label for 'c.png' \(1 images without"),
    ({"labels": [["a.png", 0], ["b.png", None], ["c.png", 1]]},
     r" gives 'b.png' the label null: a label is a class index \(an integer >= 0\) or a vector "
     r"\(a list of finite numbers\)$"),
    ({"labels": [["a.png", 0], ["b.png", -1], ["c.png", 1]]}, r" gives 'b.png' the label -1"),
    ({"labels": [["a.png", 0], ["b.png", True], ["c.png", 1]]}, r" gives 'b.png' the label true"),
    ({"labels": [["a.png", "kawung"], ["b.png", 1], ["c.png", 1]]},
     r" gives 'a.png' the label \"kawung\""),
    ({"labels": [["a.png", 0], ["b.png", 1.5], ["c.png", 1]]},
     r" gives 'b.png' the label 1.5: .*\(a continuous value goes in a list: \[1.5\]\)"),
    ({"labels": [["a.png", [0.5]], ["b.png", [float("nan")]], ["c.png", [1]]]},
     r" gives 'b.png' the label \[NaN\]"),
    ({"labels": [["a.png", 0], ["b.png", [1, 0]], ["c.png", 1]]},
     r" gives 'a.png' the class index 0 but 'b.png' a vector of 2 \[1, 0\]: every image's label "
     r"must be of one kind and length"),
    ({"labels": [["a.png", 0], ["b.png", 20230517], ["c.png", 1]]},
     r" gives 'b.png' the class index 20230517: more than 65536 classes would be a one-hot "
     r"table of 3 x 20230518 floats \(an image number or an id where a class index goes\?\)$"),
    ({"labels": [["a.png", [1, 0]], ["b.png", [1, 0]], ["c.png", [1]]]},
     r" gives 'a.png' a vector of 2 \[1, 0\] but 'c.png' a vector of 1 \[1\]"),
])
def test_a_malformed_dataset_json_is_an_error_saying_what_is_wrong(tmp_path, labels, message):
    """Every way a hand-written dataset.json goes wrong is a DatasetError naming dataset.json
    and the image, not a numpy or unpacking traceback, nor NaN or two kinds of label trained."""
    _write_labels(tmp_path, labels)
    with pytest.raises(DatasetError, match=r"^dataset.json in " + re.escape(repr(str(tmp_path)))
                       + message):
        ImageFolderDataset(tmp_path, use_labels=True)


def test_labels_are_matched_whatever_separator_and_files_not_in_the_dataset_are_ignored(
        tmp_path):
    """Paths written with backslashes (Windows tools) or './' match; labels of files that are
    not in the dataset (skipped as unreadable, never copied) are ignored; class indices
    stored as floats (2.0, as some JSON writers store every number) are classes."""
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for index, name in enumerate(["kawung\\a.png", "parang\\b.png", "parang\\c.png"]):
            z.writestr(name, png_bytes(Image.new("RGB", (8, 8), (index, 0, 0))))
        z.writestr("parang\\broken.png", b"junk")
        z.writestr("dataset.json", json.dumps({"labels": [
            ["kawung\\a.png", 0], ["./parang/b.png", 2.0], ["parang/c.png", 1],
            ["parang\\broken.png", 1], ["deleted/d.png", 0]]}))
    with pytest.warns(RuntimeWarning, match="broken.png"):
        ds = ImageFolderDataset(archive, use_labels=True)
    np.testing.assert_array_equal(ds.label_table(), [[1, 0, 0], [0, 0, 1], [0, 1, 0]])
    images, labels = next(make_loader(ds, batch_gpu=3, num_workers=1, seed=2))
    for image, label in zip(images, labels):
        np.testing.assert_array_equal(label, ds.get_label(int(image[0, 0, 0])))


def test_images_over_the_decompression_bomb_threshold_are_named_by_dataset_workers_and_tool(
        tmp_path, monkeypatch):
    """Pillow warns about an image over MAX_IMAGE_PIXELS without naming it (and refuses one
    over twice that): the dataset says once which file it is and reads it, also in workers,
    the refused one is skipped naming it, and the tool logs both by name."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 100-megapixel photo, scaled down
    folder = tmp_path / "photos"
    _solid(folder / "a.png", (10, 0, 0))
    _solid(folder / "b_large.png", (20, 0, 0), size=(40, 40))
    _solid(folder / "c_bomb.png", (30, 0, 0), size=(50, 50))
    log = tmp_path / "warnings.log"
    with _warnings_logged_to(log):
        ds = ImageFolderDataset(folder, resolution=16)
    assert ds.filenames == ["a.png", "b_large.png"]
    assert _logged(log).splitlines() == [
        f"RuntimeWarning: image 'b_large.png' in {str(folder)!r} is 40x40 (0 megapixels), over "
        "Pillow's decompression-bomb threshold: it is read, but slowly at every use "
        "(tools/make_dataset.py stores it at the training size once)",
        f"RuntimeWarning: skipping image 'c_bomb.png' in {str(folder)!r}: cannot read it (Image "
        "size (2500 pixels) exceeds limit of 2000 pixels, could be decompression bomb DOS "
        "attack.)"]
    images = _read_all_through_workers(ds, tmp_path / "workers.log")
    assert sorted(set(images[:, 0, 0, 0].tolist())) == [10, 20]
    assert _logged(tmp_path / "workers.log") == ""  # said once, at the scan
    messages = []
    count = _make_dataset_tool().make_dataset(folder, tmp_path / "d.zip", resolution=16,
                                              log=messages.append)
    assert count == 2
    assert messages[0] == (f"{folder / 'b_large.png'}: Image size (1600 pixels) exceeds limit of "
                           "1000 pixels, could be decompression bomb DOS attack.")
    assert messages[1].startswith(f"skipping {folder / 'c_bomb.png'}: cannot decode it (Image "
                                  "size (2500 pixels) exceeds limit of 2000 pixels")


def test_make_dataset_tool_reads_a_folder_as_training_does(tmp_path):
    """Linked class folders are followed, hidden files and __MACOSX are not images nor classes,
    a broken link is named, and a class folder with no usable image is no class (its index
    would be a class the generator is asked for and never saw)."""
    elsewhere = tmp_path / "elsewhere"
    _solid(elsewhere / "parang" / "p.png", (20, 0, 0))
    photos = tmp_path / "photos"
    _solid(photos / "kawung" / "k.png", (10, 0, 0))
    (photos / "parang").symlink_to(elsewhere / "parang")
    (photos / "ceplok").mkdir()
    (photos / "ceplok" / "broken.jpg").write_bytes(b"not a photo")
    (photos / "ceplok" / "gone.png").symlink_to(tmp_path / "gone.png")
    _solid(photos / "__MACOSX" / "kawung" / "._k.png", (99, 0, 0))
    _solid(photos / ".thumbnails" / "t.png", (99, 0, 0))
    messages = []
    count = _make_dataset_tool().make_dataset(photos, tmp_path / "d.zip", resolution=16,
                                              labels_from_folders=True, log=messages.append)
    assert count == 2
    assert messages[:2] == [
        f"skipping {photos / 'ceplok' / 'gone.png'}: it is a broken symbolic link (to "
        f"{str(tmp_path / 'gone.png')!r})",
        f"skipping {photos / 'ceplok' / 'broken.jpg'}: cannot decode it (cannot identify image "
        f"file {str(photos / 'ceplok' / 'broken.jpg')!r})"]
    assert messages[2] == (f"class folder {str(photos / 'ceplok')!r} has no image in the archive "
                           "(all skipped, or past --max-images): it is not a class")
    ds = ImageFolderDataset(tmp_path / "d.zip", use_labels=True)
    assert [int(ds[i][0][0, 0, 0]) for i in range(2)] == [10, 20]
    np.testing.assert_array_equal(ds.label_table(), [[1, 0], [0, 1]])
    with zipfile.ZipFile(tmp_path / "d.zip") as z:
        assert json.loads(z.read("dataset.json"))["classes"] == ["kawung", "parang"]


def test_pillows_warnings_about_a_file_are_given_once_naming_it_not_at_every_read(tmp_path):
    """Corrupt EXIF in a photo (common from phone editing apps) is a warning without a file
    name in Pillow, repeated at each read: the dataset names the file once, at the scan, and
    trains on the image; the workers' reads are quiet."""
    folder = tmp_path / "photos"
    _solid(folder / "a.jpg", (200, 200, 200), quality=100)
    Image.new("RGB", (16, 16), (50, 50, 50)).save(
        folder / "b_corrupt_exif.jpg", quality=100,
        exif=b"Exif\0\0MM\0*\0\0\0\x08\0\x05\x01\x12\0\x03\xff\xff\xff\xff")
    log = tmp_path / "warnings.log"
    with _warnings_logged_to(log):
        ds = ImageFolderDataset(folder)
    assert _logged(log).splitlines() == [
        f"RuntimeWarning: image 'b_corrupt_exif.jpg' in {str(folder)!r}: Corrupt EXIF data.  "
        "Expecting to read 12 bytes but only got 8. "]
    images = _read_all_through_workers(ds, tmp_path / "workers.log")
    assert sorted(set(images[:, 0, 0, 0].tolist())) == [50, 200]
    assert _logged(tmp_path / "workers.log") == ""


def test_a_zip_cut_short_and_a_bad_max_size_are_errors_saying_so(tmp_path):
    """A zip whose copy or download was interrupted lacks its central directory: 'neither a
    folder nor a zip archive' sent its user looking for the wrong thing. max_size 0 gave an
    empty dataset and a negative one dropped the last images."""
    _solid(tmp_path / "photos" / "a.png", (1, 2, 3))
    _solid(tmp_path / "photos" / "b.png", (1, 2, 3))
    whole = tmp_path / "d.zip"
    _make_dataset_tool().make_dataset(tmp_path / "photos", whole, resolution=16,
                                      log=lambda m: None)
    cut = tmp_path / "cut.zip"
    cut.write_bytes(whole.read_bytes()[:-40])
    with pytest.raises(DatasetError, match=r"^dataset path '.*cut.zip' is a damaged zip archive: "
                                           r"its end \(the central directory\) is missing, as "
                                           r"when a copy or download was cut short$"):
        ImageFolderDataset(cut)
    for max_size in (0, -1, 1.5):
        with pytest.raises(ValueError, match=rf"^max_size must be a positive integer or None, "
                                             rf"got {max_size}$"):
            ImageFolderDataset(whole, max_size=max_size)
    assert len(ImageFolderDataset(whole, max_size=1)) == 1


def test_small_images_among_larger_ones_are_said_to_be_enlarged_naming_them(tmp_path):
    """Thumbnails among photos were upscaled at every read without a word (the training loop
    refuses a dataset whose images are all smaller, and says when it shrinks them)."""
    for index in range(3):
        _solid(tmp_path / f"photo{index}.png", (index, 0, 0), size=(64, 48))
    for index in range(5):
        _solid(tmp_path / f"thumb{index}.png", (index, 0, 0), size=(16, 12))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolderDataset(tmp_path, resolution=32)
        ImageFolderDataset(tmp_path, resolution=8)  # every image shrinks: nothing to say
        ImageFolderDataset(tmp_path, resolution=32, max_size=3)  # the thumbnails are unused
    assert len(ds) == 8
    assert [str(w.message) for w in caught] == [
        f"5 of the 8 images in {str(tmp_path)!r} are smaller than 32x32 and are enlarged "
        "(blurred) at every read: 'thumb0.png' (16x12), 'thumb1.png' (16x12), 'thumb2.png' "
        "(16x12), ...; leave them out or pass a smaller resolution"]


def test_a_folder_that_cannot_be_listed_is_skipped_naming_it(tmp_path, monkeypatch):
    """A subfolder without read permission (another user's, a stale mount) is skipped naming
    it; a dataset folder that cannot be listed at all is an error naming it. (Permissions are
    simulated: the tests may run as root, who reads everything.)"""
    _solid(tmp_path / "photos" / "a.png", (1, 0, 0))
    _solid(tmp_path / "photos" / "private" / "b.png", (2, 0, 0))
    scandir = os.scandir
    locked = {str(tmp_path / "photos" / "private")}

    def scandir_with_permissions(path):
        if str(path) in locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", scandir_with_permissions)
    with pytest.warns(RuntimeWarning, match=r"^skipping folder 'private/' in .*photos': cannot "
                                            r"list it \(Permission denied\)$"):
        ds = ImageFolderDataset(tmp_path / "photos")
    assert ds.filenames == ["a.png"]
    locked.add(str(tmp_path / "photos"))
    with pytest.raises(DatasetError, match=r"^cannot read the dataset '.*photos': Permission "
                                           r"denied$"):
        ImageFolderDataset(tmp_path / "photos")


def test_make_dataset_tool_says_which_images_it_enlarged(tmp_path):
    """Thumbnails among photos were enlarged into the archive without a word (--min-size is 8
    by default): the tool counts them in one message naming the first three."""
    photos = tmp_path / "photos"
    _solid(photos / "big.png", (1, 0, 0), size=(40, 40))
    for index in range(4):
        _solid(photos / f"thumb{index}.png", (1, 0, 0), size=(12, 10))
    messages = []
    assert _make_dataset_tool().make_dataset(photos, tmp_path / "d.zip", resolution=16,
                                             log=messages.append) == 5
    assert messages[0] == (
        f"4 of the 5 images are smaller than 16x16 and were enlarged (blurred): "
        f"{photos / 'thumb0.png'} (12x10), {photos / 'thumb1.png'} (12x10), "
        f"{photos / 'thumb2.png'} (12x10), ...; --min-size 16 leaves such images out")
    assert len(messages) == 2 and messages[1].startswith("wrote 5 images")


def test_a_zip_member_that_inflates_beyond_any_image_is_skipped_naming_it(tmp_path,
                                                                         monkeypatch):
    """A member that inflates to gigabytes (a zip bomb named like a PNG, its header valid) was
    read whole into a worker's memory, and the worker killed for it names no file. (The limit,
    2 GiB, is lowered here to the size of a small image.)"""
    import batikfast.data.dataset as dataset_module
    monkeypatch.setattr(dataset_module, "MAX_IMAGE_BYTES", 10_000)
    archive = tmp_path / "d.zip"
    header = png_bytes(Image.new("RGB", (8, 8), (5, 0, 0)))
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.png", header)
        z.writestr("bomb.png", header + bytes(20_000))  # compresses to a few hundred bytes
    with pytest.warns(RuntimeWarning, match=r"^skipping image 'bomb.png' in .*d.zip': it is 0.0 "
                                            r"GiB \(inflated\), more than any image it could hold"):
        ds = ImageFolderDataset(archive)
    assert ds.filenames == ["a.png"]


def test_a_dataset_json_that_cannot_be_read_is_an_error_naming_it(tmp_path):
    """A folder named dataset.json (an unzip gone wrong) raised IsADirectoryError from deep in
    the label reader."""
    _solid(tmp_path / "a.png", (1, 0, 0))
    (tmp_path / "dataset.json").mkdir()
    with pytest.raises(DatasetError, match=r"^cannot read dataset.json in '.*': \[Errno 21\] Is a "
                                           r"directory"):
        ImageFolderDataset(tmp_path, use_labels=True)


def _srgb_with_red_and_blue_swapped() -> bytes:
    """An RGB ICC profile whose red primary is sRGB's blue and whose blue is sRGB's red: Pillow's
    sRGB profile with the rXYZ and bXYZ entries of its tag table exchanged, and "sRGB" in its
    description renamed (sRGB profiles are recognised by it and left alone)."""
    from PIL import ImageCms
    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = int.from_bytes(profile[128:132], "big")
    entries = {bytes(profile[132 + 12 * k:136 + 12 * k]): 132 + 12 * k for k in range(count)}
    red, blue = entries[b"rXYZ"], entries[b"bXYZ"]
    profile[red + 4:red + 12], profile[blue + 4:blue + 12] = (profile[blue + 4:blue + 12],
                                                              profile[red + 4:red + 12])
    return bytes(profile).replace(b"sRGB", b"BGRs").replace("sRGB".encode("utf-16-be"),
                                                            "BGRs".encode("utf-16-be"))


def test_images_with_an_icc_profile_are_read_in_srgb(tmp_path):
    """Pure red in a colour space whose red primary is sRGB's blue is sRGB blue; an image
    tagged sRGB, or untagged, reads as stored."""
    from PIL import ImageCms
    swapped = _srgb_with_red_and_blue_swapped()
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    folder = tmp_path / "photos"
    folder.mkdir()
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    red.save(folder / "a_swapped.png", icc_profile=swapped)
    red.save(folder / "b_srgb.png", icc_profile=srgb)
    red.save(folder / "c_untagged.png")
    ds = ImageFolderDataset(folder)
    assert ds.filenames == ["a_swapped.png", "b_srgb.png", "c_untagged.png"]
    for index, expected in enumerate([(0, 0, 255), (255, 0, 0), (255, 0, 0)]):
        pixel = ds[index][0][:, 4, 4].astype(int)
        assert np.abs(pixel - expected).max() <= 2, (ds.filenames[index], pixel)


def test_an_icc_profile_that_cannot_be_used_leaves_the_pixels_as_stored_with_a_warning(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 30)).save(folder / "a.png", icc_profile=b"not a profile")
    with pytest.warns(RuntimeWarning, match="a.png.*: its ICC colour profile cannot be applied"):
        image = ImageFolderDataset(folder)[0][0]
    assert tuple(image[:, 0, 0]) == (200, 10, 30)


def test_a_cmyk_image_tagged_with_an_rgb_profile_is_read_naively_with_a_warning(tmp_path):
    """A profile of the wrong colour space cannot be applied: PIL's own CMYK conversion, with a
    warning, never a crash in a loader worker."""
    from PIL import ImageCms
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    folder = tmp_path / "scans"
    folder.mkdir()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(folder / "a.jpg", icc_profile=srgb)
    with pytest.warns(RuntimeWarning, match="ICC colour profile cannot be applied"):
        image = ImageFolderDataset(folder)[0][0]
    assert image[0, 0, 0] > 200 and image[1:, 0, 0].max() < 60
