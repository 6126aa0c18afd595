"""The benchmark scripts run end to end on the CPU and write what they promise.

CPU timings mean nothing here; these tests check the plumbing: shapes, byte and FLOP
counting, the JSON / markdown outputs, labels, and re-plotting from JSON without a GPU.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import opcases, report, shapes  # noqa: E402


def _run(args, tmp_path, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(REPO), TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("bench")
    stdout = _run([str(REPO / "benchmarks" / "run.py"), "--quick", "--ops", "bias_act",
                   "diffusion_noise", "--backends", "ref", "triton", "cuda",
                   "--outdir", str(outdir)],
                  outdir)
    return outdir, stdout, json.loads((outdir / "ops.json").read_text())


def test_quick_run_writes_json_with_provenance_and_ceilings(quick_run):
    _, _, payload = quick_run
    meta = payload["meta"]
    for key in ("device", "torch", "triton", "cuda", "git_commit", "date", "timing"):
        assert key in meta, key
    if meta["device_type"] == "cpu":
        assert meta["timing"] == "CPU (not comparable)"
    assert payload["ceilings"]["copy_gbps"] > 0
    assert set(payload["ceilings"]["matmul_tflops"]) == {"bf16", "fp16", "fp32", "tf32"}


def test_quick_run_times_every_requested_case_mode_and_implementation(quick_run):
    _, _, payload = quick_run
    rows = payload["results"]
    tiny = [c for c in shapes.tiny_cases() if c.op in ("bias_act", "diffusion_noise")]
    assert len(rows) == len(tiny) * len(opcases.MODES) * 3
    # An implementation either cannot run here (and says so) or is timed: an "error:" row is
    # a case that was not timed (a broken Triton kernel gave one on every row, and passed).
    # Triton is unavailable only where batikfast says so (the script interprets it on the CPU).
    from batikfast import backends
    device = torch.device(payload["meta"]["device_type"])
    may_be_unavailable = {"cuda"}
    if backends.unavailable_reason("triton", device, torch.float32) is not None:
        may_be_unavailable.add("triton")
    for row in rows:
        assert row["status"] == "ok" or (row["status"].startswith("unavailable:")
                                         and row["impl"] in may_be_unavailable), row
        if row["impl"] == "ref":
            assert row["status"] == "ok"
            assert row["speedup_vs_ref"] == pytest.approx(1.0)
        if row["status"] == "ok":
            assert row["ms_p20"] <= row["ms"] <= row["ms_p80"], row
            assert row["gbps"] == pytest.approx(row["bytes"] / (row["ms"] * 1e-3) / 1e9)


def test_unavailable_implementations_say_why(quick_run):
    _, _, payload = quick_run
    if payload["meta"]["device_type"] == "cpu":
        cuda_rows = [r for r in payload["results"] if r["impl"] == "cuda"]
        assert cuda_rows and all(r["status"].startswith("unavailable: ") for r in cuda_rows)
        assert all(len(r["status"]) > len("unavailable: ") + 5 for r in cuda_rows)


def test_quick_run_prints_table_and_writes_markdown_labelled_cpu(quick_run):
    outdir, stdout, payload = quick_run
    assert "tiny.act" in stdout and "ms" in stdout
    text = (outdir / "ops.md").read_text()
    assert text.startswith("# batikfast op benchmarks")
    assert "| case | shape |" in text and "tiny.noise" in text
    assert payload["meta"]["torch"] in text
    if payload["meta"]["device_type"] == "cpu":
        assert "CPU (not comparable)" in text and "CPU (not comparable)" in stdout


def test_plot_rereads_saved_json_without_a_gpu(quick_run, tmp_path):
    outdir, _, _ = quick_run
    copy = tmp_path / "ops.json"
    copy.write_text((outdir / "ops.json").read_text())
    stdout = _run([str(REPO / "benchmarks" / "plot.py"), str(copy)], tmp_path, timeout=120)
    assert (tmp_path / "ops.md").read_text() == (outdir / "ops.md").read_text()
    assert f"wrote {tmp_path / 'ops.png'}" in stdout
    assert (tmp_path / "ops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paper256_channels_follow_channel_base_16384_max_512():
    assert [shapes.channels(r) for r in shapes.G_RESOLUTIONS] == [512, 512, 512, 512, 256, 128, 64]


def test_generator_cases_cover_every_synthesis_layer_once():
    convs = [c for c in shapes.generator_cases() if c.op == "modulated_conv2d"]
    # b4: conv1 + torgb; b8..b256: conv0 (up) + conv1 + torgb
    assert len(convs) == 2 + 6 * 3
    up = {c.name: c.params for c in convs if c.params["up"] == 2}
    assert up["G.b64.conv0"]["in_channels"] == 512 and up["G.b64.conv0"]["out_channels"] == 256
    assert up["G.b64.conv0"]["in_res"] == 32 and up["G.b64.conv0"]["out_res"] == 64


def test_minimal_bytes_and_flops_are_counted_by_hand():
    import torch
    act = shapes.Case("bias_act", "a", "t", dict(channels=8, res=4, act="lrelu", clamp=256.0))
    numel = 2 * 8 * 4 * 4
    assert opcases.cost(act, 2, torch.float16, "fwd") == (2 * (2 * numel + 8), 0)
    assert opcases.cost(act, 2, torch.float32, "fwd+bwd") == (4 * (5 * numel + 3 * 8), 0)
    up = shapes.Case("upfirdn2d", "u", "t", dict(channels=3, res=8, mode="up2"))
    assert opcases.cost(up, 1, torch.float32, "fwd")[0] == 4 * (3 * 64 + 3 * 256)
    conv = [c for c in shapes.generator_cases() if c.name == "G.b64.conv1"][0]
    _, flops = opcases.cost(conv, 16, torch.float16, "fwd")
    assert flops == 2 * 16 * 64 * 64 * 256 * 256 * 9
    assert opcases.cost(conv, 16, torch.float16, "fwd+bwd")[1] == 3 * flops
    down = [c for c in shapes.discriminator_cases() if c.name == "D.b128.conv1"][0]
    assert opcases.cost(down, 4, torch.float32, "fwd")[1] == 2 * 4 * 64 * 64 * 256 * 128 * 9


def test_summed_times_compare_only_cases_every_implementation_finished():
    def row(case, impl, ms, status="ok"):
        return dict(shape_set="s", batch=1, dtype="fp16", mode="fwd", op="o", case=case,
                    impl=impl, ms=ms, status=status)
    rows = [row("a", "ref", 2.0), row("a", "triton", 1.0), row("b", "ref", 4.0),
            row("b", "triton", None, status="error: boom")]
    sums = report.summed_times(rows)
    (entry,) = sums.values()
    assert entry["cases"] == 1 and entry["ms"] == {"ref": 2.0, "triton": 1.0}


def _fake_plugin_module(init):
    import types
    module = types.SimpleNamespace(_plugin=None)

    def _init():
        return init(module)
    module._init = _init
    return module


def test_peer_script_labels_nvidia_plugin_build_failure_as_their_reference():
    import torch
    from benchmarks.peer_nvidia import Nvidia

    def fail(module):
        raise RuntimeError("Error building extension 'bias_act_plugin'")
    module = _fake_plugin_module(fail)
    kind, why = Nvidia._init_plugin(module, torch.device("cuda"))
    assert kind == "ref" and "plugin build failed" in why and "bias_act_plugin" in why
    assert module._init() is False  # later calls take their reference without rebuilding


def test_peer_script_labels_a_silent_fallback_and_a_loaded_plugin():
    import warnings

    import torch
    from benchmarks.peer_nvidia import Nvidia

    def warn(module):
        warnings.warn("Failed to build CUDA kernels for upfirdn2d. Falling back to slow reference")
        return False
    kind, why = Nvidia._init_plugin(_fake_plugin_module(warn), torch.device("cuda"))
    assert kind == "ref" and "Falling back" in why

    def load(module):
        module._plugin = object()
        return True
    assert Nvidia._init_plugin(_fake_plugin_module(load), torch.device("cuda"))[0] == "cuda"


@pytest.mark.skipif(not (REPO / ".peer" / "stylegan3" / "torch_utils").exists(),
                    reason="NVIDIA's stylegan3 is not fetched into .peer/ (never committed)")
def test_peer_script_matches_nvidia_reference_on_tiny_shapes(tmp_path):
    _run([str(REPO / "benchmarks" / "peer_nvidia.py"), "--nvidia-path",
          str(REPO / ".peer" / "stylegan3"), "--quick", "--backends", "ref", "--ops", "bias_act",
          "--device", "cpu",  # on a GPU their plugin would JIT-compile for a minute
          "--outdir", str(tmp_path)], tmp_path)
    payload = json.loads((tmp_path / "peer_nvidia.json").read_text())
    ours = [r for r in payload["results"] if r["impl"] == "batikfast-ref"]
    assert ours and all(r["status"] == "ok" for r in ours)
    assert all(r["max_rel_err_vs_nvidia"] < 1e-5 for r in ours)
    assert "nvidia-ref" in (tmp_path / "peer_nvidia.md").read_text()


NVIDIA_CHECKOUT = REPO / ".peer" / "stylegan3"
needs_nvidia_checkout = pytest.mark.skipif(
    not (NVIDIA_CHECKOUT / "torch_utils").exists(),
    reason="NVIDIA's stylegan3 is not fetched into .peer/ (never committed)")


@needs_nvidia_checkout
def test_peer_networks_script_matches_nvidia_networks_with_the_same_weights(tmp_path):
    stdout = _run([str(REPO / "benchmarks" / "peer_networks.py"), "--nvidia-path",
                   str(NVIDIA_CHECKOUT), "--quick", "--backends", "ref", "cuda",
                   "--device", "cpu",  # on a GPU their plugins would JIT-compile for minutes
                   "--outdir", str(tmp_path)], tmp_path)
    payload = json.loads((tmp_path / "peer_networks.json").read_text())
    meta, rows = payload["meta"], payload["results"]
    # CPU tensors take their reference: said so, never labelled as their plugin
    assert meta["nvidia_network_path"][0] == "ref"
    assert "CPU tensors" in meta["nvidia_network_path"][1]
    theirs = [r for r in rows if r["impl"].startswith("nvidia")]
    assert [r["measurement"] for r in theirs] == ["G:fwd", "G:fwd+bwd", "D:fwd+bwd"]
    assert all(r["impl"] == "nvidia-ref" and r["status"] == "ok" for r in theirs)
    ours = [r for r in rows if r["impl"] == "batikfast-ref"]
    assert len(ours) == 3 and all(r["status"] == "ok" and r["ms_p20"] <= r["ms"] <= r["ms_p80"]
                                  for r in ours)
    # the same computation: outputs and every gradient agree to float32 rounding
    assert all(r["max_rel_err_vs_nvidia"] < 1e-5 for r in ours)
    assert all(r["output_rel_err_vs_nvidia"] <= r["max_rel_err_vs_nvidia"] for r in ours)
    assert ours[1]["worst_tensor"] in ("image", "logits") or \
        ours[1]["worst_tensor"].startswith("grad ")
    assert all(r["speedup_vs_nvidia"] > 0 for r in ours)
    cuda = [r for r in rows if r["impl"] == "batikfast-cuda"]
    assert len(cuda) == 3 and all(r["status"].startswith("unavailable") for r in cuda)
    text = (tmp_path / "peer_networks.md").read_text()
    assert "NVIDIA path that ran: **ref**" in text and "| G:fwd+bwd |" in text
    assert "t_dim=0" in text
    assert "nvidia-ref" in stdout and "batikfast-ref" in stdout


# Run in a child process: importing NVIDIA's code puts their top-level `training` package
# and the pkg_resources / requests stand-ins into sys.modules.
ONE_WEIGHT_OFF = """
import sys, torch
from benchmarks import peer_networks
build_pair = peer_networks.build_pair

