"""What every benchmark script shares: environment, argument checks and defaults, what a
failed or impossible measurement is called, run metadata, the timer, output folders and files.

Import this module before anything imports triton: without a GPU it sets
``TRITON_INTERPRET=1`` so the Triton kernels run (slowly) in the interpreter on the CPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.textfmt import CPU_LABEL

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # Run from a checkout without installing: `python benchmarks/run.py`.
    sys.path.insert(0, str(REPO_ROOT))

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCHEMA_VERSION = 1


def default_device() -> torch.device:
    return torch.device("cuda" if HAS_GPU else "cpu")


def chosen_device(device_arg_text: str | None) -> torch.device:
    """The device of ``--device`` (checked by :func:`device_arg`), else the default."""
    return torch.device(device_arg_text) if device_arg_text else default_device()


# --------------------------------------------------------------------------- arguments
# argparse types shared by the scripts: a zero or negative batch, budget or repeat time used
# to be taken as given (or silently replaced by the default through ``args.x or default``)
# and ran every setup into an error, or skipped all of them, and still overwrote the results.

def _whole_number_at_least(text: str, lowest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _whole_number_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    return _whole_number_at_least(text, 0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def device_arg(text: str) -> str:
    """``--device``: cpu, cuda or cuda:N that this machine has; an argparse error otherwise
    (a typo gave torch's traceback, a missing GPU one from CUDA's initialisation)."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no GPU is visible to torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text}: only {torch.cuda.device_count()} GPU(s) are visible")
    return text


def check_preset(parser: argparse.ArgumentParser, cfg: str) -> None:
    """An unknown ``--cfg`` is an argument error: otherwise every setup fails alike and the
    results file is overwritten with errors."""
    from batikfast.training.config import PRESETS
    if cfg not in PRESETS:
        parser.error(f"--cfg must be one of {sorted(PRESETS)}, got {cfg!r}")


# What --quick narrows the setups of networks.py and train_step.py to, for the options left at
# their defaults: the eager fp32 reference (whole networks in interpreted Triton take minutes).
QUICK_SETUPS = dict(backends=["ref"], compile_modes=["eager"], precision=["fp32"])


def settle_preset_and_setups(parser: argparse.ArgumentParser, args) -> None:
    """``--cfg`` defaulted (paper256; tiny with ``--quick``) and checked, and with ``--quick``
    the QUICK_SETUPS for the options the command line left at their defaults."""
    if args.quick:
        args.cfg = args.cfg or "tiny"
        for option, quick_choice in QUICK_SETUPS.items():
            if getattr(args, option) == parser.get_default(option):
                setattr(args, option, quick_choice)
    args.cfg = args.cfg or "paper256"
    check_preset(parser, args.cfg)


def script_timer(args, device: torch.device, warmup_ms: float = 25.0) -> Timer:
    """The scripts' timer, :func:`repeat_ms` of repeats; on the CPU a single repeat may do, as
    one interpreted Triton call can take seconds."""
    return Timer(device, warmup_ms=warmup_ms, rep_ms=repeat_ms(args),
                 min_repeats=1 if device.type == "cpu" else 10)


def repeat_ms(args) -> float:
    """Milliseconds of timed repeats per measurement: ``--rep-ms``, else 100 (20 with --quick)."""
    return args.rep_ms or (20.0 if args.quick else 100.0)


# --------------------------------------------------------------------------- what ran, what failed

