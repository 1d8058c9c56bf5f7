"""Run a command and time its progress output: every line or tqdm refresh (split on
"\\r" and "\\n") of its stderr is stamped with the wall time since start; prints the
longest gap between two of them (the start and the exit count as lines), the wall time
and the command's last stderr line (the CLI's phase line).

    python benchmarks/bench_progress.py [--log FILE] -- mlx-edit inpaint ...

Results: benchmarks/RESULTS.md ("Progress and costs on a 4K photo").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", default=None, help="write the stamped lines here")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    stamps, lines, buf = [0.0], [], b""
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
    stamps.append(time.perf_counter() - t0)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    if args.log:
        with open(args.log, "w") as f:
            f.writelines(f"{s:8.1f}  {line}\n" for s, line in zip(stamps[1:], lines))
    after = lines[worst - 1] if worst else "(start)"
    print(f"rc {rc}  wall {stamps[-1]:.1f}s  progress lines {len(lines)}  longest gap "
          f"{gaps[worst]:.1f}s (after: {after.strip()[:100]})")
    print("last stderr line:", lines[-1] if lines else "")
    print(out.strip())
    sys.exit(rc)


if __name__ == "__main__":
    main()
