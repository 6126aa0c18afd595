"""What the Triton kernels compile to for Ampere and Hopper GPUs, read without a GPU.

    python benchmarks/codegen.py                     # paper256 G and D, batch 16, fp16 bf16 fp32
    python benchmarks/codegen.py --arch 90 --dtype fp16 --cases 'G.b256.*' --modes fwd

Every benchmark case runs its Triton path (forward, backward, double backward) as in
``run.py``, but under a stand-in Triton driver that compiles each launch for the chosen GPU
architecture instead of running it: the launches are exactly the ones a GPU would get (tile
choice, specialisation, constants), only no kernel executes. The machine code then answers
what decides speed before any timing can, and what no CPU test sees:

- registers per thread, spills and stack (``ptxas -v``, with the flags Triton itself uses),
  and whether any spill sits inside a loop of the machine code (``cuobjdump -sass``);
- shared memory per program against the architecture's limit (over it, the launcher falls
  back to smaller tiles on the GPU);
- matrix instructions: Hopper's asynchronous ``wgmma`` or Ampere's ``mma.sync``, and whether
  ptxas serialised the wgmmas (its "Potential Performance Loss" notes C7510-C7515);
- asynchronous global-to-shared copies, and the widest global load and store in bytes
  (16 = 128-bit vector access).

These are static facts about the code, not measurements: GPU runs of ``run.py`` say how fast it
is. The CUDA extension's kernels, already compiled into ``batikfast._C``, are listed with their
registers, stack, local memory and static shared memory (``cuobjdump -res-usage``).
Writes ``codegen.json`` and ``codegen.md`` under ``--outdir``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":
    # The kernels must be compiled, not interpreted: TRITON_INTERPRET is read when they are
    # defined (and benchmarks.common would turn the interpreter on without a GPU). Imported
    # as a module (the tests read its parsers), it leaves the process's setting alone.
    os.environ["TRITON_INTERPRET"] = "0"

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import common, opcases, shapes  # noqa: E402
from benchmarks.common import DTYPES  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Arch:
    """A GPU generation as the kernels see it."""
    capability: int
    gpu_name: str          # ptxas's --gpu-name for the code Triton emits
    shared_limit: int      # opt-in shared memory per block, bytes
    multiprocessors: int   # of the reference GPU (H100 SXM, A100), for the launcher's tiles


ARCHS = {
    90: Arch(90, "sm_90a", 227 * 1024, 132),
    80: Arch(80, "sm_80", 163 * 1024, 108),
}
OPS = ("bias_act", "upfirdn2d", "modulated_conv2d", "diffusion_noise")


# --------------------------------------------------------------------------- compiling launches

class _CompileOnlyDriver:
    """Triton's view of a GPU of one architecture, enough to compile but not to launch.

    The device index is the capability, so that kernels compiled for one architecture are
    cached apart from the other's."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget
        self.capability = capability
        self.target = GPUTarget("cuda", capability, 32)

    def is_active(self):
        return True

    def get_current_device(self):
        return self.capability

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@dataclasses.dataclass
class Launch:
    kernel: str
    constants: dict
    compiled: object  # triton's CompiledKernel


@contextlib.contextmanager
def compiling_for(arch: Arch):
    """Inside, every Triton launch of batikfast's kernels compiles for ``arch`` and returns
    without running; the launches are appended to the yielded list. The kernels accept CPU
    tensors for this (their device check is the only thing lifted)."""
    from triton.runtime import driver, jit

    from batikfast import backends
    modconv_module = backends.triton_kernels("modulated_conv2d")

    launches: list[Launch] = []
    original_run = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        compiled = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        launches.append(Launch(self.fn.__name__, _constants(self, args, kwargs), compiled))
        return compiled

    patches = [(jit.JITFunction, "run", compile_only),
               (torch.nn.grad, "conv2d_weight", _conv2d_weight_in_float32),
               (backends, "triton_unavailable_reason", lambda device, dtype: None),
               (modconv_module, "_sm_count", lambda device: arch.multiprocessors)]
    patches += [(backends.triton_kernels(op), "check_device", lambda *a, **k: None) for op in OPS]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    # Restored as it was: without a GPU there is no default driver to reset to.
    saved_driver = driver._active
    driver.set_active(_CompileOnlyDriver(arch.capability))
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield launches
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        driver._active = saved_driver


_torch_conv2d_weight = torch.nn.grad.conv2d_weight


