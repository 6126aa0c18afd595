"""Metrics: the maths against closed forms and direct loops; feature networks from files."""
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch

from batikfast.data import BuiltinBatikDataset
from batikfast.metrics import (FeatureNetworkError, SmallFeatureNet, compute_metrics,
                               dataset_features,
                               feature_stats, frechet_distance, kernel_inception_distance,
                               load_feature_network, precision_recall, to_uint8)


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_of_diagonal_gaussians_matches_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)


def test_fid_of_commuting_covariances_matches_the_closed_form():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    var1, var2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    s1, s2 = q @ np.diag(var1) @ q.T, q @ np.diag(var2) @ q.T
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_fid_of_general_covariances_matches_the_matrix_square_root_formula():
    rng = np.random.default_rng(1)
    s1, s2 = _random_spd(rng, 6), _random_spd(rng, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)


def test_fid_of_samples_approaches_the_population_value():
    rng = np.random.default_rng(2)
    s1, s2 = _random_spd(rng, 3), _random_spd(rng, 3)
    mu2 = np.array([0.5, 0.0, -0.5])
    x = rng.multivariate_normal(np.zeros(3), s1, size=40000)
    y = rng.multivariate_normal(mu2, s2, size=40000)
    expected = frechet_distance(np.zeros(3), s1, mu2, s2)
    assert frechet_distance(*feature_stats(x), *feature_stats(y)) == pytest.approx(expected, abs=0.03)


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def _mmd_double_loop(x, y):
    d = x.shape[1]

    def k(a, b):
        return (a @ b / d + 1) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd_of_a_direct_double_loop():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(12, 4)), rng.normal(0.3, 1.2, size=(12, 4))
    # subsets as large as the sets only permute them, which leaves the MMD unchanged
    kid = kernel_inception_distance(real, fake, num_subsets=3, max_subset_size=12)
    assert kid == pytest.approx(_mmd_double_loop(fake, real), rel=1e-10)


def test_kid_averages_subsets_and_is_near_zero_for_one_distribution():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    assert abs(kernel_inception_distance(a, b, num_subsets=20, max_subset_size=100)) < 0.05
    far = kernel_inception_distance(a, b + 1.0, num_subsets=20, max_subset_size=100)
    assert far > 0.5


def test_precision_recall_on_constructed_point_sets():
    rng = np.random.default_rng(5)
    cluster_a = rng.normal(0, 0.01, size=(50, 3))
    cluster_b = rng.normal(0, 0.01, size=(50, 3)) + 100
    cluster_c = rng.normal(0, 0.01, size=(25, 3)) - 100
    reals = np.concatenate([cluster_a, cluster_b])
    fakes = np.concatenate([cluster_a, cluster_c])  # exact copies of A: distance 0, covered
    precision, recall = precision_recall(reals, fakes, k=3)
    assert precision == pytest.approx(50 / 75)   # C lies on no real manifold
    assert recall == pytest.approx(50 / 100)     # B is reached by no fake
    grid = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0)), -1).reshape(-1, 2)
    assert precision_recall(grid, grid, k=3) == (1.0, 1.0)
    # a fake 0.9 from a real grid point is inside its radius (1); one 1.1 from every real is not
    assert precision_recall(grid, np.array([[0.0, 0.9]] * 4 + [[4.5, 10.0 + 0.1]] * 4))[0] == 0.5


def test_precision_recall_needs_more_samples_than_k():
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)


def test_small_feature_network_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(0)
    net = SmallFeatureNet(channels=(4, 8), resolution=16)
    net.save(tmp_path / "feat.pt")
    extractor = load_feature_network(tmp_path / "feat.pt")
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    expected = net(images.float() / 127.5 - 1)
    torch.testing.assert_close(extractor(images), expected)
    assert extractor(torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)).shape == (2, 8)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_feature_network_is_called_with_pixels_in_0_255(tmp_path):
    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return x.mean(dim=(2, 3)) if return_features else x.sum()

    torch.jit.script(Net()).save(str(tmp_path / "net.pt"))
    extractor = load_feature_network(tmp_path / "net.pt")
    images = torch.full((2, 3, 4, 4), 200, dtype=torch.uint8)
    torch.testing.assert_close(extractor(images), torch.full((2, 3), 200.0))