def one_weight_off(*args):
    nets = build_pair(*args)
    G, D = nets["batikfast"]
    with torch.no_grad():
        G.synthesis.b32.conv1.noise_strength.mul_(1.5)
        D.b4.out.bias.add_(0.05)
    return nets

peer_networks.build_pair = one_weight_off
peer_networks.main(sys.argv[1:])
"""


@needs_nvidia_checkout
def test_peer_networks_deviation_shows_networks_that_compute_differently(tmp_path):
    """The check must see a difference: a bias or noise strength off in batikfast's copy (a
    fresh network's are zero, so the script gives them values first) shows as a deviation."""
    _run(["-c", ONE_WEIGHT_OFF, "--nvidia-path", str(NVIDIA_CHECKOUT), "--quick", "--device",
          "cpu", "--measure", "G:fwd", "D:fwd", "--outdir", str(tmp_path)], tmp_path)
    payload = json.loads((tmp_path / "peer_networks.json").read_text())
    ours = [r for r in payload["results"] if r["impl"] == "batikfast-ref"]
    assert len(ours) == 2 and all(r["max_rel_err_vs_nvidia"] > 1e-3 for r in ours)


@needs_nvidia_checkout
def test_gpu_check_peer_step_runs_the_op_and_then_the_network_comparison(tmp_path):
    import shutil
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils timeout")
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), RESULTS_DIR=str(tmp_path / "results" / "cpu-test"),
               PYTHON=sys.executable, TRITON_INTERPRET="1",
               PEER_ARGS="--quick --ops bias_act --backends ref --batch 2 --dtype fp32 "
                         "--modes fwd",
               PEER_NETWORKS_ARGS="--quick --measure G:fwd")
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "peer"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    summary = (out / "summary.txt").read_text()
    assert result.returncode == 0, summary
    assert "peer: exit 0" in summary and "peer_networks: exit 0" in summary
    assert (out / "peer_networks.md").read_text().startswith("# batikfast vs NVIDIA stylegan3 "
                                                             "networks (tiny)")
    log = (out / "gpu_check.log").read_text()
    assert "benchmarks/peer_networks.py --nvidia-path .peer/stylegan3 --budget" in log


def test_peer_networks_labels_their_networks_reference_unless_both_plugins_loaded():
    from benchmarks.peer_networks import NvidiaNetworks
    nvidia = object.__new__(NvidiaNetworks)  # no checkout needed: only the labels
    nvidia.paths = {"bias_act": ("cuda", "CUDA plugin loaded"),
                    "upfirdn2d": ("ref", "plugin build failed: RuntimeError: nvcc")}
    kind, why = nvidia.network_path()
    assert kind == "ref" and "upfirdn2d: plugin build failed" in why and "bias_act" not in why
    nvidia.paths["upfirdn2d"] = ("cuda", "CUDA plugin loaded")
    assert nvidia.network_path()[0] == "cuda"


def test_peer_networks_refuses_to_compare_mixed_precision_off_cuda(capsys):
    """NVIDIA's blocks force fp32 for tensors off CUDA: on the CPU a mixed row compared an fp32
    NVIDIA network with an fp16 batikfast one (a deviation of 0.86, 47x 'slower')."""
    from benchmarks import peer_networks
    args = peer_networks.parse_args(["--nvidia-path", ".", "--quick", "--precision", "mixed"])
    rows = peer_networks.run(args, None, torch.device("cpu"), None, [])
    assert len(rows) == 3 and all(r["impl"] == "all" for r in rows)
    assert all(r["status"].startswith("unavailable: NVIDIA's networks run every layer in fp32")
               for r in rows)
    assert capsys.readouterr().out.count("force_fp32") == 3
    assert peer_networks.mixed_unavailable("mixed", torch.device("cuda")) is None


def test_peer_networks_deviation_names_the_worst_tensor_and_keeps_the_output_apart():
    from benchmarks.peer_networks import deviations
    want = [torch.tensor([10.0, -10.0]), torch.tensor([2.0, 0.0]), torch.tensor([1e-9, 0.0])]
    got = [torch.tensor([10.1, -10.0]), torch.tensor([2.0, 1.0]), torch.tensor([0.0, 0.0])]
    found = deviations(got, want, ["image", "grad a", "grad b"])
    assert found["worst_tensor"] == "grad a" and found["max_rel_err_vs_nvidia"] == 0.5
    assert found["output_rel_err_vs_nvidia"] == pytest.approx(0.01, rel=1e-5)