def _conv2d_weight_in_float32(x, weight_size, grad_output, *args, **kwargs):
    """The weight gradient the kernels' backward leaves to torch, computed in float32 and
    returned in the 16-bit dtype asked for: no Triton launch reads its values (none run here),
    and torch's 16-bit convolutions on the CPU take minutes where float32 takes a second."""
    dtype = x.dtype
    return _torch_conv2d_weight(x.float(), weight_size, grad_output.float(), *args,
                                **kwargs).to(dtype)


def _constants(jit_function, args, kwargs) -> dict:
    bound = dict(zip((p.name for p in jit_function.params), args))
    bound.update(kwargs)
    constants = {p.name: bound[p.name] for p in jit_function.params
                 if p.is_constexpr and p.name in bound}
    for option in ("num_warps", "num_stages"):
        if option in kwargs:
            constants[option] = kwargs[option]
    return constants


def launches_of_case(case, batch: int, dtype: torch.dtype, mode: str, arch: Arch) -> list[Launch]:
    """The Triton launches of one benchmark call, compiled for ``arch``."""
    torch.manual_seed(0)
    inputs = opcases.make_inputs(case, batch, dtype, torch.device("cpu"), mode)
    with compiling_for(arch) as launches:
        opcases.make_callable(case, inputs, "triton", mode)()
    return launches


# --------------------------------------------------------------------------- reading the code

_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_GLOBAL_ACCESS = re.compile(r"^\s*(?:@%p\d+\s+)?(ld|st)\.global[\w.]*?(?:\.v(\d))?\.([bfsu])(\d+)\b",
                            re.MULTILINE)


def _cuda_tool(name: str) -> str:
    """A CUDA binary tool (ptxas, cuobjdump) from the set Triton ships with."""
    from triton.backends.nvidia.compiler import get_ptxas
    return str(Path(get_ptxas(90).path).with_name(name))


def ptxas_report(ptx: str, arch: Arch) -> dict:
    """ptxas -v on Triton's PTX with the flags Triton compiles it with."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch.capability).path
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run(
            [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch.gpu_name}",
             str(source), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True, text=True, check=True)
    return parse_ptxas_log(result.stdout + result.stderr)


def parse_ptxas_log(log: str) -> dict:
    registers = _REGISTERS.search(log)
    stack, spill_stores, spill_loads = map(int, _SPILLS.search(log).groups())
    # Warnings, and the "Potential Performance Loss" notes (C7510-C7515: serialised wgmma)
    # that ptxas prints as info lines.
    notes = sorted({line.split(":", 1)[1].strip() for line in log.splitlines()
                    if "warning" in line or "Performance Loss" in line})
    return dict(registers=int(registers.group(1)), stack_bytes=stack,
                spill_store_bytes=spill_stores, spill_load_bytes=spill_loads,
                ptxas_notes=notes)


def widest_global_access(ptx: str) -> dict:
    """Bytes of the widest global load and store (vector width x element bits / 8)."""
    widest = {"ld": 0, "st": 0}
    for op, vector, _, bits in _GLOBAL_ACCESS.findall(ptx):
        widest[op] = max(widest[op], int(vector or 1) * int(bits) // 8)
    return dict(widest_load_bytes=widest["ld"], widest_store_bytes=widest["st"])


def instruction_counts(ptx: str) -> dict:
    """Static counts (in the code, not executed) of the instructions that matter here."""
    return dict(wgmma=len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
                mma_sync=len(re.findall(r"\bmma\.sync\b", ptx)),
                cp_async=len(re.findall(r"\bcp\.async\.c[ag]\.shared", ptx)),
                tma=len(re.findall(r"\bcp\.async\.bulk\.tensor\b", ptx)))


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def local_accesses_in_loops(sass: str) -> int:
    """Local-memory loads and stores inside loops of the SASS (the instructions between a
    backward branch and its target), executed or not. Spills outside loops (around the prologue
    or epilogue) run once per thread and cost little; inside the main loop they cost every
    iteration. Local arrays count too, such as those of sinf's reduction of huge arguments (a
    path that bounded arguments never take): ptxas's spill bytes tell the two apart."""
    instructions = [(int(address, 16), opcode, operands)
                    for address, opcode, operands in _SASS_LINE.findall(sass)]
    loops = []
    for address, opcode, operands in instructions:
        target = re.match(r"\s*(0x[0-9a-f]+)", operands)
        if opcode.startswith("BRA") and target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    return sum(1 for address, opcode, _ in instructions
               if opcode.startswith(("LDL", "STL"))
               and any(start <= address <= end for start, end in loops))


