"""The test suite on a GPU machine, spread over its cores: which processes to start, and what
they found. Used by ``benchmarks/gpu_check.sh``'s tests step.

    python benchmarks/gpu_tests.py plan COLLECTED.txt FILE...  # lines "file index count"
    python benchmarks/gpu_tests.py summarise LOG_DIR [--json gpu_tests.json]

On a GPU every distinct Triton specialisation a test file launches is compiled (hundreds for
``bias_act``: activations x derivative orders x dtypes x options), a CPU-bound second or so
each. One process per file left the largest files compiling on one core each, past the step's
time limit, while the other cores were idle; ``plan`` splits a file of many tests into shards
(``pytest --shard I/N``, tests/conftest.py), largest first. ``summarise`` adds the shards'
counts up per file and says which shards were stopped, crashed or never started.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TESTS_PER_SHARD = 40
MAX_SHARDS = 8
# pytest's closing line, e.g. "3 failed, 110 passed, 4 skipped, 24 deselected in 40.12s"
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)\b")
_SHARD_LOG = re.compile(r"^(?P<name>.+)\.(?P<index>\d+)-of-(?P<count>\d+)\.log$")
NOT_STARTED = "not started: the step's time was up"


def plan(files, collected_lines, per_shard: int = TESTS_PER_SHARD,
         max_shards: int = MAX_SHARDS) -> list[tuple[str, int, int]]:
    """``(file, shard index, shard count)`` for every process to start, largest shards first,
    from the node ids ``pytest --collect-only -q`` prints (``tests/test_x.py::test_y[...]``).
    Every file of ``files`` gets a process, one whose collection failed too (it reports the
    error)."""
    tests = Counter({file: 0 for file in files})
    tests.update(line.split("::", 1)[0].strip() for line in collected_lines if "::" in line)
    jobs = []
    for file, count in tests.items():
        shards = min(max_shards, max(1, math.ceil(count / per_shard)))
        jobs += [(file, index, shards, count / shards) for index in range(shards)]
    jobs.sort(key=lambda job: (-job[3], job[0], job[1]))
    return [(file, index, shards) for file, index, shards, _ in jobs]


def shard_outcome(text: str) -> dict:
    """Counts of one shard's log and how it ended: "finished", "stopped" (the time limit's
    SIGINT), "crashed" (no closing line: a segfault or the kill after the limit) or
    "not started"."""
    if text.startswith(NOT_STARTED):
        return dict(counts={}, ending="not started", failures=[], fatal=None)
    closing = [line for line in text.splitlines() if _COUNT.search(line) and " in " in line]
    counts = Counter()
    if closing:
        for number, kind in _COUNT.findall(closing[-1]):
            counts["errors" if kind.startswith("error") else kind] += int(number)
    if "KeyboardInterrupt" in text:
        ending = "stopped"
    elif not closing:
        ending = "crashed"
    else:
        ending = "finished"
    failures = [line[:220] for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return dict(counts=dict(counts), ending=ending, failures=failures,
                fatal=next((line for line in text.splitlines()
                            if line.startswith(("Fatal Python error", "Segmentation fault"))),
                           None))


def summarise(log_dir: Path) -> dict:
    """Per test file: the counts of all its shards, how many shards ended how, its failures."""
    files: dict[str, dict] = {}
    for path in sorted(log_dir.glob("*.log")):
        match = _SHARD_LOG.match(path.name)
        if not match:
            continue
        outcome = shard_outcome(path.read_text(errors="replace"))
        entry = files.setdefault(match["name"], dict(counts=Counter(), shards=0, endings=Counter(),
                                                     failures=[], fatal=[]))
        entry["counts"].update(outcome["counts"])
        entry["shards"] += 1
        entry["endings"][outcome["ending"]] += 1
        entry["failures"] += outcome["failures"]
        if outcome["fatal"]:
            entry["fatal"].append(f"shard {match['index']}: {outcome['fatal']}")
    return {name: dict(entry, counts=dict(entry["counts"]), endings=dict(entry["endings"]))
            for name, entry in files.items()}


def summary_line(name: str, entry: dict) -> str:
    order = ("failed", "errors", "passed", "skipped", "xfailed", "xpassed")
    counts = ", ".join(f"{entry['counts'][k]} {k}" for k in order if entry["counts"].get(k))
    problems = [f"{n} {ending.upper()}" for ending, n in entry["endings"].items()
                if ending != "finished"]
    where = f"{entry['shards']} process{'es' if entry['shards'] > 1 else ''}"
    if problems:
        where += "; " + ", ".join(problems) + (" at the time limit" if "stopped" in
                                               entry["endings"] else "")
    return f"{name}: {counts or 'no test result'} ({where})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    planning = commands.add_parser("plan", help="processes to start, from pytest --co -q output")
    planning.add_argument("collected")
    planning.add_argument("files", nargs="+", help="every test file to run")
    planning.add_argument("--per-shard", type=int, default=TESTS_PER_SHARD)
    planning.add_argument("--max-shards", type=int, default=MAX_SHARDS)
    summing = commands.add_parser("summarise", help="per-file results from the shard logs")
    summing.add_argument("log_dir")
    summing.add_argument("--json", default=None, help="also write the summary there")
    args = parser.parse_args(argv)
    if args.command == "plan":
        lines = Path(args.collected).read_text(errors="replace").splitlines()
        for file, index, count in plan(args.files, lines, args.per_shard, args.max_shards):
            print(file, index, count)
        return 0
    files = summarise(Path(args.log_dir))
    for name, entry in files.items():
        print(summary_line(name, entry))
        for line in (entry["fatal"] + entry["failures"])[:15]:
            print(f"  {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(files=files), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