def test_peer_networks_prints_and_marks_measurements_the_budget_skipped(capsys):
    from benchmarks import peer_networks, plot
    args = peer_networks.parse_args(["--nvidia-path", ".", "--quick", "--budget", "1e-9",
                                     "--batch", "4", "8"])
    rows = peer_networks.run(args, None, torch.device("cpu"), None, [])
    assert len(rows) == 2 * 3 and all(r["status"] == "skipped: time budget" for r in rows)
    assert capsys.readouterr().out.count("skipped: time budget") == len(rows)
    meta = dict(device="CPU", device_type="cpu", date="d", git_commit="c", torch="t",
                triton="tr", cuda="cu", timing="CPU", budget_s=1e-9, cfg="tiny",
                nvidia_flavour="stylegan3", nvidia_path="p", benchmark="peer_networks",
                nvidia_network_path=("ref", "CPU tensors"), cudnn_benchmark=True,
                tf32_cudnn=False, compared="t_dim=0")
    payload = dict(meta=meta, results=rows)
    text = peer_networks.markdown(payload)
    assert "6 measurement(s) skipped" in text and "| G:fwd | skipped |" in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1  # header, rule and rows agree
    assert plot.kind_of(payload) == "peer_networks"  # not taken for the per-op comparison


def _step_row(backend, compile_mode, sec_per_kimg):
    return dict(config=f"{backend} {compile_mode} mixed", backend=backend, compile=compile_mode,
                precision="mixed", status="ok", sec_per_kimg=sec_per_kimg,
                images_per_s=1000 / sec_per_kimg, steps=32, warmup_s=1.0,
                peak_gpu_mem_gib=3.0, phase_fractions={"Gmain": 0.5, "Dmain": 0.3, "other": 0.2})


def test_train_step_speedups_compare_with_eager_and_compiled_reference_of_same_precision():
    from benchmarks import train_step
    rows = [_step_row("ref", "eager", 6.0), _step_row("ref", "compiled", 4.0),
            _step_row("cuda", "compiled", 2.0)]
    train_step._add_speedups(rows)
    assert rows[2]["speedup_vs_ref"] == pytest.approx(3.0)
    assert rows[2]["speedup_vs_compiled"] == pytest.approx(2.0)
    meta = dict(cfg="paper256", device="X", device_type="cuda", date="d", git_commit="c",
                torch="t", triton="tr", cuda="cu", what="w")
    text = train_step.markdown(dict(meta=meta, results=rows))
    assert "| cuda compiled mixed | 500.0 | 2.00 | 3.00x | 2.00x |" in text
    assert "| Gmain | Dmain | other |" in text


def test_train_step_says_before_an_interpreted_triton_setup_that_it_takes_minutes(
        monkeypatch, capsys):
    import torch
    from benchmarks import train_step
    measured = []
    monkeypatch.setattr(train_step, "_measure_with_retries", lambda args, device, backend, *rest:
                        measured.append((backend, capsys.readouterr().out)))
    train_step.run(train_step.parse_args(["--quick", "--backends", "ref", "triton"]),
                   torch.device("cpu"))
    said_before = dict(measured)
    assert "interpreted on the CPU, minutes per step" in said_before["triton"]
    assert "interpreted" not in said_before["ref"]


def _gpu_like_payload():
    rows = []
    for impl, ms in (("ref", 2.0), ("ref+compile", 1.5), ("triton", 1.0), ("cuda", 0.8)):
        nbytes = 2 * 2**30
        rows.append(dict(op="bias_act", case="G.b256.act", shape_set="paper256-g", batch=64,
                         dtype="fp16", mode="fwd", shape="[64,64,256,256]", impl=impl,
                         status="ok", ms=ms, ms_p20=ms, ms_p80=ms, bytes=nbytes, flops=0,
                         gbps=nbytes / (ms * 1e-3) / 1e9, tflops=None,
                         frac_roofline=nbytes / (ms * 1e-3) / 3e12,
                         speedup_vs_ref=2.0 / ms, speedup_vs_compiled=1.5 / ms))
    meta = dict(device="GPU", device_type="cuda", date="d", git_commit="c", torch="t",
                triton="tr", cuda="cu", cudnn=1, timing="CUDA events", compile="dynamic shapes")
    ceilings = dict(copy_gbps=3000.0, matmul_tflops=dict(bf16=700.0, fp16=700.0, fp32=50.0,
                                                         tf32=350.0))
    return dict(meta=meta, ceilings=ceilings, results=rows)


def test_markdown_reports_share_of_copy_bandwidth_for_large_memory_bound_cases():
    text = report.markdown(_gpu_like_payload())
    assert "## Memory-bound ops: achieved share of measured copy bandwidth" in text
    # 2 GiB in 0.8 ms = 2684 GB/s = 89% of 3000 GB/s
    assert "| bias_act | fp16 | fwd | cuda | 1 | 89% | 89% |" in text
    assert "CPU (not comparable)" not in text


def _png_pixels(path):
    """The chart as an (height, width, 3) array; fails unless the file is a PNG."""
    import numpy as np
    from PIL import Image
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _colour_mask(pixels, colour):
    from PIL import ImageColor
    return (pixels == ImageColor.getrgb(colour)).all(axis=-1)


def _speedup_payload(speedups, cases=("c",)):
    """Op rows for plot_ops only: each implementation's speed-up, the same in every case; None
    for an implementation that could not run here."""
    rows = [dict(case=case, shape_set="s", batch=1, dtype="fp16", mode="fwd", impl=impl,
                 status="ok" if value is not None else "unavailable: not here",
                 speedup_vs_ref=value)
            for case in cases for impl, value in speedups.items()]
    meta = dict(device="GPU", device_type="cuda", torch="t", triton="tr", git_commit="c")
    return dict(meta=meta, ceilings={}, results=rows)


def test_plot_draws_speedup_bars_as_long_as_the_speedups_in_each_colour(tmp_path):
    """Pillow draws the chart (matplotlib was optional, and missing where the benchmarks ran):
    a bar per fast implementation, longer for a larger speed-up (ref+compile 1.33x, triton 2x,
    cuda 2.5x: the bars grow from 1x, on a log axis up to 4x)."""
    from benchmarks import plot
    note = plot.plot_ops(_gpu_like_payload(), tmp_path / "ops.png")
    assert note == f"wrote {tmp_path / 'ops.png'}"
    pixels = _png_pixels(tmp_path / "ops.png")
    height, width, _ = pixels.shape
    assert 600 <= width <= plot.MAX_W and 250 <= height <= 2000
    assert _colour_mask(pixels, "white").mean() > 0.5  # a white page, mostly
    assert _colour_mask(pixels, "black").sum() > 1000  # text, frame and the 1x line
    counts = [_colour_mask(pixels, plot.COLORS[impl]).sum() for impl in plot.FAST_IMPLS]
    assert 300 < counts[0] < counts[1] < counts[2], counts
    # log axis: log2(2.5) / log2(2) of the triton bar, the legend's square aside
    legend = 13 * 13
    assert (counts[2] - legend) / (counts[1] - legend) == pytest.approx(1.32, rel=0.1)


def test_plot_bars_go_down_for_slower_and_leave_out_what_did_not_run(tmp_path):
    from benchmarks import plot
    payload = _speedup_payload({"ref": 1.0, "ref+compile": None, "triton": 4.0, "cuda": 0.25})
    assert plot.plot_ops(payload, tmp_path / "ops.png").startswith("wrote")
    pixels = _png_pixels(tmp_path / "ops.png")
    faster_rows = _colour_mask(pixels, plot.COLORS["triton"]).any(axis=1).nonzero()[0]
    slower_rows = _colour_mask(pixels, plot.COLORS["cuda"]).any(axis=1).nonzero()[0]
    assert slower_rows.max() > faster_rows.max() + 50  # below the 1x line
    # no bar and no legend entry: at most a few anti-aliased pixels of text in that grey
    assert _colour_mask(pixels, plot.COLORS["ref+compile"]).sum() < 100
    payload = _speedup_payload({"ref": 1.0, "triton": None, "cuda": float("nan")})
    assert plot.plot_ops(payload, tmp_path / "none.png").startswith("wrote")
    pixels = _png_pixels(tmp_path / "none.png")
    assert not _colour_mask(pixels, plot.COLORS["triton"]).any()
    assert not _colour_mask(pixels, plot.COLORS["cuda"]).any()


def test_plot_bounds_the_width_for_many_cases_and_reaches_speedups_far_from_1x(tmp_path):
    from benchmarks import plot
    cases = [f"sweep.case{i}" for i in range(400)]
    payload = _speedup_payload({"triton": 3.0, "cuda": 1.0}, cases)
    payload["results"] += _speedup_payload({"triton": 1e-6, "cuda": 1e6})["results"]
    for row in payload["results"][-2:]:
        row["batch"] = 2  # a panel of its own
    assert plot.plot_ops(payload, tmp_path / "ops.png").startswith("wrote")
    pixels = _png_pixels(tmp_path / "ops.png")
    assert pixels.shape[1] == plot.MAX_W and pixels.shape[0] < 1500
    assert _colour_mask(pixels, plot.COLORS["triton"]).sum() > 400 * 2
    assert _colour_mask(pixels, plot.COLORS["cuda"]).sum() > 400 * 2  # 1x: still a sliver