def disassemble(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([_cuda_tool("cuobjdump"), "-sass", str(path)], capture_output=True,
                              text=True, check=True).stdout


def describe_launch(launch: Launch, arch: Arch) -> dict:
    metadata = launch.compiled.metadata
    ptx = launch.compiled.asm["ptx"]
    code = dict(kernel=launch.kernel, arch=f"sm_{arch.capability}",
                constants={k: _plain(v) for k, v in launch.constants.items()},
                num_warps=metadata.num_warps, num_stages=metadata.num_stages,
                shared_bytes=metadata.shared, shared_limit_bytes=arch.shared_limit)
    code.update(ptxas_report(ptx, arch))
    code["local_accesses_in_loops"] = local_accesses_in_loops(
        disassemble(launch.compiled.asm["cubin"]))
    code.update(instruction_counts(ptx))
    code.update(widest_global_access(ptx))
    code["wgmma_serialized"] = any("wgmma" in note and "serialized" in note
                                   for note in code["ptxas_notes"])
    return code


def _plain(value):
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


# --------------------------------------------------------------------------- the report

def triton_codegen(cases, batches, dtypes, modes, archs) -> list[dict]:
    """One row per distinct compiled kernel, with the calls that launch it."""
    rows: dict[tuple, dict] = {}
    for arch, case, batch, dtype_name, mode in itertools.product(archs, cases, batches, dtypes,
                                                                  modes):
        call = f"{case.name} b{batch} {dtype_name} {mode}"
        try:
            launches = launches_of_case(case, batch, DTYPES[dtype_name], mode, arch)
        except opcases.NotApplicable:
            continue
        for launch in launches:
            key = (arch.capability, launch.compiled.hash)
            if key not in rows:
                rows[key] = dict(describe_launch(launch, arch), calls=[])
            if call not in rows[key]["calls"]:
                rows[key]["calls"].append(call)
        print(f"sm_{arch.capability} {call}: {len(launches)} launch(es)", flush=True)
    return list(rows.values())


def cuda_extension_resources() -> list[dict] | str:
    """Per-kernel resources of the built extension, or why they cannot be read."""
    try:
        from batikfast import _C
    except ImportError as error:
        return f"the CUDA extension is not built ({error})"
    result = subprocess.run([_cuda_tool("cuobjdump"), "-res-usage", _C.__file__],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return f"cuobjdump failed: {result.stderr.strip()}"
    return parse_resource_usage(result.stdout)


_RESOURCE_LINE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_resource_usage(text: str) -> list[dict]:
    rows, arch, function = [], None, None
    for line in text.splitlines():
        if line.strip().startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.strip().startswith("Function "):
            function = line.strip()[len("Function "):].rstrip(":")
        elif (match := _RESOURCE_LINE.search(line)) and function:
            registers, stack, shared, local = map(int, match.groups())
            rows.append(dict(kernel=function, arch=arch, registers=registers,
                             stack_bytes=stack, shared_bytes=shared, local_bytes=local))
            function = None
    for row, name in zip(rows, _demangle([row["kernel"] for row in rows])):
        row["kernel"] = name
    return rows


def _demangle(names: list[str]) -> list[str]:
    """C++ names as written in the source, in one c++filt call (the mangled ones without it)."""
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                             text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names
    return out if len(out) == len(names) else names


def environment() -> dict:
    import triton
    return dict(torch=torch.__version__, triton=triton.__version__,
                commit=common.git_commit(short=True),
                note="static: compiled without running; no timing")


# --------------------------------------------------------------------------- markdown

def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Compiled code of the Triton kernels (static, not timed)", "",
             f"torch {env['torch']}, Triton {env['triton']}, commit {env['commit']}. "
             "Shared memory is per program against the architecture's limit; load / store are "
             "the widest global accesses in bytes; wgmma / mma / cp.async are static instruction "
             "counts in the PTX.", "",
             "| arch | kernel | tile / constants | warps | stages | regs | spill B (LDL/STL in loops) | shared KiB "
             "| wgmma | mma | cp.async | load B | store B | ptxas notes | calls |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["triton"]:
        tiles = ", ".join(f"{k}={v}" for k, v in row["constants"].items()
                          if k.startswith("BLOCK") or k in ("ACT", "SCALE_SAMPLES", "ORDER"))
        spills = row["spill_store_bytes"] + row["spill_load_bytes"]
        calls = "; ".join(row["calls"][:3]) + (f" (+{len(row['calls']) - 3})"
                                                if len(row["calls"]) > 3 else "")
        notes = " / ".join(_short_note(note) for note in row["ptxas_notes"]) or "-"
        lines.append(
            f"| {row['arch']} | {row['kernel']} | {tiles} | {row['num_warps']} | "
            f"{row['num_stages']} | {row['registers']} | {spills} ({row['local_accesses_in_loops']}) | "
            f"{row['shared_bytes'] / 1024:.1f} / {row['shared_limit_bytes'] // 1024} | "
            f"{row['wgmma']} | {row['mma_sync']} | {row['cp_async']} | "
            f"{row['widest_load_bytes']} | {row['widest_store_bytes']} | {notes} | {calls} |")
    lines += ["", "## CUDA extension (`cuobjdump -res-usage`)", ""]
    cuda = result["cuda"]
    if isinstance(cuda, str):
        lines.append(cuda)
    else:
        lines += ["| arch | kernels | max regs | with stack | max stack B | with local memory |",
                  "|---|---|---|---|---|---|"]
        for arch in sorted({row["arch"] for row in cuda}):
            rows = [row for row in cuda if row["arch"] == arch]
            lines.append(f"| {arch} | {len(rows)} | {max(r['registers'] for r in rows)} | "
                         f"{sum(r['stack_bytes'] > 0 for r in rows)} | "
                         f"{max(r['stack_bytes'] for r in rows)} | "
                         f"{sum(r['local_bytes'] > 0 for r in rows)} |")
    return "\n".join(lines) + "\n"


def _short_note(note: str) -> str:
    """A ptxas note for a table cell: its code and gist (the JSON keeps the whole text)."""
    code = re.match(r"\((C\d+)\)", note)
    if code and "serialized" in note:
        return f"{code.group(1)}: wgmma serialised"
    return note if len(note) <= 60 else note[:57] + "..."


# --------------------------------------------------------------------------- command line

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", type=int, choices=sorted(ARCHS), default=[90, 80],
                        help="compute capabilities to compile for (default: 90 80)")
    parser.add_argument("--shapes", nargs="+", choices=shapes.SHAPE_SETS,
                        default=["paper256-g", "paper256-d"], metavar="SET")
    parser.add_argument("--cases", nargs="+", default=None, metavar="PATTERN",
                        help="only cases whose name matches one of these shell patterns")
    parser.add_argument("--ops", nargs="+", choices=sorted(opcases.OPS), default=None)
    parser.add_argument("--batch", nargs="+", type=common.positive_int, default=[16],
                        help="batch sizes (the tile choice depends on them; default 16)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES),
                        default=["fp16", "bf16", "fp32"])
    parser.add_argument("--modes", nargs="+", choices=opcases.ALL_MODES,
                        default=list(opcases.ALL_MODES))
    parser.add_argument("--no-cuda", action="store_true",
                        help="skip the CUDA extension's resource table")
    parser.add_argument("--outdir", type=Path, default=None,
                        help="write codegen.json and codegen.md here (default: print only)")
    return parser.parse_args(argv)


def select_cases(args) -> list:
    cases = [case for shape_set in args.shapes for case in shapes.cases_for(shape_set)]
    if args.ops:
        cases = [case for case in cases if case.op in args.ops]
    if args.cases:
        cases = [case for case in cases
                 if any(fnmatch.fnmatch(case.name, pattern) for pattern in args.cases)]
    if not cases:
        raise SystemExit("error: no benchmark case matches --shapes / --ops / --cases")
    return cases


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.outdir is not None:  # proven writable before minutes of compiling, not after
        args.outdir = common.output_dir(str(args.outdir), None)
    triton_rows = triton_codegen(select_cases(args), args.batch, args.dtype, args.modes,
                                 [ARCHS[capability] for capability in args.arch])
    result = dict(environment=environment(), triton=triton_rows,
                  cuda="not read (--no-cuda)" if args.no_cuda else cuda_extension_resources())
    table = markdown(result)
    print(table)
    if args.outdir is not None:
        (args.outdir / "codegen.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.outdir / "codegen.md").write_text(table)
        print(f"wrote {args.outdir / 'codegen.json'} and codegen.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