def unavailable_reason(impl: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``impl`` cannot run here, asked of batikfast.backends; None when it can. The
    compiled reference ("compiled") runs wherever the reference does."""
    if impl in ("ref", "compiled"):
        return None
    from batikfast import backends
    try:
        return backends.unavailable_reason(impl, device, dtype)
    except Exception as error:  # a probe that fails (loading the extension) is a reason too
        return f"{type(error).__name__}: {error}"


def describe_error(error: BaseException) -> str:
    """A failed measurement's status, on one line: "n/a: ..." for a mode the op does not have,
    "unavailable: ..." for an implementation that cannot run the call, else "error: ..."."""
    from benchmarks.opcases import NotApplicable
    name = type(error).__name__
    message = " ".join(str(error).split())
    if isinstance(error, NotApplicable):
        return f"n/a: {message}"
    if len(message) > 300:
        message = message[:297] + "..."
    if name == "BackendUnavailableError" or "cannot run this call" in message:
        return f"unavailable: {message}"
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "error: out of GPU memory"
    return f"error: {name}: {message}"


def relative_errors(pairs: list) -> list[float]:
    """Per (got, want) pair of tensors: largest |got - want| over max |want|.

    A tensor whose reference is (near) zero, such as a bias gradient the penalty does not
    reach, is scaled by a thousandth of the largest reference value of all pairs instead of
    by ~0.
    """
    pairs = [(got.detach().float(), want.detach().float()) for got, want in pairs]
    floor = max(max(want.abs().max().item() for _, want in pairs) * 1e-3, 1e-12)
    return [(got - want).abs().max().item() / max(want.abs().max().item(), floor)
            for got, want in pairs]


def relative_error(outputs, reference) -> float | None:
    """The worst of :func:`relative_errors` over the output tensors (or one tensor); None
    when either side has nothing to compare."""
    if outputs is None or reference is None:
        return None
    if isinstance(outputs, torch.Tensor):
        outputs, reference = [outputs], [reference]
    pairs = [(got, want) for got, want in zip(outputs, reference)
             if got is not None and want is not None]
    return max(relative_errors(pairs)) if pairs else None


# --------------------------------------------------------------------------- metadata

def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(short: bool = False) -> str | None:
    """The checkout's commit, or None outside a git checkout."""
    return _git("rev-parse", *(["--short"] if short else []), "HEAD")


def _triton_version() -> str | None:
    try:
        import triton
    except Exception as error:  # a broken triton install must not stop the CPU reference run
        return f"unavailable ({type(error).__name__})"
    return triton.__version__


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} threads)"


def device_slug(device: torch.device) -> str:
    """A folder-safe name for the device: ``nvidia-h100-80gb-hbm3``, ``cpu``."""
    if device.type != "cuda":
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return slug or "gpu"


def run_metadata(device: torch.device, argv: list[str] | None = None) -> dict:
    """Everything needed to tell where and with what a result was measured."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    meta = {
        "schema": SCHEMA_VERSION,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(device),
        "device_type": device.type,
        "timing": "CUDA events" if device.type == "cuda" else CPU_LABEL,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "git_dirty": bool(status) if status is not None else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "") == "1",
        "argv": list(sys.argv if argv is None else argv),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["sm_count"] = props.multi_processor_count
        meta["compute_capability"] = f"{props.major}.{props.minor}"
    meta["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    meta["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return meta


def output_dir(outdir: str | None, device: torch.device) -> Path:
    """``benchmarks/results/<device-slug>-<YYYY-MM-DD>/`` unless ``outdir`` is given, created
    and proven writable.

    The scripts call this before measuring anything: a folder that cannot be written (a typo,
    a path under a file, a read-only mount) then stops the run in its first second with one
    line naming it, instead of with a traceback after every measurement has been taken.
    """
    if outdir:
        path = Path(outdir)
    else:
        day = datetime.date.today().isoformat()
        path = REPO_ROOT / "benchmarks" / "results" / f"{device_slug(device)}-{day}"
    from batikfast.training.rundir import OutputDirError, check_output_dir

    try:
        check_output_dir(path)  # created, then a real write (root passes os.access anyway)
    except OutputDirError as error:
        raise SystemExit(str(error)) from None
    if device is not None:
        _refuse_other_device(path, device)
    return path


RESULT_FILES = ("ops.json", "networks.json", "train_step.json", "peer_nvidia.json",
                "peer_networks.json", "host_overhead.json")


def _refuse_other_device(path: Path, device: torch.device) -> None:
    """Stop when ``path`` already holds results measured on another device: a CPU check run
    given a GPU results folder replaced its ops.json and left a folder of mixed CPU and GPU
    figures that targets.py and RESULTS.md read as one device's."""
    here = device_name(device)
    for name in RESULT_FILES:
        try:
            meta = json.loads((path / name).read_text()).get("meta") or {}
        except (OSError, ValueError, AttributeError):
            continue  # absent or not ours: nothing to mix with
        there = meta.get("device")
        if there is not None and (there != here or meta.get("device_type") != device.type):
            raise SystemExit(
                f"--outdir {str(path)!r} already holds {name} measured on {there}; this run is "
                f"on {here} and would mix its results with those (and overwrite them): "
                "choose another folder")


