"""The mutation score of the last ``mutmut run``: one line per file, then the total (``make mutate``).

Reads mutmut's per-file results (``mutants/**/*.py.meta``) and the reviewed list of equivalent
mutants (``tests/mutation/equivalent.txt``: ``NAME :: MUTATED LINE :: REASON``). An equivalent mutant
that survived counts in neither K nor N. An entry whose mutant was killed, or whose diff no longer
has that mutated line (the source changed and mutmut renumbered the function's mutants), is reported
as stale and excludes nothing, so the score never flatters. Run from anywhere; it reads ``mutants/``
of the repository it lives in.

Usage: python tests/mutation/score.py [--survivors] [--fail-under PERCENT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MUTANTS = ROOT / "mutants"
EQUIVALENT = Path(__file__).resolve().parent / "equivalent.txt"

# mutmut's exit-code convention (mutmut/stats.py): a failing test run (1, 3) or a timeout kills it.
KILLED = {1, 3, 36, 24, -24, 152, 255}
SURVIVED = {0}


def load_equivalent(path: Path) -> dict[str, str]:
    """Mutant name -> its mutated line; blank lines and ``#`` comments are skipped."""
    entries: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = [part.strip() for part in line.split(" :: ")]
        if len(parts) < 3 or not all(parts):
            raise SystemExit(f"error: {path.name} line {number}: expected `NAME :: MUTATED LINE :: REASON`")
        entries[parts[0]] = parts[1]
    return entries


def mutated_lines(name: str, source: Path) -> set[str]:
    """The added lines of a mutant's diff, stripped (mutmut's own diff of the generated function)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diff = get_diff_for_mutant(name, path=source)
    return {line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survivors", action="store_true", help="list the surviving mutants (see: mutmut show NAME)")
    parser.add_argument("--fail-under", type=float, default=None, help="exit 1 if any file scores below this")
    args = parser.parse_args(argv)

    os.chdir(ROOT)  # mutmut's helpers read mutants/ relative to the working directory
    metas = sorted(MUTANTS.rglob("*.py.meta"))
    if not metas:
        print("error: no mutmut results in mutants/: run `make mutate` first", file=sys.stderr)
        return 2
    equivalent = load_equivalent(EQUIVALENT) if EQUIVALENT.exists() else {}
    used: set[str] = set()
    total_killed = total_counted = 0
    below = False
    survivors: list[str] = []
    for meta in metas:
        results: dict[str, int | None] = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
        if not results:
            continue
        source = meta.relative_to(MUTANTS).with_suffix("")  # drop ".meta"
        counts: Counter[str] = Counter()
        for name, code in results.items():
            if code in KILLED:
                counts["killed"] += 1
            elif code in SURVIVED and name in equivalent and equivalent[name] in mutated_lines(name, source):
                counts["equivalent"] += 1
                used.add(name)
            elif code in SURVIVED:
                counts["survived"] += 1
                survivors.append(name)
            elif code is None:
                counts["not checked"] += 1
            else:
                counts["other"] += 1  # no tests, suspicious, segfault: counted, not killed
                survivors.append(name)
        counted = len(results) - counts["equivalent"]
        score = 100.0 * counts["killed"] / counted if counted else 100.0
        below = below or (args.fail_under is not None and score < args.fail_under)
        details = ", ".join(f"{n} {k}" for k, n in counts.items() if k != "killed" and n)
        suffix = f" ({details})" if details else ""
        print(f"{source}: {counts['killed']} killed / {counted} mutants = {score:.1f} %{suffix}")
        total_killed += counts["killed"]
        total_counted += counted
    for name in sorted(set(equivalent) - used):
        print(f"stale entry in {EQUIVALENT.name} (no surviving mutant with that line): {name}", file=sys.stderr)
    if args.survivors:
        for name in survivors:
            print(f"  survived: {name}")
    score = 100.0 * total_killed / total_counted if total_counted else 100.0
    print(f"mutation score: {total_killed} killed / {total_counted} mutants = {score:.1f} %")
    return 1 if below else 0


if __name__ == "__main__":
    sys.exit(main())
