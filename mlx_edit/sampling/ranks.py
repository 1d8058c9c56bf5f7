"""One edit shared by the ranks of an `mlx.launch` run (issue 31; ARCHITECTURE.md).

What the ranks share is decided per edit (`split`): the windows of a windowed step
(sampling/tiles.py: each rank evaluates its `share`) or, without windows, true CFG's two
branches (sampling/compiled.py `make_step(branches=...)`: rank 0 the prompt's velocity,
rank 1 the negative prompt's). Every exchange is one `all_gather` of this rank's results,
which every rank then combines in the single process's order, so any number of ranks
gives the single process's latents bit for bit (a sum over ranks, `all_sum`, re-associates
the window sums: ~1e-7 relative, a few PNG pixels off).

A lost rank ends the run on every rank: the ring backend fails the collective when a
peer's socket closes (RankLost, one line); peers that stay silent (a hung rank, a host off
the network) are caught by a watchdog (`all_gather`'s wait limit, then the process exits,
status 2: a blocked collective cannot be interrupted); and after `stop_together` the
SIGTERM with which mlx.launch stops the remaining ranks is a RankLost too.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

TIMEOUT_ENV = "MLX_EDIT_RANK_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
EXIT_STATUS = 2  # the CLI's status for errors a user can act on (mlx_edit/cli/errors.py)
BRANCHES = ("prompt", "negative_prompt")  # true CFG's, in rank order

_SPLIT = {"edit": True}  # False: every rank runs its own edits (`local_edits`)
_STATE = {"since": None, "ending": False}  # last exchange (monotonic s); a RankLost raised


class RankLost(ConnectionError):
    """Another rank of the run ended (its connection closed) or mlx.launch stopped this
    one: the edit is abandoned on every rank, nothing is written. A ConnectionError (an
    OSError): the CLI shows it as one line, status 2."""


@contextmanager
def local_edits() -> Iterator[None]:
    """Within: nothing of an edit is shared over ranks (`mlx-edit batch` under
    mlx.launch, where each rank edits its own lines: `rank_group` is None)."""
    before, _SPLIT["edit"] = _SPLIT["edit"], False
    try:
        yield
    finally:
        _SPLIT["edit"] = before


def rank_group():
    """The `mx.distributed` group of an `mlx.launch` run with several ranks whose edit is
    shared, else None (one process, or `local_edits`: nothing is exchanged). The first
    call starts the clock of the first exchange's wait limit."""
    if not (_SPLIT["edit"] and mx.distributed.is_available()):
        return None
    group = mx.distributed.init()
    if group.size() < 2:
        return None
    if _STATE["since"] is None:
        _STATE["since"] = time.monotonic()
    return group


def share(count: int, size: int) -> list[list[int]]:
    """The indices 0..count-1 (windows) of each of `size` ranks: contiguous runs whose
    lengths differ by at most one (every window has the same token count, so this
    balances the tokens; a rank beyond the count gets none)."""
    return [list(map(int, part)) for part in np.array_split(np.arange(count), size)]


@dataclass(frozen=True)
class Split:
    """How the ranks of `group` share one edit: kind "windows" (per_rank: windows each
    rank evaluates per step), "true_cfg" (per_rank: the branch each rank evaluates, ""
    idle) or "none" (every rank runs the whole edit: nothing to share)."""

    group: object
    kind: str
    per_rank: tuple

    @property
    def size(self) -> int:
        return len(self.per_rank)

    def metadata(self) -> dict:
        """The output's `ranks` record: count, split, per_rank."""
        return {"ranks": {"count": self.size, "split": self.kind,
                          "per_rank": list(self.per_rank)}}

    def label(self) -> str:
        """The progress label: "2 ranks (windows 2+2)", "2 ranks (true CFG: prompt |
        negative_prompt)", "2 ranks"."""
        head = f"{self.size} ranks"
        if self.kind == "windows":
            return f"{head} (windows {'+'.join(map(str, self.per_rank))})"
        if self.kind == "true_cfg":
            return f"{head} (true CFG: {' | '.join(b or 'idle' for b in self.per_rank)})"
        return head


def split(windows: int | None, cfg: bool, cached: bool) -> Split | None:
    """What the ranks of this run share of an edit with `windows` windows per step (None:
    not windowed), true CFG on or not, a step cache or not; None for one rank.
    Windows, when there are windows (each rank both branches of its windows: the exchange
    stays one set of window updates, and any number of ranks divides the work); else true
    CFG's branches over two ranks (more ranks idle), unless a step cache decides per
    branch (its statistics live on one rank: not split); else nothing."""
    group = rank_group()
    if group is None:
        return None
    size = group.size()
    if windows is not None:
        return Split(group, "windows", tuple(len(s) for s in share(windows, size)))
    if cfg and not cached:
        return Split(group, "true_cfg", tuple(BRANCHES) + ("",) * (size - 2))
    return Split(group, "none", ("",) * size)


def wait_limit() -> float:
    """Seconds a rank waits in an exchange for its peers: MLX_EDIT_RANK_TIMEOUT (default
    300) plus twice this rank's own time since its previous exchange (or since the group
    was made: the first exchange also waits out the peers' model loads). Ranks do equal
    shares, so a peer needing longer than that has stopped or lost the network."""
    value = os.environ.get(TIMEOUT_ENV)
    base = DEFAULT_TIMEOUT_S if value in (None, "") else float(value)
    since = _STATE["since"]
    return base + (0.0 if since is None else 2.0 * (time.monotonic() - since))


def all_gather(x: mx.array, group) -> mx.array:
    """`mx.distributed.all_gather(x)` over `group`, evaluated: (size * x.shape[0], ...),
    rank r's x at [r * k : (r + 1) * k]. x (this rank's work) is evaluated first; the
    peers then get `wait_limit()` seconds, after which the process prints one line and
    exits (status 2). Raises RankLost when a peer's connection closed (it died)."""
    mx.eval(x)
    limit = wait_limit()
    watchdog = threading.Timer(limit, _silent_peers, (group.rank(), limit))
    watchdog.daemon = True
    watchdog.start()
    try:
        out = mx.distributed.all_gather(x, group=group)
        mx.eval(out)
    except RuntimeError as e:  # the ring backend fails pending exchanges of a closed peer
        _STATE["ending"] = True
        raise RankLost(f"rank {group.rank()}: another rank of the run ended ({e}); "
                       "the edit is stopped, nothing written") from None
    finally:
        watchdog.cancel()
    _STATE["since"] = time.monotonic()
    return out


def _silent_peers(rank: int, limit: float) -> None:
    sys.stderr.write(f"\nError: rank {rank}: no answer from the other ranks in {limit:.0f} s "
                     f"(a rank hangs or its host left the network; {TIMEOUT_ENV} sets the "
                     "wait); the edit is stopped, nothing written\n")
    sys.stderr.flush()
    os._exit(EXIT_STATUS)  # the main thread is blocked in the collective


def stop_together(group) -> None:
    """From now on (main thread; the CLI's edit under mlx.launch with several ranks),
    SIGTERM, how mlx.launch stops the other ranks when one exits with an error, raises
    RankLost: one line, status 2, outputs not yet committed not written. A SIGTERM after
    a RankLost was raised is ignored (the run is already ending)."""
    def on_term(signum, frame):
        if not _STATE["ending"]:
            _STATE["ending"] = True
            raise RankLost(f"rank {group.rank()}: stopped by the launcher: another rank "
                           "of the run ended; nothing written")

    signal.signal(signal.SIGTERM, on_term)