def test_train_step_chart_draws_bars_as_tall_as_the_images_per_second(tmp_path):
    from benchmarks import plot
    rows = [_step_row("ref", "eager", 6.0), _step_row("ref", "compiled", 4.0),
            dict(_step_row("triton", "eager", 1.0), status="error: boom"),
            _step_row("cuda", "compiled", 2.0)]
    meta = dict(device="GPU", device_type="cuda")
    note = plot.plot_train_step(dict(meta=meta, results=rows), tmp_path / "train_step.png")
    assert note == f"wrote {tmp_path / 'train_step.png'}"
    bars = _colour_mask(_png_pixels(tmp_path / "train_step.png"), plot.STEP_COLOR)
    columns = bars.sum(axis=0)
    edges = (columns > 0).astype(int)
    starts = (edges[1:] > edges[:-1]).nonzero()[0] + 1
    heights = [columns[start + 2] for start in starts]
    assert len(heights) == 3  # the failed setup has no bar
    assert heights[1] / heights[0] == pytest.approx(1.5, rel=0.05)
    assert heights[2] / heights[0] == pytest.approx(3.0, rel=0.05)


def test_plot_writes_no_png_without_a_successful_measurement(tmp_path):
    from benchmarks import plot
    payload = _speedup_payload({"ref": None, "triton": None})
    assert plot.plot_ops(payload, tmp_path / "ops.png") == \
        "no PNG chart: no successful measurements"
    steps = dict(meta=dict(device="GPU"),
                 results=[dict(_step_row("ref", "eager", 6.0), status="error: boom")])
    assert plot.plot_train_step(steps, tmp_path / "train_step.png") == \
        "no PNG chart: no successful training-step measurement"
    assert list(tmp_path.iterdir()) == []


def test_gpu_check_script_runs_its_steps_independently_and_collects_outputs(tmp_path):
    import shutil
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils timeout")
    out, results = tmp_path / "out", tmp_path / "results" / "cpu-test"
    env = dict(os.environ, OUT=str(out), RESULTS_DIR=str(results), PYTHON=sys.executable,
               GPU_CHECK_SECONDS="200", TRITON_INTERPRET="1",
               BENCH_ARGS="--quick --ops bias_act --backends ref --no-ceilings",
               TRAIN_ARGS="--quick --cfg no-such-preset")  # argparse: exit 2
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "bench", "train"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    summary = (out / "summary.txt").read_text()
    assert "bench: exit 0" in summary
    # the train step fails (bad preset) without stopping the script, and the status says so
    assert "train: exit 0" not in summary and result.returncode != 0
    assert (out / "ops.md").read_text().startswith("# batikfast op benchmarks")
    assert (out / "results.tar.gz").stat().st_size > 0
    assert "step bench: exit 0" in (out / "gpu_check.log").read_text()
    assert "CPU run, not judged" in (out / "targets.md").read_text()
    assert len(list(out.iterdir())) <= 9


def test_double_backward_mode_times_nonlinear_ops_and_says_linear_ones_have_none(tmp_path):
    from benchmarks import run as bench_run
    payload = bench_run.main(["--quick", "--modes", "fwd+bwd2", "--ops", "bias_act", "upfirdn2d",
                              "--backends", "ref", "--no-ceilings", "--outdir", str(tmp_path)])
    status = {row["case"]: row["status"] for row in payload["results"]}
    assert status["tiny.act"] == "ok"
    assert status["tiny.up2"].startswith("n/a: upfirdn2d is linear")
    act = [r for r in payload["results"] if r["case"] == "tiny.act"][0]
    assert act["bytes"] is None and act["gbps"] is None  # traffic not counted for this mode


def test_relative_error_is_not_inflated_by_an_all_zero_reference_gradient():
    import torch
    from benchmarks.common import relative_error
    want = [torch.tensor([100.0, -50.0]), torch.zeros(3)]
    got = [torch.tensor([100.0, -50.01]), torch.full((3,), 1e-5)]
    assert relative_error(got, want) == pytest.approx(1e-4, rel=1e-3)
    assert relative_error([torch.tensor([2.0])], [torch.tensor([1.0])]) == pytest.approx(1.0)


def test_train_step_halves_the_round_when_the_whole_batch_runs_out_of_gpu_memory(monkeypatch):
    import torch
    from benchmarks import train_step
    tried = []

    def fake_measure(args, device, backend, compile_mode, precision, workdir, batch_gpu=None):
        tried.append(batch_gpu)
        if batch_gpu is None or batch_gpu > 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return dict(status="ok", sec_per_kimg=1.0, images_per_s=1000.0, steps=32,
                    warmup_steps=16, warmup_s=1.0, peak_gpu_mem_gib=70.0)
    monkeypatch.setattr(train_step, "measure_setup", fake_measure)
    args = train_step.parse_args(["--backends", "ref", "--compile-modes", "eager",
                                  "--precision", "mixed", "--batch", "64"])
    (row,) = train_step.run(args, torch.device("cpu"))
    assert tried == [None, 32, 16]
    assert row["status"] == "ok" and "retried with 16" in row["note"]


def test_networks_report_compares_each_setup_with_the_reference_of_its_precision():
    from benchmarks import networks
    def row(backend, compile_mode, ms):
        return dict(network="G", mode="fwd+bwd", precision="mixed", backend=backend,
                    compile=compile_mode, cfg="paper256", batch=64, status="ok", ms=ms,
                    ms_p20=ms, ms_p80=ms, images_per_s=64 / (ms * 1e-3))
    rows = [row("ref", "eager", 100.0), row("ref", "compiled", 80.0), row("cuda", "eager", 50.0)]
    networks._add_speedups(rows)
    assert rows[2]["speedup_vs_ref"] == pytest.approx(2.0)
    assert rows[2]["speedup_vs_compiled"] == pytest.approx(1.6)
    meta = dict(cfg="paper256", batch=64, device="X", device_type="cuda", date="d",
                git_commit="c", torch="t", triton="tr", cuda="cu", timing="CUDA events")
    text = networks.markdown(dict(meta=meta, results=rows))
    assert "| G | fwd+bwd | mixed | cuda | eager | 50.0 [50.0-50.0] | 1280 | 2.00x | 1.60x |" in text


def test_networks_benchmark_says_why_a_backend_cannot_run():
    import torch
    from batikfast import backends
    from benchmarks import networks
    cpu = torch.device("cpu")
    why = backends.unavailable_reason("cuda", cpu, torch.float32)
    rows = []
    networks.run(networks.parse_args(["--quick", "--backends", "cuda"]), cpu, None, rows)
    assert why and rows and all(r["status"] == f"unavailable: {why}" for r in rows)


def test_pytest_benchmark_entries_name_existing_paper256_cases():
    pytest.importorskip("pytest_benchmark")
    from benchmarks.test_bench_ops import GPU_CASES
    names = {c.name for c in shapes.generator_cases() + shapes.discriminator_cases()}
    assert set(GPU_CASES) <= names
    assert {c.op for c in shapes.cases_for("paper256-g") + shapes.cases_for("paper256-d")
            if c.name in GPU_CASES} == set(opcases.OPS)


def test_compiled_reference_reuses_one_dynamic_graph_per_op_variant():
    import torch
    opcases._compiled_forwards.clear()
    acts = [c for c in shapes.generator_cases() if c.op == "bias_act"][:3]
    cpu = torch.device("cpu")
    for case in acts:  # torch.compile is lazy: nothing compiles until a call
        inputs = opcases.make_inputs(case, 1, torch.float32, cpu, "fwd")
        opcases.make_callable(case, inputs, "ref", "fwd", compiled=True, dynamic=True)
    assert len(opcases._compiled_forwards) == 1
    for case in acts:
        inputs = opcases.make_inputs(case, 1, torch.float32, cpu, "fwd")
        opcases.make_callable(case, inputs, "ref", "fwd", compiled=True, dynamic=False)
    assert len(opcases._compiled_forwards) == 1 + len(acts)
    opcases._compiled_forwards.clear()


