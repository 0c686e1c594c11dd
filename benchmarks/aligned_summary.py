"""Mean over seeds of aligned_trials.py's JSON lines: one Markdown row per (teacher, trial)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np

COLS = ("warm", "cold_item", "cold_user", "cold_both", "cold_mean")


def _cell(values: list) -> str:
    vals = [v for v in values if v is not None]  # None: a segment without users
    return f"{np.mean(vals):.3f}" if vals else "n/a"


def main(path: str = "benchmarks/results/aligned/trials.jsonl", seeds: str | None = None) -> int:
    want = None if seeds is None else {int(s) for s in seeds.split(",")}
    groups: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if want is None or r["seed"] in want:
                groups[(r["teacher"], r["trial"])][r["seed"]] = r  # a seed's latest run wins
    print("| teacher | trial | seeds | " + " | ".join(COLS) + " | prior warm / cold-user |")
    print("|---|---|---|" + "---|" * len(COLS) + "---|")
    for (teacher, trial), rows in groups.items():
        rs = [rows[s] for s in sorted(rows)]
        cells = [_cell([r.get(c) for r in rs]) for c in COLS]
        pri = "/".join(str(r["prior_warm"]) for r in rs) + " ; " + "/".join(
            str(r["prior_cold_user"]) for r in rs)
        print(f"| {teacher or 'default'} | {trial} | {','.join(map(str, sorted(rows)))} | "
              + " | ".join(cells) + f" | {pri} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
