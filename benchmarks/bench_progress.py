"""Run a command and time its progress output: every line or tqdm refresh (split on
"\\r" and "\\n") of its stderr is stamped with the wall time since start. Prints the
longest gap between two output lines (the start and the exit count as lines) and the
longest gap between two *events* (lines whose phase or count changed: a bar redrawn
with only its elapsed time moved is not an event), the wall time and the command's
phase line.

    python benchmarks/bench_progress.py [--log FILE] -- mlx-edit inpaint ...
    python benchmarks/bench_progress.py --lines FILE     # analyse a --log file again

Results: benchmarks/RESULTS.md ("Progress and costs on a 4K photo").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def event_key(line: str) -> str:
    """What a progress line says apart from its timing: a tqdm bar's text before "[",
    else the text before the first ":" (a bar without a count: "load: 00:05")."""
    return line.split("[", 1)[0].strip() if "[" in line else line.split(":", 1)[0].strip()


def longest(stamps: list[float], lines: list[str], end: float, events: bool):
    """(gap s, the line before it) between consecutive lines (events: changed keys)."""
    points, last = [(0.0, "(start)")], None
    for s, line in zip(stamps, lines):
        if not events or event_key(line) != last:
            points.append((s, line))
            last = event_key(line)
    points.append((end, "(exit)"))
    return max((b[0] - a[0], a[1]) for a, b in zip(points, points[1:]))


def run(cmd: list[str]) -> tuple[int, list[float], list[str], float, str]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    stamps, lines, buf = [], [], b""
    while chunk := proc.stderr.read1(4096):
        buf += chunk
        parts = buf.replace(b"\r", b"\n").split(b"\n")
        buf = parts.pop()
        for p in parts:
            if p.strip():
                stamps.append(time.perf_counter() - t0)
                lines.append(p.decode(errors="replace"))
    out = proc.stdout.read().decode()
    rc = proc.wait()
    return rc, stamps, lines, time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", default=None, help="write the stamped lines here")
    ap.add_argument("--lines", default=None, help="analyse this --log file instead")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.lines:
        rows = [r.strip().split(None, 1) for r in open(args.lines) if r.strip()]
        stamps, lines = [float(s) for s, _ in rows], [text for _, text in rows]
        rc, wall, out = 0, stamps[-1], ""
    else:
        cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
        rc, stamps, lines, wall, out = run(cmd)
    if args.log:
        with open(args.log, "w") as f:
            f.writelines(f"{s:8.1f}  {line}\n" for s, line in zip(stamps, lines))
    gap, after = longest(stamps, lines, wall, events=False)
    egap, eafter = longest(stamps, lines, wall, events=True)
    print(f"rc {rc}  wall {wall:.1f}s  lines {len(lines)}  longest gap {gap:.1f}s (after: "
          f"{after.strip()[:90]})  longest gap between events {egap:.1f}s (after: "
          f"{eafter.strip()[:90]})")
    print(out.strip())
    sys.exit(rc)


if __name__ == "__main__":
    main()