def test_train_step_measures_the_baselines_and_the_likely_fastest_setup_first():
    """Under a time budget the first setups are the ones measured."""
    from benchmarks import train_step

    args = train_step.parse_args(["--precision", "mixed", "fp32"])
    order = train_step.measurement_order(args)
    assert order[:3] == [("mixed", "eager", "ref"), ("mixed", "compiled", "cuda"),
                         ("mixed", "compiled", "ref")]
    assert len(order) == len(set(order)) == 2 * 3 * 3
    assert [precision for precision, _, _ in order] == ["mixed"] * 9 + ["fp32"] * 9


def test_no_tf32_runs_fp32_convolutions_without_tf32_and_says_so(tmp_path, monkeypatch):
    from benchmarks import run as bench_run

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # restored after the test
    payload = bench_run.main(["--quick", "--ops", "bias_act", "--backends", "ref",
                              "--no-ceilings", "--no-tf32", "--outdir", str(tmp_path)])
    assert payload["meta"]["tf32_cudnn"] is False
    assert "full fp32, TF32 off" in (tmp_path / "ops.md").read_text()


def _gpu_payload(rows):
    return dict(meta=dict(device_type="cuda", device="NVIDIA H100 80GB HBM3", torch="2.11",
                          triton="3.6", date="2026-11-23", git_commit="abc"), results=rows)


def test_targets_are_judged_on_gpu_results_only_and_say_met_or_missed(tmp_path, quick_run):
    from benchmarks import targets
    big = 128 << 20

    def op_row(op, impl, share, nbytes=big, case="c"):
        return dict(op=op, case=case, shape_set="paper256-g", batch=64, dtype="fp16",
                    mode="fwd", impl=impl, status="ok", bytes=nbytes, frac_roofline=share,
                    ms=1.0)

    ops = _gpu_payload([
        op_row("bias_act", "triton", 0.85), op_row("bias_act", "triton", 0.81, case="d"),
        op_row("bias_act", "triton", 0.10, nbytes=1 << 20, case="small"),  # launch-bound
        op_row("upfirdn2d", "cuda", 0.70),
        dict(op_row("modulated_conv2d", "ref", None), ms=3.0),
        dict(op_row("modulated_conv2d", "triton", None), ms=1.5),
        dict(op_row("modulated_conv2d", "cuda", None), ms=2.5)])
    bandwidth = {(e["op"], e.get("impl")): e for e in targets.memory_bound(ops)}
    assert bandwidth["bias_act", "triton"]["verdict"] == "met"
    assert bandwidth["bias_act", "triton"]["cases"] == 2  # the 1 MiB case is not judged
    assert bandwidth["bias_act", "triton"]["median"] == pytest.approx(0.83)  # of 2: their mean
    assert bandwidth["upfirdn2d", "cuda"]["verdict"] == "missed"
    assert bandwidth["diffusion_noise", None]["verdict"].startswith("no case")
    modconv = {e["impl"]: e for e in targets.fused_modconv(ops)}
    assert modconv["triton"]["speedup"] == 2.0 and modconv["triton"]["verdict"] == "met"
    assert modconv["cuda"]["verdict"] == "missed"

    def step_row(backend, compiled, vs_eager, vs_compiled):
        return dict(config=f"{backend} {compiled} mixed", backend=backend, precision="mixed",
                    status="ok", images_per_s=100.0, speedup_vs_ref=vs_eager,
                    speedup_vs_compiled=vs_compiled)

    step = _gpu_payload([step_row("ref", "eager", 1.0, 0.5), step_row("cuda", "compiled", 1.6, 1.1),
                         step_row("triton", "compiled", 1.6, 0.9)])
    verdicts = {e["setup"]: e["verdict"] for e in targets.training_step(step)}
    assert verdicts == {"cuda compiled mixed": "met", "triton compiled mixed": "missed"}

    # the CPU quick run is never judged, and a folder without train_step.json says so
    outdir, _, _ = quick_run
    text = targets.main([str(outdir), "--out", str(tmp_path / "targets.md")])
    assert "CPU run, not judged" in text and "| not measured |" in text
    assert " met " not in text and "missed" not in text


def test_channels_last_option_feeds_nhwc_activations_and_says_so(tmp_path):
    case = next(c for c in shapes.cases_for("tiny") if c.op == "modulated_conv2d")
    inputs = opcases.make_inputs(case, 2, torch.float32, torch.device("cpu"), "fwd+bwd",
                                 channels_last=True)
    x = inputs["x"]
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert x.is_leaf and x.requires_grad
    plain = opcases.make_inputs(case, 2, torch.float32, torch.device("cpu"), "fwd")
    assert plain["x"].is_contiguous()
    _run([str(REPO / "benchmarks" / "run.py"), "--quick", "--ops", "modulated_conv2d",
          "--backends", "ref", "--channels-last", "--no-ceilings", "--outdir", str(tmp_path)],
         tmp_path)
    payload = json.loads((tmp_path / "ops.json").read_text())
    assert payload["meta"]["channels_last"] is True
    assert all(r["status"] == "ok" for r in payload["results"])
    assert "channels-last (NHWC)" in (tmp_path / "ops.md").read_text()


def test_a_selection_that_names_no_case_is_an_error_that_writes_nothing(tmp_path, capsys):
    from benchmarks import run
    with pytest.raises(SystemExit):
        run.main(["--quick", "--cases", "G.b265.*", "--outdir", str(tmp_path / "out")])
    assert "no case of the shape sets ['tiny'] matches" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # an earlier run's ops.json would stay intact
    args = run.parse_args(["--quick", "--ops", "upfirdn2d", "--cases", "tiny.*"])
    assert args.cases == ["tiny.*"]


@pytest.mark.parametrize("script", ["run", "networks", "train_step", "peer_nvidia",
                                    "peer_networks", "codegen", "host_overhead"])
def test_an_unwritable_outdir_stops_the_script_before_it_measures_anything(
        script, tmp_path, monkeypatch):
    """The folder was created only after the last measurement: a path under a file (or a
    read-only mount) threw away a whole GPU run with a traceback at the very end."""
    import importlib
    module = importlib.import_module(f"benchmarks.{script}")

    def measured(*args, **kwargs):
        raise AssertionError("measured before the output folder was checked")

    for name in ("run", "triton_codegen", "Nvidia", "NvidiaNetworks"):  # what they measure with
        if hasattr(module, name):
            monkeypatch.setattr(module, name, measured)
    if script == "run":
        monkeypatch.setattr(module.Runner, "run", measured)
        monkeypatch.setattr(module.ceilings_mod, "measure_ceilings", measured)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = {"run": ["--quick", "--ops", "bias_act", "--backends", "ref"],
            "networks": ["--quick"], "train_step": ["--quick"],
            "peer_nvidia": ["--quick", "--nvidia-path", str(tmp_path)],
            "peer_networks": ["--quick", "--nvidia-path", str(tmp_path)],
            "codegen": ["--shapes", "tiny", "--no-cuda"], "host_overhead": []}[script]
    with pytest.raises(SystemExit) as stopped:
        module.main(argv + ["--outdir", str(blocker / "results")])
    assert "--outdir" in str(stopped.value.code) and "cannot be created" in str(stopped.value.code)


