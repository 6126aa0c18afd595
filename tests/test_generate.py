"""``python -m batikfast.generate``: its options are checked before any work, each bad one a
one-line error naming it (exit code 2), never a traceback nor a silently ignored option.

Runs in-process on a freshly built 16x16 generator (no training), on the CPU.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from batikfast import generate
from batikfast.generate import MAX_GRID_IMAGES, generate_images, main
from batikfast.training.checkpoint import load_generator, save_checkpoint
from batikfast.training.config import make_config, network_kwargs
from batikfast.training.model import build_generator

CLASSES = 3


def _checkpoint(path, c_dim, w_avg=None):
    config = make_config("tiny", resolution=16, z_dim=8, w_dim=8, channel_base=128,
                         channel_max=8)
    G_kwargs, _ = network_kwargs(config, c_dim=c_dim)
    torch.manual_seed(0)
    G = build_generator(G_kwargs)
    if w_avg is not None:
        G.mapping.w_avg.copy_(w_avg)
    return save_checkpoint({"config": dict(config, G_kwargs=G_kwargs),
                            "G_ema": G.state_dict()}, path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    return {"unconditional": _checkpoint(folder / "uncond.pt", 0),
            "conditional": _checkpoint(folder / "cond.pt", CLASSES)}


def _generate(capsys, *argv):
    """(exit code, stderr) of the command, run on the CPU unless argv names a device."""
    device = [] if "--device" in argv else ["--device", "cpu"]
    code = main([*argv, *device])
    return code, capsys.readouterr().err


def _one_line_error(err, *words):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, err)


def test_a_gpu_device_on_a_machine_without_one_is_a_one_line_error(checkpoints, tmp_path,
                                                                   capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "grid.png"
    for device in ("cuda", "cuda:0"):
        code, err = _generate(capsys, "--ckpt", str(checkpoints["unconditional"]),
                              "--out", str(out), "--device", device)
        assert code == 2
        _one_line_error(err, f"--device {device}", "no GPU")
    code, err = _generate(capsys, "--ckpt", str(checkpoints["unconditional"]), "--out", str(out),
                          "--device", "gpu")
    assert code == 2
    _one_line_error(err, "--device", "'gpu'")
    assert not out.exists()
    # auto is the CPU here
    assert _generate(capsys, "--ckpt", str(checkpoints["unconditional"]), "--out", str(out),
                     "--device", "auto")[0] == 0
    assert out.exists()


def test_class_is_refused_for_an_unconditional_generator_and_range_checked_for_a_conditional(
        checkpoints, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, err = _generate(capsys, "--ckpt", str(checkpoints["unconditional"]), "--class", "1",
                          "--out", str(out))
    assert code == 2
    _one_line_error(err, "--class 1", "unconditional")
    for bad in ("-1", str(CLASSES)):
        code, err = _generate(capsys, "--ckpt", str(checkpoints["conditional"]), "--class", bad,
                              "--out", str(out))
        assert code == 2
        _one_line_error(err, "--class", bad)
    code, err = _generate(capsys, "--ckpt", str(checkpoints["conditional"]), "--out", str(out))
    assert code == 2
    _one_line_error(err, "--class", "conditional")
    assert not out.exists()
    assert _generate(capsys, "--ckpt", str(checkpoints["conditional"]), "--class",
                     str(CLASSES - 1), "--out", str(out))[0] == 0
    assert out.exists()


def test_truncation_psi_must_be_finite_and_may_extrapolate(checkpoints, tmp_path, capsys):
    out = tmp_path / "grid.png"
    for bad in ("nan", "inf", "-inf"):
        code, err = _generate(capsys, "--ckpt", str(checkpoints["unconditional"]),
                              f"--trunc={bad}", "--out", str(out))
        assert code == 2
        _one_line_error(err, "--trunc", "finite")
    assert not out.exists()
    G, _ = load_generator(checkpoints["unconditional"])
    with pytest.raises(ValueError, match="--trunc must be a finite number, got nan"):
        generate_images(G, [0], truncation_psi=float("nan"))
    # psi 0 is the average image for every seed; below 0 or above 1 extrapolates (NVIDIA allows it)
    mean = generate_images(G, [0, 1], truncation_psi=0.0)
    assert torch.equal(mean[0], mean[1])
    for psi in (-0.7, 1.5):
        images = generate_images(G, [0, 1], truncation_psi=psi)
        assert not torch.equal(images[0], images[1])
    assert _generate(capsys, "--ckpt", str(checkpoints["unconditional"]), "--trunc", "-0.7",
                     "--out", str(out))[0] == 0


def test_bad_seeds_columns_and_outputs_are_one_line_errors(checkpoints, tmp_path, capsys):
    ckpt = str(checkpoints["unconditional"])
    code, err = _generate(capsys, "--ckpt", ckpt, "--seeds", "a-b", "--out",
                          str(tmp_path / "g.png"))
    assert code == 2
    _one_line_error(err, "--seeds 'a-b'")
    code, err = _generate(capsys, "--ckpt", ckpt, "--columns", "0", "--out",
                          str(tmp_path / "g.png"))
    assert code == 2
    _one_line_error(err, "--columns")
    a_file = tmp_path / "file"
    a_file.write_text("")
    code, err = _generate(capsys, "--ckpt", ckpt, "--out", str(a_file / "g.png"))
    assert code == 2
    _one_line_error(err, "--out", "not a folder")
    code, err = _generate(capsys, "--ckpt", ckpt, "--outdir", str(a_file))
    assert code == 2
    _one_line_error(err, "--outdir", "not a folder")
    # a grid and one image per seed, in folders created for them
    grid, folder = tmp_path / "new" / "grid.png", tmp_path / "seeds"
    assert _generate(capsys, "--ckpt", ckpt, "--seeds", "2,4", "--out", str(grid), "--outdir",
                     str(folder), "--columns", "1")[0] == 0
    assert Image.open(grid).size == (16, 2 * 16)
    seed4 = np.asarray(Image.open(folder / "seed0004.png"))
    assert np.array_equal(seed4, np.asarray(Image.open(grid))[16:])


def test_a_seed_range_past_the_limits_is_refused_before_any_work(checkpoints, tmp_path, capsys):
    ckpt = str(checkpoints["unconditional"])
    code, err = _generate(capsys, "--ckpt", ckpt, "--seeds", "0-99999999999", "--outdir",
                          str(tmp_path / "many"))
    assert code == 2
    _one_line_error(err, "--seeds", "more than", "several calls")
    code, err = _generate(capsys, "--ckpt", ckpt, "--seeds", f"0-{MAX_GRID_IMAGES}", "--out",
                          str(tmp_path / "big.png"))
    assert code == 2
    _one_line_error(err, "--out", f"at most {MAX_GRID_IMAGES} images", "--outdir")
    assert not (tmp_path / "many").exists() and not (tmp_path / "big.png").exists()


def test_the_grid_must_be_named_png_as_it_is_written(checkpoints, tmp_path, capsys):
    code, err = _generate(capsys, "--ckpt", str(checkpoints["unconditional"]), "--out",
                          str(tmp_path / "grid.jpg"))
    assert code == 2
    _one_line_error(err, "--out", "*.png")


def test_one_image_per_seed_is_written_batch_by_batch(checkpoints, tmp_path, capsys,
                                                      monkeypatch):
    # More seeds than one batch: each batch is on disk before the next is generated.
    written_before = []
    real_write = generate._write_seed_images

    def spy(folder, seeds, images):
        written_before.append(len(list(folder.iterdir())))
        real_write(folder, seeds, images)

    monkeypatch.setattr(generate, "_write_seed_images", spy)
    folder = tmp_path / "seeds"
    assert _generate(capsys, "--ckpt", str(checkpoints["unconditional"]), "--seeds", "0-39",
                     "--outdir", str(folder))[0] == 0
    assert written_before == [0, 16, 32]
    assert len(list(folder.glob("seed*.png"))) == 40


def test_seeds_are_numpys_seeds_and_one_outside_them_is_refused(checkpoints, tmp_path, capsys):
    # -1 and 2**32 were taken modulo 2**32: seed4294967295.png and seed-001.png held the
    # same image, as did seed0000.png and seed4294967296.png.
    ckpt = str(checkpoints["unconditional"])
    for bad, words in (("-1", ("'-1'", "0 to 4294967295")), ("4294967296", ("got 4294967296",)),
                       ("4294967295-4294967296", ("got 4294967296",)), ("-3-2", ("'-3-2'",)),
                       ("1_0", ("'1_0'",)), ("5-", ("'5-'",))):
        code, err = _generate(capsys, "--ckpt", ckpt, f"--seeds={bad}", "--outdir",
                              str(tmp_path / "seeds"))
        assert code == 2, bad
        _one_line_error(err, "--seeds", *words)
    assert not (tmp_path / "seeds").exists()
    assert generate.parse_seeds(" 2 - 4 ,0,4294967295") == [2, 3, 4, 0, 4294967295]
    G, _ = load_generator(checkpoints["unconditional"])
    with pytest.raises(ValueError):
        generate_images(G, [-1])
    assert _generate(capsys, "--ckpt", ckpt, "--seeds", "4294967295,7", "--outdir",
                     str(tmp_path / "seeds"))[0] == 0
    assert sorted(p.name for p in (tmp_path / "seeds").iterdir()) == ["seed0007.png",
                                                                      "seed4294967295.png"]


def test_a_grid_is_row_major_with_a_square_number_of_columns(checkpoints, tmp_path, capsys):
    ckpt, grid = str(checkpoints["unconditional"]), tmp_path / "grid.png"
    assert _generate(capsys, "--ckpt", ckpt, "--seeds", "3-7", "--out", str(grid)) == (0, "")
    G, _ = load_generator(checkpoints["unconditional"])
    images = generate_images(G, [3, 4, 5, 6, 7]).permute(0, 2, 3, 1).numpy()
    pixels = np.asarray(Image.open(grid))
    assert pixels.shape == (2 * 16, 3 * 16, 3)  # ceil(sqrt(5)) = 3 columns, 2 rows
    for i, image in enumerate(images):
        row, column = divmod(i, 3)
        assert np.array_equal(pixels[16 * row:16 * (row + 1), 16 * column:16 * (column + 1)],
                              image), i
    assert not pixels[16:, 32:].any()  # the sixth cell is left black


def test_truncation_pulls_w_towards_the_checkpoints_w_avg(tmp_path):
    w_avg = torch.randn([8], generator=torch.Generator().manual_seed(1))
    G, _ = load_generator(_checkpoint(tmp_path / "w_avg.pt", 0, w_avg))
    assert torch.equal(G.mapping.w_avg, w_avg)
    w = G.mapping(generate.latents([5], G.z_dim), None)
    for psi in (0.0, 0.7):
        expected = _to_uint8(G.synthesis(w_avg + psi * (w - w_avg), noise_mode="const"))
        # one level for the rounding of lerp against this form
        torch.testing.assert_close(generate_images(G, [5], truncation_psi=psi).int(),
                                   expected.int(), atol=1, rtol=0)


def test_the_class_is_a_one_hot_label_and_noise_mode_is_passed_on(checkpoints):
    G, _ = load_generator(checkpoints["conditional"])
    z = generate.latents([0, 1], G.z_dim)
    for class_idx in range(CLASSES):
        c = torch.zeros(2, CLASSES)
        c[:, class_idx] = 1
        torch.testing.assert_close(generate_images(G, [0, 1], class_idx=class_idx),
                                   _to_uint8(G(z, c, noise_mode="const")), atol=0, rtol=0)
    calls = []
    real_forward = G.forward
    G.forward = lambda *args, **kwargs: calls.append(kwargs) or real_forward(*args, **kwargs)
    generate_images(G, [0], class_idx=0, noise_mode="random")
    assert calls[0]["noise_mode"] == "random" and calls[0]["truncation_psi"] == 1.0


def _to_uint8(images):
    from batikfast.metrics import to_uint8

    return to_uint8(images)
