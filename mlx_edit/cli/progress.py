"""The CLI's progress: one tqdm bar per phase of an edit (mlx_edit.progress events) and
the phase line that accounts for the command's wall time."""

from __future__ import annotations

import sys
import threading

from mlx_edit.cli.cache import cache_summary
from mlx_edit.progress import PHASE_KEYS, phase_seconds

UNITS = {"denoise": "step", "vae_encode": "part", "vae_decode": "part"}  # tiles or layers
LABELS = {"load_s": "load", "load_transformer_s": "load-transformer", "load_vae_s": "load-vae",
          "segment_s": "segment", "load_text_segmenter_s": "load-sam3",
          "text_segment_s": "sam3", "text_encode_s": "text", "image_prompts_s": "image-prompts",
          "vae_encode_s": "vae-enc", "control_prepare_s": "control", "denoise_s": "denoise",
          "vae_decode_s": "vae-dec", "paste_back_s": "paste", "rank_s": "rank",
          "write_s": "write"}


HEARTBEAT_S = 5.0  # a bar not updated for this long is redrawn (its elapsed time moves)
# a bar shows once its phase has lasted this long: quick phases (and a bad input found
# while loading, which ends in one error line) print no bar; the phase line sums them all
BAR_DELAY_S = 1.0


class PhaseBars:
    """A progress callback (`wants_phases`) drawing a tqdm bar per phase on stderr: a new
    bar when the phase changes or its count restarts; phases without counts show their
    elapsed time. A bar that got no event for `heartbeat` s is redrawn from a thread (a
    long VAE layer or model load still shows its phase and elapsed time); a bar shows
    after `delay` s (default BAR_DELAY_S). `close()` ends the last bar and the thread
    (before any error line)."""

    wants_phases = True

    def __init__(self, file=None, heartbeat: float | None = HEARTBEAT_S,
                 delay: float | None = None):
        self.file = file or sys.stderr
        self.delay = BAR_DELAY_S if delay is None else delay
        self.bar, self.phase = None, None
        self._lock, self._stop = threading.Lock(), threading.Event()
        if heartbeat:
            threading.Thread(target=self._beat, args=(heartbeat,), daemon=True).start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                if self.bar is not None and self.bar.last_print_t + every <= self.bar._time():
                    self.bar.refresh()

    def __call__(self, done: int, total: int, phase: str = "denoise") -> None:
        with self._lock:
            self._event(done, total, phase)

    def _event(self, done: int, total: int, phase: str) -> None:
        bar = self.bar
        if bar is not None and phase == self.phase and bar.n == 0 and total != (bar.total or 0):
            bar.total, bar.bar_format = total or None, None  # the phase's count is known now
        elif bar is None or phase != self.phase or done < bar.n or total != (bar.total or 0):
            bar = self._open(phase, total)
        bar.update(done - bar.n)

    def _open(self, phase: str, total: int):
        from tqdm import tqdm

        self._close_bar()
        unit = UNITS.get(phase.rsplit(" ", 1)[-1], "it")
        self.bar = tqdm(total=total or None, desc=phase, unit=unit, file=self.file,
                        bar_format=None if total else "{desc}: {elapsed}", delay=self.delay)
        self.phase = phase
        return self.bar

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._close_bar()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def phase_line(s: dict, wall_s: float | None = None) -> str:
    """The phases' seconds (PHASE_KEYS present), the seconds none of them timed ("other")
    and the wall time, then the peak memory and the step cache's summary."""
    parts = []
    for key in PHASE_KEYS:
        if key in s:
            extra = f" ({s['step_s']:.2f} s/step)" if key == "denoise_s" and "step_s" in s else ""
            cached = " (cached)" if key == "text_encode_s" and s.get("prompt_cache_hits") \
                and not s.get("prompt_cache_misses") else ""
            parts.append(f"{LABELS[key]} {s[key]:.1f}s{extra}{cached}")
    if wall_s is not None:
        parts.append(f"other {wall_s - phase_seconds(s):.1f}s  = total {wall_s:.1f}s")
    peaks = [v for k, v in s.items() if k.endswith("_peak_gb")]
    peak = f"  peak {max(peaks):.2f} GB" if peaks else ""
    return "  ".join(parts) + peak + cache_summary(s)