def test_gpu_check_script_refuses_an_unknown_step_before_doing_anything(tmp_path):
    """A mistyped step ("bnech") matched no step: the script ran nothing, packed an empty
    results folder and exited 0, which reads as success on a rented GPU machine."""
    import shutil
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), RESULTS_DIR=str(tmp_path / "results"),
               PYTHON=sys.executable)
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "bench", "bnech"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown step 'bnech'" in result.stderr and "codegen" in result.stderr
    assert not out.exists() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("script, argv", [
    ("run", ["--quick", "--budget", "-5"]),  # every measurement skipped, ops.json overwritten
    ("run", ["--quick", "--rep-ms", "0"]),
    ("run", ["--quick", "--device", "cdua"]),  # was torch's traceback
    ("networks", ["--quick", "--batch", "0"]),  # was silently replaced by the default batch
    ("networks", ["--quick", "--batch", "-2"]),  # every setup ran into an error
    ("networks", ["--quick", "--cfg", "no-such-preset"]),  # likewise
    ("networks", ["--quick", "--budget", "-1"]),
    ("train_step", ["--quick", "--cycles", "0"]),  # was silently 2
    ("train_step", ["--quick", "--batch-gpu", "0"]),
    ("train_step", ["--quick", "--warmup-steps", "-1"]),
    ("peer_nvidia", ["--quick", "--nvidia-path", ".", "--batch", "0"]),
    ("peer_networks", ["--quick", "--nvidia-path", ".", "--batch", "0"]),
    ("peer_networks", ["--quick", "--nvidia-path", ".", "--budget", "0"]),
    ("peer_networks", ["--quick", "--nvidia-path", ".", "--cfg", "no-such-preset"]),
    # tiny's minibatch-std group of 4 does not divide 6: every D row was an error
    ("peer_networks", ["--quick", "--nvidia-path", ".", "--batch", "4", "6"]),
    ("peer_networks", ["--quick", "--nvidia-path", ".", "--precision", "bf16"]),  # not theirs
    ("peer_networks", ["--quick", "--nvidia-path", ".", "--measure", "G:fwd", "G"]),
    ("codegen", ["--batch", "0"]),
    ("host_overhead", ["--calls", "0"]),
    ("host_overhead", ["--rounds", "-1"]),
])
def test_a_batch_budget_repeat_time_or_device_that_cannot_work_is_an_argument_error(
        script, argv, capsys):
    import importlib
    module = importlib.import_module(f"benchmarks.{script}")
    with pytest.raises(SystemExit) as stopped:
        module.parse_args(argv)
    assert stopped.value.code == 2
    assert "error: " in capsys.readouterr().err


def test_plot_says_which_files_it_cannot_redraw_and_still_redraws_the_others(tmp_path, capsys):
    """A missing file, a file that is not JSON, or a JSON of another kind (codegen.json,
    gpu_tests.json) gave a traceback that stopped the files after it; networks.json was taken
    for a training-step result (a KeyError when its chart was drawn)."""
    from benchmarks import plot
    good = tmp_path / "ops.json"
    good.write_text(json.dumps(_gpu_like_payload()))
    not_json = tmp_path / "notes.json"
    not_json.write_text("not json")
    other = tmp_path / "codegen.json"
    other.write_text(json.dumps({"environment": {}, "triton": []}))
    networks = tmp_path / "networks.json"
    networks.write_text(json.dumps(dict(meta=dict(device="GPU"), results=[
        dict(network="G", mode="fwd", backend="ref", compile="eager", precision="fp32",
             status="ok", ms=1.0, images_per_s=10.0)])))
    status = plot.main([str(tmp_path / "missing.json"), str(not_json), str(other),
                        str(networks), str(good)])
    assert status == 1
    captured = capsys.readouterr()
    for bad in ("missing.json", "notes.json", "codegen.json"):
        assert bad in captured.err
    assert "no chart for the whole-network timings" in captured.out
    assert (tmp_path / "ops.md").read_text().startswith("# batikfast op benchmarks: GPU")
    assert plot.main([str(good)]) == 0


def test_an_interrupted_op_run_keeps_what_the_case_in_flight_had_measured(tmp_path, monkeypatch):
    """Rows were kept per finished case: Ctrl-C (or gpu_check.sh's SIGINT) during a slow
    implementation dropped the ones of the same case already measured."""
    from benchmarks import run
    measure = run.Runner.measure

    def interrupted_on_triton(self, row, case, inputs, impl, mode):
        if impl == "triton":
            raise KeyboardInterrupt
        return measure(self, row, case, inputs, impl, mode)

    monkeypatch.setattr(run.Runner, "measure", interrupted_on_triton)
    payload = run.main(["--quick", "--ops", "bias_act", "--modes", "fwd", "--backends", "ref",
                        "triton", "--no-ceilings", "--outdir", str(tmp_path)])
    assert payload["meta"]["interrupted"] is True
    statuses = [(row["impl"], row["status"]) for row in payload["results"]]
    assert statuses == [("ref", "ok"), ("triton", "interrupted")]
    saved = json.loads((tmp_path / "ops.json").read_text())
    assert [row["status"] for row in saved["results"]] == ["ok", "interrupted"]
    # a shell, a CI job and gpu_check.sh see an interrupted run as one (it exited 0)
    assert run.exit_status(payload) == 130
    assert "interrupted (Ctrl-C or a time limit)" in (tmp_path / "ops.md").read_text()


def test_networks_benchmark_prints_the_setups_it_could_not_run_or_skipped(capsys):
    """Unavailable and budget-skipped setups were written to the JSON but never printed: a run
    asking for the CUDA backend on a machine without it printed nothing at all for it."""
    import torch
    from benchmarks import networks
    networks.run(networks.parse_args(["--quick", "--backends", "cuda"]), torch.device("cpu"),
                 None, [])
    out = capsys.readouterr().out
    assert "G fwd cuda eager fp32" in out and "unavailable: the CUDA extension needs" in out
    rows = []
    args = networks.parse_args(["--quick", "--budget", "1e-9", "--networks", "D"])
    networks.run(args, torch.device("cpu"), None, rows)
    out = capsys.readouterr().out
    assert rows and all(r["status"] == "skipped: time budget" for r in rows)
    assert out.count("skipped: time budget") == len(rows)


def test_cpu_results_are_never_written_into_a_folder_of_gpu_results(tmp_path, monkeypatch):
    """A CPU check run given a GPU results folder (--outdir benchmarks/results/nvidia-...)
    replaced its ops.json with CPU timings beside GPU train_step.json: one folder, two devices,
    read by targets.py and RESULTS.md as one. Now refused before measuring; rerunning on the
    same device into its own folder still works."""
    from benchmarks import run
    gpu_folder = tmp_path / "nvidia-h100-80gb-hbm3-2026-01-01"
    gpu_folder.mkdir()
    gpu_ops = json.dumps(_gpu_like_payload())
    (gpu_folder / "ops.json").write_text(gpu_ops)
    argv = ["--quick", "--ops", "bias_act", "--backends", "ref", "--modes", "fwd",
            "--no-ceilings", "--device", "cpu", "--outdir"]
    with pytest.raises(SystemExit) as stopped:
        run.main(argv + [str(gpu_folder)])
    assert "already holds ops.json measured on GPU" in str(stopped.value.code)
    assert (gpu_folder / "ops.json").read_text() == gpu_ops
    cpu_folder = tmp_path / "cpu"
    for _ in range(2):
        assert run.main(argv + [str(cpu_folder)])["meta"]["device_type"] == "cpu"


def test_train_step_first_line_says_cpu_timings_are_not_comparable(tmp_path, monkeypatch,
                                                                  capsys):
    """run.py and networks.py open with the device, the timing label and the versions;
    train_step.py printed only the device, so a CPU training-step figure on the terminal
    carried no "not comparable" label."""
    from benchmarks import train_step
    monkeypatch.setattr(train_step, "run", lambda args, device, rows: rows)
    payload = train_step.main(["--quick", "--device", "cpu", "--outdir", str(tmp_path)])
    first = capsys.readouterr().out.splitlines()[0]
    assert "CPU (not comparable)" in first and payload["meta"]["timing"] in first
    for key in ("torch", "triton", "git_commit"):
        assert str(payload["meta"][key]) in first


def test_train_step_report_says_a_quick_run_times_steps_not_whole_cycles(tmp_path, monkeypatch):
    """train_step.md said "timed over whole 16-step cycles" for --quick runs, which time two
    steps after one warm-up step."""
    from benchmarks import train_step
    monkeypatch.setattr(train_step, "run", lambda args, device, rows: rows)
    quick = train_step.main(["--quick", "--device", "cpu", "--outdir", str(tmp_path)])
    assert "whole 16-step cycles" not in quick["meta"]["what"]
    assert "--quick: 2 steps after 1 warm-up" in (tmp_path / "train_step.md").read_text()
    full = train_step.main(["--cycles", "3", "--device", "cpu", "--outdir", str(tmp_path)])
    assert "3 whole 16-step cycles" in full["meta"]["what"]


def test_op_run_on_the_cpu_at_full_shapes_says_first_that_triton_is_interpreted(
        tmp_path, monkeypatch, capsys):
    """`python benchmarks/run.py` on a machine without a GPU started the paper256 shapes with
    interpreted Triton and printed nothing for the hours the first case took."""
    from benchmarks import run
    monkeypatch.setattr(run.Runner, "run", lambda self: [])
    argv = ["--device", "cpu", "--ops", "bias_act", "--no-ceilings", "--no-compile"]
    run.main(argv + ["--outdir", str(tmp_path / "full")])
    out = capsys.readouterr().out
    assert "Triton runs interpreted" in out and "--quick" in out
    run.main(argv + ["--quick", "--outdir", str(tmp_path / "quick")])
    run.main(argv + ["--backends", "ref", "--outdir", str(tmp_path / "ref")])
    assert "interpreted" not in capsys.readouterr().out