def test_feature_network_file_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_feature_network(tmp_path / "inception.pt")
    torch.save({"arch": "resnet"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="SmallFeatureNet"):
        load_feature_network(tmp_path / "other.pt")


def _unusable_feature_files(folder):
    """{name: path} of files that are not usable feature networks, each wrong in its own way."""
    good = SmallFeatureNet(channels=(4, 8), resolution=16).state_dict()
    files = {}

    def small(name, **payload):
        files[name] = folder / f"{name}.pt"
        torch.save({"arch": "batikfast.SmallFeatureNet", **payload}, files[name])

    small("unknown_option", config={"width": 4}, state_dict=good)            # TypeError
    small("no_state_dict", config={"channels": [4, 8], "resolution": 16})    # KeyError
    small("config_not_a_dict", config=[4, 8], state_dict=good)               # TypeError
    small("wrong_shapes", config={"channels": [4, 16], "resolution": 16}, state_dict=good)
    small("missing_weights", config={"channels": [4, 8], "resolution": 16}, state_dict={})
    # loaded, then failed on the first batch: no pixel is left to pool at the last stage
    small("too_small", config={"channels": [4, 8], "resolution": 2}, state_dict=good)
    files["damaged_torchscript"] = folder / "damaged_torchscript.pt"
    with zipfile.ZipFile(files["damaged_torchscript"], "w") as archive:
        archive.writestr("net/code/__torch__/net.py", "not code")
        archive.writestr("net/constants.pkl", "not a pickle")
    files["folder"] = folder / "folder.pt"
    files["folder"].mkdir()
    return files


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_every_unusable_feature_network_file_is_one_error_naming_it(tmp_path):
    # Each was a TypeError, KeyError or RuntimeError (a traceback from the command line; a
    # TypeError or KeyError also escaped the training loop's check, leaving other ranks waiting),
    # or, for too_small, an error at the first evaluation after hours of training.
    for name, path in _unusable_feature_files(tmp_path).items():
        with pytest.raises(FeatureNetworkError) as error:
            load_feature_network(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value), (name, error.value)


def test_metrics_command_line_refuses_a_damaged_feature_file_in_one_line(tmp_path, capsys):
    from batikfast.metrics.compute import main

    checkpoint = _untrained_checkpoint(tmp_path / "G.pt")
    path = _unusable_feature_files(tmp_path)["wrong_shapes"]
    assert main(["--ckpt", str(checkpoint), "--features", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(path) in err and "\n" not in err, err


def test_a_one_channel_feature_network_takes_grey_images(tmp_path):
    torch.manual_seed(0)
    net = SmallFeatureNet(in_channels=1, channels=(4, 8), resolution=16)
    net.save(tmp_path / "grey.pt")
    extractor = load_feature_network(tmp_path / "grey.pt")
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(extractor(images), net(images.float() / 127.5 - 1))
    with pytest.raises(ValueError, match="1-channel images, got 3"):
        extractor(images.repeat(1, 3, 1, 1))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_feature_network_errors_are_not_retried_without_return_features(tmp_path):
    # Retrying net(x) after an error in net(x, return_features=True) hid the error and, for
    # Inception, would give class probabilities where features were asked for.
    torch.jit.script(_FeaturesOf4x4()).save(str(tmp_path / "4x4.pt"))
    extractor = load_feature_network(tmp_path / "4x4.pt")
    assert extractor(torch.zeros(2, 3, 4, 4, dtype=torch.uint8)).shape == (2, 48)
    with pytest.raises(RuntimeError, match="invalid for input of size"):
        extractor(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    # a network without the flag is called with the images alone
    torch.jit.script(_NoFlag()).save(str(tmp_path / "plain.pt"))
    features = load_feature_network(tmp_path / "plain.pt")(
        torch.full((2, 3, 4, 4), 10, dtype=torch.uint8))
    torch.testing.assert_close(features, torch.full((2, 3), 10.0))


class _FeaturesOf4x4(torch.nn.Module):
    """Features of 4x4 images only (a shape error otherwise); class scores of any size."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if return_features:
            return x.view(x.shape[0], 48)
        return x.mean(dim=(2, 3))


class _NoFlag(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _untrained_checkpoint(path, c_dim=0, **config_options):
    from batikfast.training.checkpoint import save_checkpoint
    from batikfast.training.config import make_config, network_kwargs
    from batikfast.training.model import build_generator

    config = make_config("tiny", resolution=16, z_dim=8, w_dim=8, channel_base=128,
                         channel_max=8, **config_options)
    G_kwargs, _ = network_kwargs(config, c_dim=c_dim)
    torch.manual_seed(0)
    G = build_generator(G_kwargs)
    return save_checkpoint({"config": dict(config, G_kwargs=G_kwargs), "G_ema": G.state_dict()},
                           path)


class _ConstantGenerator(torch.nn.Module):
    """Generator stand-in returning dataset images, so its metrics against them are ~0."""

    z_dim, c_dim, img_resolution = 4, 0, 16

    def __init__(self, images):
        super().__init__()
        self.images = images
        self.calls = 0

    def forward(self, z, c, truncation_psi=1.0, noise_mode="const"):
        start = self.calls
        self.calls += z.shape[0]
        return self.images[start:start + z.shape[0]].float() / 127.5 - 1


def test_compute_metrics_against_a_dataset_is_zero_for_the_dataset_itself(tmp_path):
    dataset = BuiltinBatikDataset(resolution=16, size=24)
    torch.manual_seed(0)
    extractor = load_feature_network(_saved_small_net(tmp_path))
    images = torch.from_numpy(np.stack([dataset[i][0] for i in range(24)]))
    G = _ConstantGenerator(images)
    cache = {}
    result = compute_metrics(G, dataset, extractor, num_gen=24, batch=10, real_cache=cache)
    assert result["fid"] == pytest.approx(0, abs=1e-6)
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    assert len(cache) == 1
    noisy = _ConstantGenerator(torch.randint(0, 256, images.shape, dtype=torch.uint8))
    assert compute_metrics(noisy, dataset, extractor, ("fid",), num_gen=24,
                           real_cache=cache)["fid"] > 0.01


def _saved_small_net(tmp_path):
    SmallFeatureNet(channels=(4, 8), resolution=16).save(tmp_path / "f.pt")
    return tmp_path / "f.pt"


def test_to_uint8_rounds_like_nvidias_image_export():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.999, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255, 255]


def test_dataset_features_cover_the_requested_count(tmp_path):
    dataset = BuiltinBatikDataset(resolution=16, size=7)
    extractor = load_feature_network(_saved_small_net(tmp_path))
    assert dataset_features(dataset, extractor, num=5, batch=2).shape == (5, 8)


def test_metrics_command_line_on_a_checkpoint(tmp_path, capsys):
    import json

    from batikfast.metrics.compute import main
    from batikfast.training.config import make_config
    from batikfast.training.loop import train

    config = make_config("tiny", resolution=16, z_dim=8, w_dim=8, channel_base=128,
                         channel_max=8, batch=4, kimg=0.004, workers=0, device="cpu",
                         compile=False, grid_seeds=4, data_size=16)
    checkpoint = train(config, tmp_path / "run")["checkpoint"]
    features = _saved_small_net(tmp_path)
    assert main(["--ckpt", str(checkpoint), "--features", str(features), "--num-gen", "8",
                 "--num-real", "8", "--metrics", "fid,kid", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result.keys() == {"fid", "kid"} and result["fid"] > 0


def test_metrics_command_line_says_what_is_wrong_before_extracting_features(tmp_path, capsys):
    from batikfast.metrics.compute import main

    features = _saved_small_net(tmp_path)
    missing = str(tmp_path / "none.pt")
    assert main(["--ckpt", missing, "--features", str(features), "--metrics", "fid,bogus"]) == 2
    assert "--metrics must be a comma list" in capsys.readouterr().err
    assert main(["--ckpt", missing, "--features", str(features), "--num-gen", "3"]) == 2
    assert "precision/recall (k=3)" in capsys.readouterr().err
    assert main(["--ckpt", missing, "--features", str(features)]) == 2
    assert "none.pt" in capsys.readouterr().err
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"\x00" * 64)
    assert main(["--ckpt", str(damaged), "--features", str(features)]) == 2
    assert "damaged.pt" in capsys.readouterr().err


def test_metrics_command_line_checks_device_truncation_counts_and_batch_first(
        tmp_path, capsys, monkeypatch):
    from batikfast.metrics.compute import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    missing = str(tmp_path / "none.pt")  # each option is refused before the checkpoint is read
    for options, message in (
            (["--device", "cuda"], "--device cuda was asked for but no GPU is visible (use "
                                   "--device cpu)"),
            (["--device", "gpu0"], "--device must be auto, cpu, cuda or cuda:N, got 'gpu0'"),
            (["--trunc", "nan"], "--trunc must be a finite number, got nan"),
            (["--metrics", "fid", "--num-gen", "1"], "--num-gen must be at least 2, got 1"),
            (["--metrics", "kid", "--num-real", "0"], "--num-real must be at least 2, got 0"),
            (["--batch", "0"], "--batch must be at least 1, got 0")):
        assert main(["--ckpt", missing, "--features", missing, *options]) == 2, options
        err = capsys.readouterr().err.strip()
        assert err == f"error: {message}", err


def test_cached_dataset_features_are_kept_per_dataset_and_feature_network(tmp_path):
    # The cache was keyed by (dataset name, length, num_real): a second feature network, or a
    # second dataset with the same name and length, got the first one's features.
    dataset = BuiltinBatikDataset(resolution=16, size=8)
    images = torch.from_numpy(np.stack([dataset[i][0] for i in range(8)]))
    torch.manual_seed(0)
    first = load_feature_network(_saved_small_net(tmp_path))
    SmallFeatureNet(channels=(4, 8), resolution=16).save(tmp_path / "other.pt")
    other = load_feature_network(tmp_path / "other.pt")
    cache = {}
    for extractor in (first, other):
        result = compute_metrics(_ConstantGenerator(images), dataset, extractor, ("fid",),
                                 num_gen=8, real_cache=cache)
        assert result["fid"] == pytest.approx(0, abs=1e-6)
    reseeded = BuiltinBatikDataset(resolution=16, size=8, seed=1)
    uncached = compute_metrics(_ConstantGenerator(images), reseeded, first, ("fid",), num_gen=8)
    cached = compute_metrics(_ConstantGenerator(images), reseeded, first, ("fid",), num_gen=8,
                             real_cache=cache)
    assert cached == uncached and cached["fid"] > 1e-3
    assert len(cache) == 3


class _Recorder(torch.nn.Module):
    """A generator that records how it was called."""

    def __init__(self, G):
        super().__init__()
        self.G, self.z_dim, self.c_dim, self.calls = G, G.z_dim, G.c_dim, []

    def forward(self, z, c, **kwargs):
        self.calls.append(dict(kwargs, training=self.training, c=c.clone()))
        return self.G(z, c, **kwargs)


def test_metrics_sample_the_generator_as_nvidias_metrics_do(tmp_path):
    from batikfast.metrics.compute import generator_features
    from batikfast.training.checkpoint import load_generator

    G, _ = load_generator(_untrained_checkpoint(tmp_path / "G.pt"))
    for name, parameter in G.named_parameters():
        if name.endswith("noise_strength"):
            parameter.data.fill_(1.0)  # untrained, the noise strengths are 0
    extractor = load_feature_network(_saved_small_net(tmp_path))
    recorder = _Recorder(G).train()
    w_avg = G.mapping.w_avg.clone()
    rng_state = torch.get_rng_state()
    first = generator_features(recorder, extractor, 6, batch=4)
    # eval mode (w_avg not moved), untruncated, noise drawn per image as G's distribution has it
    assert [(call["training"], call["truncation_psi"], call["noise_mode"])
            for call in recorder.calls] == [(False, 1.0, "random")] * 2
    assert torch.equal(G.mapping.w_avg, w_avg) and recorder.training
    # the noise comes from the seed, and the caller's random state is left alone
    assert torch.equal(torch.get_rng_state(), rng_state)
    np.testing.assert_array_equal(generator_features(recorder, extractor, 6, batch=4), first)
    assert not np.array_equal(generator_features(recorder, extractor, 6, batch=4, seed=1), first)


def test_a_conditional_generator_gets_labels_drawn_from_the_dataset_items(tmp_path):
    from batikfast.metrics.compute import generator_features
    from batikfast.training.checkpoint import load_generator

    G, _ = load_generator(_untrained_checkpoint(tmp_path / "G.pt", c_dim=4))
    extractor = load_feature_network(_saved_small_net(tmp_path))
    recorder = _Recorder(G)
    labels = np.eye(4, dtype=np.float32)[[2] * 9 + [0]]  # nine items of class 2, one of class 0
    generator_features(recorder, extractor, 200, batch=100, labels=labels)
    drawn = torch.cat([call["c"] for call in recorder.calls])
    assert drawn.shape == (200, 4) and set(drawn.sum(dim=1).tolist()) == {1.0}
    assert 0.8 < drawn[:, 2].mean().item() < 0.97 and drawn[:, [1, 3]].sum().item() == 0


def test_too_few_images_for_a_metric_are_refused_before_any_is_generated(tmp_path):
    # A dataset of 3 images with precision/recall failed in precision_recall after every
    # feature had been extracted (at the first evaluation of a training run).
    extractor = load_feature_network(_saved_small_net(tmp_path))
    images = torch.zeros(8, 3, 16, 16, dtype=torch.uint8)
    G = _ConstantGenerator(images)
    with pytest.raises(ValueError, match=r"precision/recall \(k=3\) needs more than 3 dataset "
                                         r"images, got 3"):
        compute_metrics(G, BuiltinBatikDataset(resolution=16, size=3), extractor, num_gen=8)
    with pytest.raises(ValueError, match="at least 2 dataset images, got 1"):
        compute_metrics(G, BuiltinBatikDataset(resolution=16, size=1), extractor, ("kid",),
                        num_gen=8)
    with pytest.raises(ValueError, match="at least 2 generated images, got 1"):
        compute_metrics(G, BuiltinBatikDataset(resolution=16, size=4), extractor, ("fid",),
                        num_gen=1)
    assert G.calls == 0


def test_metrics_command_line_uses_the_runs_data_as_training_measured_it(tmp_path, capsys,
                                                                         monkeypatch):
    import json

    from batikfast.metrics import compute

    seen = {}

    def spy(G, dataset, extractor, metrics, num_gen, num_real, *args, **kwargs):
        seen.update(size=len(dataset), xflip=dataset.xflip, seed=dataset.seed, num_real=num_real)
        return {"fid": 1.0}

    monkeypatch.setattr(compute, "compute_metrics", spy)
    features = str(_saved_small_net(tmp_path))
    checkpoint = str(_untrained_checkpoint(tmp_path / "G.pt", data_size=5, data_seed=3,
                                           mirror=True))
    # x-flipped as in training (mirror=True): 10 images, not the 5 unflipped ones
    assert compute.main(["--ckpt", checkpoint, "--features", features, "--metrics", "fid",
                         "--device", "cpu"]) == 0
    assert seen == dict(size=10, xflip=True, seed=3, num_real=None)
    assert json.loads(capsys.readouterr().out) == {"fid": 1.0}
    # asking for more than there are: said, not silent
    assert compute.main(["--ckpt", checkpoint, "--features", features, "--metrics", "fid",
                         "--num-real", "50", "--device", "cpu"]) == 0
    assert "--num-real 50 but the dataset has 10 images" in capsys.readouterr().err
    # too few for precision/recall: one line before any feature is extracted
    small = str(_untrained_checkpoint(tmp_path / "small.pt", data_size=2, mirror=False))
    seen.clear()
    assert compute.main(["--ckpt", small, "--features", features, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: precision/recall (k=3) needs more than 3 dataset images, got 2", err
    assert not seen


def test_fid_with_fewer_samples_than_dimensions_matches_the_exact_low_rank_form():
    # S1 = Xc^T Xc of rank n - 1 < d (Inception's 2048 features from fewer images): the
    # eigenvalues of S1 S2 are those of the n x n matrix Xc S2 Xc^T, so Tr((S1 S2)^(1/2)) is
    # computed there with no near-zero eigenvalues whose rounding the square root amplifies.
    rng = np.random.default_rng(6)
    n, d = 20, 200
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 2, size=d)
    y = rng.normal(size=(n, d)) + 0.1
    (mu1, s1), (mu2, s2) = feature_stats(x), feature_stats(y)
    centred = (x - mu1) / np.sqrt(n - 1)
    small = centred @ s2 @ centred.T
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0, None)).sum()
    exact = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-7)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(exact, rel=1e-7)
    # float32 statistics are taken in float64
    assert frechet_distance(mu1.astype(np.float32), s1.astype(np.float32), mu1, s1) == \
        pytest.approx(0, abs=1e-3)


def test_precision_recall_match_a_direct_computation_for_any_batch():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(60, 5)), rng.normal(0.4, 1.3, size=(45, 5))

    def coverage(manifold, probes, k=3):
        radii = np.sort(np.linalg.norm(manifold[:, None] - manifold[None], axis=2), axis=1)[:, k]
        dist = np.linalg.norm(probes[:, None] - manifold[None], axis=2)
        return (dist <= radii[None]).any(axis=1).mean()

    expected = (coverage(real, fake), coverage(fake, real))
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    for batch in (1, 7, 1024):
        assert precision_recall(real, fake, k=3, batch=batch) == pytest.approx(expected, abs=1e-15)
    # disjoint sets: nothing covered either way
    assert precision_recall(real, fake + 100) == (0.0, 0.0)


def test_metric_parameters_are_checked():
    a = np.zeros((5, 2))
    for kwargs in (dict(num_subsets=0), dict(max_subset_size=1)):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            kernel_inception_distance(a, a, **kwargs)
    with pytest.raises(ValueError, match="batch=0"):
        precision_recall(a, a, batch=0)


def test_a_conditional_generator_and_a_dataset_with_other_classes_are_refused_first(
        tmp_path, capsys, monkeypatch):
    # Was a ValueError from the mapping network after every dataset feature had been
    # extracted: a traceback from the command line.
    from batikfast.metrics import compute

    features = str(_saved_small_net(tmp_path))
    checkpoint = _untrained_checkpoint(tmp_path / "G.pt", c_dim=3, data_size=12, cond=True)
    extracted = []
    monkeypatch.setattr(compute, "dataset_features", lambda *args: extracted.append(args))
    assert compute.main(["--ckpt", str(checkpoint), "--features", features, "--num-gen", "8",
                         "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: the generator is conditional on 3 classes but the dataset's labels " \
                  "have 4", err  # the builtin dataset's four motifs
    assert not extracted


class _SortedFolder:
    """A dataset as a folder sorted by class reads: ten black images, then ten white ones."""

    def __len__(self):
        return 20

    def __getitem__(self, index):
        return np.full((3, 16, 16), 0 if index < 10 else 255, dtype=np.uint8), np.zeros(0)


def test_fewer_dataset_images_than_it_holds_are_a_seeded_sample_of_all_of_it(tmp_path):
    # The first num items were taken: from a folder sorted by class, one class only.
    extractor = load_feature_network(_saved_small_net(tmp_path))
    black, white = (extractor(torch.full((1, 3, 16, 16), v, dtype=torch.uint8)).double().numpy()
                    for v in (0, 255))
    features = dataset_features(_SortedFolder(), extractor, num=8, batch=3)
    is_black = np.isclose(features, black).all(axis=1)
    assert features.shape == (8, 8) and 0 < is_black.sum() < 8
    assert np.isclose(features[~is_black], white).all()
    np.testing.assert_array_equal(dataset_features(_SortedFolder(), extractor, num=8), features)
    assert len(dataset_features(_SortedFolder(), extractor, num=50)) == 20