def write_report(outdir: Path, name: str, payload: dict, markdown_text: str) -> str:
    """``<name>.json`` and ``<name>.md`` written into ``outdir``; returns "wrote <both>"."""
    json_path, markdown_path = outdir / f"{name}.json", outdir / f"{name}.md"
    write_json(json_path, payload)
    markdown_path.write_text(markdown_text)
    return f"wrote {json_path}, {markdown_path}"


def run_until_interrupted(measure, meta: dict, rows: list,
                          taken: str = "the measurements taken so far") -> bool:
    """Calls ``measure()``, which appends to ``rows`` as it goes; True when it was interrupted.

    Ctrl-C, or the SIGINT gpu_check.sh sends at its time limit, ends it early: the run is
    marked interrupted, the rows it left unfinished say so, and what was measured is kept to
    be written.
    """
    try:
        measure()
    except KeyboardInterrupt:
        meta["interrupted"] = True
        print(f"\ninterrupted: writing {taken}")
        for row in rows:
            row.setdefault("status", "interrupted")
        return True
    return False


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(value):
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


# --------------------------------------------------------------------------- timing

@dataclass
class Timing:
    """Milliseconds per call: the median and the 20th / 80th percentiles of ``repeats`` runs."""
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    method: str


class Timer:
    """Times a callable on the GPU with CUDA events, or on the CPU with the wall clock.

    GPU: each timed call follows an L2 flush (a write to a buffer larger than the L2), as
    ``triton.testing.do_bench`` does, so a kernel never reads its inputs from a cache the
    previous repeat warmed. Repeats are capped so tiny launch-bound kernels do not take
    seconds each: between ``min_repeats`` and ``max_repeats``, about ``rep_ms`` of work.
    """

    def __init__(self, device: torch.device, warmup_ms: float = 25.0, rep_ms: float = 100.0,
                 min_repeats: int = 10, max_repeats: int = 300, flush_l2: bool = True):
        self.device = device
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.min_repeats = min_repeats
        self.max_repeats = max_repeats
        self._flush_buffer = None
        if device.type == "cuda" and flush_l2:
            # 256 MiB is several times the L2 of an H100 / H200 (50 / 60 MiB).
            self._flush_buffer = torch.empty(2**26, dtype=torch.int32, device=device)

    @property
    def method(self) -> str:
        if self.device.type != "cuda":
            return CPU_LABEL
        return "CUDA events, L2 flushed" if self._flush_buffer is not None else "CUDA events"

    def __call__(self, fn) -> Timing:
        if self.device.type == "cuda":
            return self._time_cuda(fn)
        return self._time_cpu(fn)

    def _flush(self):
        if self._flush_buffer is not None:
            self._flush_buffer.zero_()

    def _time_cuda(self, fn) -> Timing:
        fn()
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        end.record()
        torch.cuda.synchronize(self.device)
        estimate = max(start.elapsed_time(end) / 3, 1e-3)
        for _ in range(max(1, min(int(self.warmup_ms / estimate), self.max_repeats))):
            fn()
        repeats = int(min(max(self.rep_ms / estimate, self.min_repeats), self.max_repeats))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            self._flush()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(self.device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        return summarise_times(times, self.method)

    def _time_cpu(self, fn) -> Timing:
        # No warm-up call here: the benchmark scripts have run fn once already (for its
        # outputs; the CPU ceilings, labels only, have not), and one interpreted Triton call
        # can take seconds.
        times = []
        budget_end = time.perf_counter() + max(self.rep_ms, 1.0) / 1000 * 5
        while len(times) < self.max_repeats:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1000)
            if len(times) >= self.min_repeats and time.perf_counter() > budget_end:
                break
        return summarise_times(times, self.method)


def summarise_times(times: list[float], method: str) -> Timing:
    """Median and 20th / 80th percentiles of ``times`` (milliseconds) as a Timing."""
    ordered = sorted(times)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return Timing(statistics.median(ordered), quantile(0.2), quantile(0.8), len(ordered), method)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def markdown_preamble(title: str, meta: dict, provenance: list[str]) -> list[str]:
    """The lines that open every report: title, the CPU warning, provenance, the time-limit flag."""
    out = [title, ""]
    if meta.get("device_type") != "cuda":
        out += [f"**{CPU_LABEL}**: checks the script only.", ""]
    out += provenance
    if meta.get("interrupted"):
        out.append("- **interrupted (Ctrl-C or a time limit): the run is incomplete**")
    return out + [""]