def test_peer_report_marks_cases_the_budget_skipped(capsys):
    """Cases skipped by --budget were neither printed nor marked: their cells were blank, and
    with every case skipped the table had no implementation column (a broken markdown table)."""
    from benchmarks import peer_nvidia
    meta = dict(device="GPU", device_type="cuda", date="d", git_commit="c", torch="t",
                triton="tr", cuda="cu", timing="CUDA events", budget_s=5.0,
                nvidia_flavour="stylegan3", nvidia_path="p", nvidia_paths={})
    base = dict(op="bias_act", shape_set="tiny", batch=2, dtype="fp32", mode="fwd",
                shape="[2,8,8,8]", bytes=1, flops=0)
    measured = [dict(base, case="tiny.act", impl="nvidia-cuda", status="ok", ms=1.0, ms_p20=1.0,
                     ms_p80=1.0),
                dict(base, case="tiny.act", impl="batikfast-cuda", status="ok", ms=0.5,
                     ms_p20=0.5, ms_p80=0.5, speedup_vs_nvidia=2.0)]
    skipped = dict(base, case="tiny.up2", impl="all", status="skipped: time budget")
    text = peer_nvidia.markdown(dict(meta=meta, results=measured + [skipped]))
    assert "| tiny.up2 | [2,8,8,8] | skipped | skipped |" in text
    assert "1 case(s) skipped: time budget of 5.0 s reached" in text
    text = peer_nvidia.markdown(dict(meta=meta, results=[skipped]))
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1  # header, rule and rows agree
    args = peer_nvidia.parse_args(["--nvidia-path", ".", "--quick", "--ops", "bias_act",
                                   "--budget", "1e-9"])
    rows = peer_nvidia.run(args, None, torch.device("cpu"), None, [])
    out = capsys.readouterr().out
    assert rows and out.count("skipped: time budget") == len(rows)


def test_an_interrupted_op_run_does_not_go_on_to_the_training_step(tmp_path, monkeypatch, capsys):
    """After Ctrl-C the op results were written and then `--train-step` started the whole
    training-step benchmark anyway."""
    from benchmarks import run, train_step

    def interrupted(self):
        raise KeyboardInterrupt

    def started(argv=None):
        raise AssertionError("the training step started after an interrupt")

    monkeypatch.setattr(run.Runner, "run", interrupted)
    monkeypatch.setattr(train_step, "main", started)
    payload = run.main(["--quick", "--ops", "bias_act", "--backends", "ref", "--no-ceilings",
                        "--train-step", "--outdir", str(tmp_path)])
    assert payload["meta"]["interrupted"] is True
    assert "--train-step not run" in capsys.readouterr().out


def test_gpu_check_script_says_at_the_top_when_no_gpu_is_visible(tmp_path):
    """On a machine without a GPU the script ran every step on the CPU and only a "GPU None"
    in the version block told; the summary read like a GPU run's."""
    import shutil
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils timeout")
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU message")
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), RESULTS_DIR=str(tmp_path / "results" / "cpu-test"),
               PYTHON=sys.executable, TRITON_INTERPRET="1",
               BENCH_ARGS="--quick --ops bias_act --backends ref --modes fwd --no-ceilings")
    subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "bench"], cwd=tmp_path,
                   env=env, capture_output=True, text=True, timeout=300)
    assert "WARNING: no GPU visible to torch" in (out / "gpu_check.log").read_text()
    assert (out / "summary.txt").read_text().startswith("no GPU visible")


def test_nvidia_code_imports_on_a_machine_without_requests(monkeypatch):
    """NVIDIA's dnnlib imports requests at the top (for URL downloads the benchmark never
    makes); the GPU machine has no registry to install it from, and the peer step failed."""
    from benchmarks import peer_nvidia
    monkeypatch.setitem(sys.modules, "requests", None)  # import requests -> ImportError
    peer_nvidia._shim_requests()
    import requests
    with pytest.raises(AttributeError, match="requests is not installed"):
        requests.Session()


def _fake_nvidia_checkout(root):
    """The modules of NVIDIA's layout that peer_nvidia.py imports, each doing nothing."""
    for module in ("torch_utils/ops/bias_act.py", "torch_utils/ops/upfirdn2d.py",
                   "torch_utils/ops/conv2d_resample.py", "training/networks_stylegan2.py"):
        (root / module).parent.mkdir(parents=True, exist_ok=True)
        (root / module).write_text("def _init():\n    return False\n\n"
                                   "def conv2d_resample():\n    pass\n\n"
                                   "def modulated_conv2d():\n    pass\n")
    for package in ("torch_utils", "torch_utils/ops", "training"):
        (root / package / "__init__.py").write_text("")
    return root


def test_peer_prepare_only_says_which_path_each_nvidia_op_will_take(tmp_path):
    checkout = _fake_nvidia_checkout(tmp_path / "stylegan3")
    stdout = _run([str(REPO / "benchmarks" / "peer_nvidia.py"), "--nvidia-path", str(checkout),
                   "--prepare", "--device", "cpu", "--outdir", str(tmp_path / "results")],
                  tmp_path)
    assert "NVIDIA bias_act: ref (CPU tensors" in stdout
    assert "NVIDIA upfirdn2d: ref (CPU tensors" in stdout
    assert not (tmp_path / "results").exists()  # nothing measured, nothing written


def test_peer_prepare_fails_on_a_gpu_when_a_plugin_did_not_build(monkeypatch):
    """gpu_check.sh marks the plugins ready only on success: a failed build must not pass."""
    from benchmarks import common, peer_nvidia

    class PartlyBuilt:
        flavour = "stylegan3"
        paths = {"bias_act": ("cuda", "CUDA plugin loaded"),
                 "upfirdn2d": ("ref", "plugin build failed: RuntimeError: nvcc")}

        def __init__(self, path, device):
            pass
    monkeypatch.setattr(peer_nvidia, "Nvidia", PartlyBuilt)
    monkeypatch.setattr(common, "chosen_device", lambda name: torch.device("cuda"))
    with pytest.raises(SystemExit, match="not all usable"):
        peer_nvidia.main(["--nvidia-path", ".", "--prepare"])
    PartlyBuilt.paths["upfirdn2d"] = ("cuda", "CUDA plugin loaded")
    assert peer_nvidia.main(["--nvidia-path", ".", "--prepare"])["nvidia_flavour"] == "stylegan3"


def _gpu_check_with_a_recording_python(tmp_path, steps, extensions_dir):
    """gpu_check.sh run with a stand-in for python that only records how it is called."""
    import shutil
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils timeout")
    calls = tmp_path / "calls.txt"
    python = tmp_path / "python"
    python.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{calls}"\n')
    python.chmod(0o755)
    checkout = _fake_nvidia_checkout(tmp_path / "stylegan3")
    env = dict(os.environ, OUT=str(tmp_path / "out"), RESULTS_DIR=str(tmp_path / "results"),
               PYTHON=str(python), NVIDIA_PATH=str(checkout),
               TORCH_EXTENSIONS_DIR=str(extensions_dir))
    subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *steps], cwd=tmp_path,
                   env=env, capture_output=True, text=True, timeout=120)
    return [line for line in calls.read_text().splitlines() if "peer_nvidia.py" in line]


def test_gpu_check_build_compiles_nvidias_plugins_so_the_peer_step_measures_sooner(tmp_path):
    """With a NVIDIA checkout, the build step compiles their plugins; a peer step after it, in
    the same call or the next, keeps 40 s for loading them instead of 150 s for compiling."""
    extensions = tmp_path / "torch_extensions"
    prepare, peer = _gpu_check_with_a_recording_python(tmp_path, ["build", "peer"], extensions)
    assert prepare.endswith("--prepare") and "--budget" not in prepare
    assert "--budget 260 " in peer  # min(300 s, time left - networks' share) - 40 s
    assert (extensions / "nvidia_plugins.ready").exists()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    [peer] = _gpu_check_with_a_recording_python(fresh, ["peer"], fresh / "torch_extensions")
    assert "--budget 150 " in peer  # their plugins still to compile


def test_profile_top_ranks_cpu_operators_by_self_time_per_step(tmp_path):
    import gzip
    from benchmarks import profiling
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def two_steps():
        for _ in range(2):
            torch.mm(a, b).add_(1.0)
    profile = profiling.profile_top(two_steps, torch.device("cpu"), steps=2,
                                    trace_path=tmp_path / "trace.json.gz")
    assert profile["unit"] == "CPU operator"
    top = {event["name"]: event for event in profile["top"]}
    assert top["aten::mm"]["calls_per_step"] == 1 and top["aten::add_"]["calls_per_step"] == 1
    times = [event["ms_per_step"] for event in profile["top"]]
    assert times == sorted(times, reverse=True) and sum(times) <= profile["ms_per_step"] + 1e-9
    assert abs(sum(e["share"] for e in profile["top"]) - sum(times) / profile["ms_per_step"]) < 1e-9
    trace = json.loads(gzip.decompress((tmp_path / "trace.json.gz").read_bytes()))
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])


def test_profile_summary_on_a_gpu_counts_kernels_only_by_their_device_time():
    """On a GPU the CPU operators that launch kernels also carry device time: counting them
    too would give each kernel's time twice."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks import profiling

    def event(key, count, device_type, device_us, cpu_us=5):
        return SimpleNamespace(key=key, count=count, device_type=device_type,
                               self_device_time_total=device_us, self_cpu_time_total=cpu_us)
    averages = [event("aten::conv2d", 8, DeviceType.CPU, 4000),
                event("sm90_xmma_fprop_" + "x" * 200, 8, DeviceType.CUDA, 3000),
                event("_modulated_conv2d_fwd_kernel", 4, DeviceType.CUDA, 1000),
                event("cudaLaunchKernel", 12, DeviceType.CPU, 0)]
    profile = profiling.summarise(averages, on_gpu=True, steps=4, top=12)
    assert profile["unit"] == "GPU kernel" and profile["per_step"] == 3
    assert profile["ms_per_step"] == 1.0
    first, second = profile["top"]
    assert first["name"].startswith("sm90_xmma_fprop_") and len(first["name"]) == 90
    assert (first["calls_per_step"], first["ms_per_step"], first["share"]) == (2, 0.75, 0.75)
    assert second["name"] == "_modulated_conv2d_fwd_kernel" and second["share"] == 0.25


def test_train_step_profile_names_where_the_step_spends_its_time(tmp_path):
    from benchmarks import train_step
    payload = train_step.main(["--quick", "--device", "cpu", "--backends", "ref",
                               "--precision", "fp32", "--no-phase-breakdown", "--profile",
                               "--trace-dir", str(tmp_path / "traces"),
                               "--outdir", str(tmp_path)])
    (row,) = payload["results"]
    assert row["status"] == "ok" and row["profile"]["unit"] == "CPU operator"
    names = [event["name"] for event in row["profile"]["top"]]
    assert any("conv" in name for name in names), names
    text = (tmp_path / "train_step.md").read_text()
    assert "Where the time goes" in text and "| `aten::" in text
    assert (tmp_path / "traces" / "trace-ref-eager-fp32.json.gz").stat().st_size > 1000


def test_gpu_test_plan_splits_large_files_largest_first_and_runs_every_file():
    from benchmarks import gpu_tests
    collected = ([f"tests/test_big.py::test_case[{i}]" for i in range(100)]
                 + [f"tests/test_small.py::test_{i}" for i in range(5)]
                 + ["", "105 tests collected in 3.0s"])
    jobs = gpu_tests.plan(["tests/test_small.py", "tests/test_broken.py", "tests/test_big.py"],
                          collected, per_shard=40, max_shards=8)
    assert jobs[:3] == [("tests/test_big.py", 0, 3), ("tests/test_big.py", 1, 3),
                        ("tests/test_big.py", 2, 3)]
    # a file that did not collect still runs, to report its error
    assert set(jobs[3:]) == {("tests/test_small.py", 0, 1), ("tests/test_broken.py", 0, 1)}
    capped = gpu_tests.plan(["tests/test_big.py"], collected, per_shard=1, max_shards=8)
    assert [job for job in capped if job[0] == "tests/test_big.py"] == [
        ("tests/test_big.py", index, 8) for index in range(8)]


@pytest.mark.parametrize("log, counts, ending", [
    ("..F\nFAILED tests/test_x.py::test_a - assert 1 == 2\n1 failed, 2 passed, 4 deselected in 3.1s\n",
     {"failed": 1, "passed": 2}, "finished"),
    ("..\n!!!!!!!!!!!! KeyboardInterrupt !!!!!!!!!!!!\n2 passed in 150.02s\n", {"passed": 2}, "stopped"),
    ("...\nFatal Python error: Segmentation fault\n\nCurrent thread 0x1 (most recent call first):\n",
     {}, "crashed"),
    ("E\n1 error in 0.51s\n", {"errors": 1}, "finished"),
    ("not started: the step's time was up\n", {}, "not started"),
])
def test_gpu_test_shard_outcome_reads_pytests_closing_line(log, counts, ending):
    from benchmarks import gpu_tests
    outcome = gpu_tests.shard_outcome(log)
    assert (outcome["counts"], outcome["ending"]) == (counts, ending)


def test_gpu_test_summary_adds_up_shards_and_says_which_did_not_finish(tmp_path):
    from benchmarks import gpu_tests
    (tmp_path / "test_big.0-of-2.log").write_text(
        "F.\nFAILED tests/test_big.py::test_a[1] - boom\n1 failed, 1 passed in 9.0s\n")
    (tmp_path / "test_big.1-of-2.log").write_text(
        "...\n!!! KeyboardInterrupt !!!\n3 passed, 1 skipped in 150.0s\n")
    (tmp_path / "test_small.0-of-1.log").write_text("not started: the step's time was up\n")
    (tmp_path / "plan.txt").write_text("tests/test_big.py 0 2\n")  # not a shard log
    files = gpu_tests.summarise(tmp_path)
    assert files["test_big"]["counts"] == {"failed": 1, "passed": 4, "skipped": 1}
    assert files["test_big"]["failures"] == ["FAILED tests/test_big.py::test_a[1] - boom"]
    assert gpu_tests.summary_line("test_big", files["test_big"]) == (
        "test_big: 1 failed, 4 passed, 1 skipped (2 processes; 1 STOPPED at the time limit)")
    assert gpu_tests.summary_line("test_small", files["test_small"]) == (
        "test_small: no test result (1 process; 1 NOT STARTED)")


def test_pytest_shard_option_splits_a_file_into_disjoint_parts_that_cover_it(tmp_path):
    def collected(*extra):
        result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                                 "-p", "no:cacheprovider", "tests/test_backends.py", *extra],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return [line for line in result.stdout.splitlines() if "::" in line]
    everything = collected()
    parts = [collected("--shard", f"{index}/3") for index in range(3)]
    assert sorted(sum(parts, [])) == sorted(everything) and len(everything) > 3
    assert all(parts) and sum(map(len, parts)) == len(everything)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_backends.py",
                             "--shard", "3/3"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "--shard takes I/N with 0 <= I < N" in result.stderr


def test_host_overhead_times_both_roads_of_every_stubbed_op_and_pairs_them(tmp_path):
    """Host time per eager call: every fast op with its kernels stubbed, through the dispatcher
    and directly, forward and forward+backward; the real kernels' rows only on a GPU."""
    from benchmarks import host_overhead
    payload = host_overhead.main(["--rounds", "2", "--calls", "3", "--outdir", str(tmp_path)])
    stubbed = [row for row in payload["results"] if row["section"] == "stubbed"]
    assert {(row["mode"], row["road"]) for row in stubbed} == {
        (mode, road) for mode in ("fwd", "fwd+bwd") for road in ("dispatcher", "direct")}
    assert all(row["status"] == "ok" and row["host_us"] > 0 and row["rounds"] == 2
               for row in stubbed)
    assert {row["op"] for row in stubbed} == set(host_overhead.FAST_OPS)
    kernels = [row for row in payload["results"] if row["section"] == "kernels"]
    assert bool(kernels) == torch.cuda.is_available()
    table = (tmp_path / "host_overhead.md").read_text()
    assert table.count("| stubbed | tiny.act | triton |") == 2
    assert json.loads((tmp_path / "host_overhead.json").read_text())["meta"]["calls"] == 3
