"""Batches of edits from a JSON Lines manifest: validated up front, resumable, shared out
across the ranks of an `mx.distributed` group (`mlx.launch`).

A manifest line is one JSON object:

    {"id": "shoe-1", "image": "shoe1.jpg", "mask": "shoe1-mask.png", "prompt": "a red shoe",
     "steps": 28, "seed": 7}

Keys: `image` (path, relative to the manifest's folder), `prompt`, `mode` (inpaint, the
default; outpaint; edit), `mask` (a path; inpaint needs it, or `mask_points`
[[x, y], ...] (+ `mask_negative`) / `mask_box` [x0, y0, x1, y1] to segment one with SAM
2.1, or `mask_text` "the sky" (+ `mask_threshold`, `mask_instances`): SAM 3), `references`
(paths: an edit's further images; a FLUX.2 [klein] inpaint's one reference for the
repainted area), `id` (the output name: letters, digits, `._-`; default: the line number
and the image's name), and any `EditOptions` field the mode takes (mlx_edit.options.FIELDS).
Shared defaults (the command's options) apply where a line says nothing. A line without
a seed gets one from its id, so re-runs and every rank agree.

Outputs go to `DIR/<id>.png` (`<id>-0.png`, ... with num_images > 1), checked before
any line runs against every input of the manifest and the files of DIR (`check_outputs`),
written together and atomically; then one record is appended (and fsynced) to the
rank's part file `DIR/.results.<rank>.jsonl`. Rank 0 merges every record into `DIR/results.jsonl` at the
end. A line is done when its last record has status ok, the same parameter hash (inputs'
size and mtime, prompt, options, seed, model) and its outputs exist; anything else is
(re)done, so a killed run loses at most the line in flight and leaves no partial file.
"""

from __future__ import annotations

from collections.abc import Callable

import hashlib
import json
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_edit.imaging.images import InputError
from mlx_edit.options import FIELDS, MAX_SEED, EditOptions, check_prompt

BATCH_MODES = ("inpaint", "outpaint", "edit")
RECORD_KEYS = ("id", "image", "mask", "mask_points", "mask_negative", "mask_box", "prompt",
               "mode", "references")
RESULTS = "results.jsonl"
# Lines per real batch when --batch-size is not given (the memory estimate may allow
# more): a kill loses the group in flight, and progress moves group by group.
DEFAULT_GROUP_LINES = 8
_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


@dataclass
class Line:
    """One valid manifest line: where it came from, its inputs and checked options."""

    number: int  # 1-based line number in the manifest
    id: str
    mode: str
    image: Path
    prompt: str
    options: EditOptions
    mask: Any = None  # a Path, a list of segment.Points/Box specs, a TextMask, or None
    size: tuple[int, int] = (0, 0)  # the image's (width, height)
    params: dict = field(default_factory=dict)  # what the parameter hash covers
    references: list[Path] = field(default_factory=list)  # edit's further images, klein's

    @property
    def pixels(self) -> int:
        w, h = self.size
        o = self.options
        return (w + o.left + o.right) * (h + o.top + o.bottom) * o.num_images

    def outputs(self, folder: Path) -> list[Path]:
        n = self.options.num_images
        names = [f"{self.id}.png"] if n == 1 else [f"{self.id}-{i}.png" for i in range(n)]
        return [folder / name for name in names]

    def inputs(self) -> list[Path]:
        """Every file the line reads: its image, mask, references and conditioning images."""
        mask = [self.mask] if isinstance(self.mask, Path) else []
        return [self.image, *mask, *self.references, *self.options.input_files()]

    def param_hash(self, run: dict) -> str:
        """SHA-256 of the line's parameters and the run's (model, quantize, LoRAs)."""
        blob = json.dumps([self.params, run], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _file_id(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _default_seed(line_id: str) -> int:
    return int.from_bytes(hashlib.sha256(line_id.encode()).digest()[:4], "big") % (MAX_SEED // 2)


def _path(base: Path, value: Any, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise InputError(f"{key} must be a file path (a string)")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _mask(d: dict, base: Path, mode: str, size: tuple[int, int], options: EditOptions):
    """The line's mask: a checked path, click specs checked against the image, the
    text_segment.TextMask of its mask_text (SAM 3), or None."""
    from mlx_edit.imaging.images import load_mask

    clicks = [k for k in ("mask_points", "mask_negative", "mask_box") if k in d]
    if sum(["mask" in d, bool(clicks), options.mask_text is not None]) > 1:
        raise InputError("give one of mask, mask_points/mask_box or mask_text")
    if mode == "outpaint" and ("mask" in d or clicks):
        raise InputError("outpaint takes no mask")
    if options.mask_text is not None:
        from mlx_edit.editing.text_segment import text_mask

        return text_mask(options)
    if "mask" in d:
        path = _path(base, d["mask"], "mask")
        with warnings.catch_warnings():  # the edit itself warns about a resized mask
            warnings.simplefilter("ignore")
            load_mask(path, size)
        return path
    if not clicks:
        if mode == "inpaint":
            raise InputError("inpaint needs mask (or mask_points / mask_box, or mask_text)")
        return None
    from mlx_edit.editing.segment import Box, Points, prompt_arrays, prompts_from_specs

    try:
        pos = [tuple(map(float, p)) for p in d.get("mask_points", [])]
        neg = [tuple(map(float, p)) for p in d.get("mask_negative", [])]
        specs = [Points(tuple(pos + neg), tuple([1] * len(pos) + [0] * len(neg)))] \
            if pos or neg else []
        if "mask_box" in d:
            specs.append(Box(*map(float, d["mask_box"])))
    except (TypeError, ValueError):
        raise InputError("mask_points/mask_negative must be [[x, y], ...] and mask_box "
                         "[x0, y0, x1, y1] (numbers)") from None
    prompt_arrays(**prompts_from_specs(specs), image_size=(size[1], size[0]), input_size=1024)
    return specs


def _references(d: dict, base: Path, mode: str, variant) -> list[Path]:
    """The line's reference images, checked: paths that open as images; an edit takes
    several, a FLUX.2 [klein] inpaint one, FLUX.1 inpaint and outpaint none; on klein
    each (and an edit's image) follows klein's size rules. Raises InputError."""
    from mlx_edit.imaging.images import load_image

    refs = d.get("references", [])
    if not isinstance(refs, list):
        raise InputError("references must be a list of image paths")
    flux2 = variant is not None and variant.family == "flux2"
    most = len(refs) if mode == "edit" else 1 if mode == "inpaint" and flux2 else 0
    if len(refs) > most:
        raise InputError(f"{mode} takes no references (an edit's further images, or one "
                         "for a FLUX.2 [klein] inpaint)" if not most else
                         f"{mode} takes one reference, got {len(refs)}")
    paths = [_path(base, r, "references") for r in refs]
    if flux2:
        from mlx_edit.conditioning.klein import check_reference

        for path in [_path(base, d["image"], "image")] * (mode == "edit") + paths:
            check_reference(load_image(path), f"image {path.name}")
    else:
        for path in paths:
            load_image(path)
    return paths


def parse_line(text: str, number: int, base: Path, defaults: dict,
               variant_for: Callable | None = None) -> Line:
    """One manifest line -> Line, reading its image and mask now. `defaults`: options
    applied where the line gives none (only those its mode takes). variant_for(mode): the
    variant (mlx_edit.variants) the line's mode runs on, whose defaults and refusals its
    options follow (None: FLUX.1's; ValueError: no model for the mode). Raises
    InputError."""
    from mlx_edit.imaging.images import load_image

    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(d, dict):
        raise InputError(f"a line must be a JSON object, got {type(d).__name__}")
    mode = d.get("mode", "inpaint")
    if mode not in BATCH_MODES:
        raise InputError(f"mode must be one of {', '.join(BATCH_MODES)}, got {mode!r}")
    for key in ("image", "prompt"):
        if key not in d:
            raise InputError(f"missing {key!r}")
    check_prompt(d["prompt"])
    image = _path(base, d["image"], "image")
    line_id = d.get("id", f"{number:06d}-{image.stem}")
    if not isinstance(line_id, str) or not _ID.fullmatch(line_id):
        raise InputError(f"id must be 1-128 letters, digits or ._- (not starting with .), "
                         f"got {line_id!r}")
    opts = {k: v for k, v in d.items() if k not in RECORD_KEYS}
    for k in opts:
        if k not in FIELDS:
            raise InputError(f"unknown key {k!r}; known: {', '.join(RECORD_KEYS)} and the "
                             "edit options")
    opts = {**{k: v for k, v in defaults.items() if mode in FIELDS[k][0]}, **opts}
    opts.setdefault("seed", _default_seed(line_id))
    try:
        variant = variant_for(mode) if variant_for else None
    except ValueError as e:
        raise InputError(str(e)) from None
    options = EditOptions.from_dict(opts, mode, variant)
    size = load_image(image).size
    mask = _mask(d, base, mode, size, options)
    refs = _references(d, base, mode, variant)
    params = {"mode": mode, "image": _file_id(image), "prompt": d["prompt"],
              "options": {k: opts[k] for k in sorted(opts)},
              "mask": _file_id(mask) if isinstance(mask, Path) else
              {k: d[k] for k in ("mask_points", "mask_negative", "mask_box") if k in d},
              **({"references": [_file_id(r) for r in refs]} if refs else {})}
    return Line(number, line_id, mode, image, d["prompt"], options, mask, size, params, refs)


def read_manifest(path: Path, defaults: dict | None = None,
                  variant_for: Callable | None = None) -> tuple[list[Line], list[str]]:
    """Every line of the manifest checked (blank lines skipped): (valid lines, one error
    message per bad line, 'line N: ...'). A repeated id is an error on its later line.
    Raises InputError when the manifest itself cannot be read."""
    path = Path(path)
    try:
        texts = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the manifest {path}: {e}") from None
    lines, errors, seen, names = [], [], {}, {}
    for number, text in enumerate(texts, 1):
        if not text.strip():
            continue
        try:
            line = parse_line(text, number, path.parent, defaults or {}, variant_for)
            if line.id in seen:
                raise InputError(f"id {line.id!r} is already used on line {seen[line.id]}")
            for out in line.outputs(Path()):  # id "a" with 2 images writes a-0.png;
                if out.name.lower() in names:  # macOS volumes ignore case by default
                    raise InputError(f"output {out.name} is also line "
                                     f"{names[out.name.lower()]}'s; choose another id")
        except InputError as e:
            errors.append(f"line {number}: {e}")
            continue
        seen[line.id] = number
        names.update((out.name.lower(), number) for out in line.outputs(Path()))
        lines.append(line)
    return lines, errors


def shard(weights: list[int], size: int) -> list[list[int]]:
    """Indices of `weights` split into `size` disjoint shares of balanced total weight:
    largest first, each to the least loaded share (ties: the lowest rank), so the
    largest images are spread over the ranks. Deterministic."""
    shares: list[list[int]] = [[] for _ in range(size)]
    loads = [0] * size
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        r = min(range(size), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += weights[i]
    return [sorted(s) for s in shares]


def named_files(manifest: Path) -> list[Path]:
    """The manifest and every existing file any of its lines names (any string value,
    as a path relative to the manifest's folder or as given), valid lines or not: what
    no output of the batch may replace."""
    base, found = manifest.parent, {manifest}

    def walk(v):
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            for item in v:
                walk(item)
        elif isinstance(v, str) and 0 < len(v) < 4096 and "\x00" not in v:
            for p in {Path(v).expanduser(), base / Path(v).expanduser()}:
                try:
                    if p.is_file():
                        found.add(p)
                except OSError:  # a name too long for the file system
                    pass
    for text in manifest.read_text(encoding="utf-8").splitlines():
        try:
            walk(json.loads(text))
        except json.JSONDecodeError:
            continue
    return sorted(found)


def _is_results(path: Path) -> bool:
    """True when every line of `path` is one of our result records (so it may be
    replaced by the merged results): a foreign results.jsonl is the user's."""
    try:
        texts = path.read_text(encoding="utf-8").splitlines()
        return all(isinstance(r := json.loads(t), dict) and {"id", "hash", "status"} <= set(r)
                   for t in texts if t.strip())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def check_outputs(lines: list[Line], folder: Path, manifest: Path,
                  overwrite: bool = False) -> tuple[list[Line], list[str]]:
    """Before any line runs, every output of every line, and results.jsonl, checked with
    the rules of single edits (`imaging.images.check_output`): never one of the batch's
    inputs (every line's image, mask and conditioning images, every file a line names,
    the manifest), even with `overwrite`; an existing file only when this batch's records
    wrote it (a record of its id or listing it) or with `overwrite`.
    Returns (the lines whose outputs are safe, one 'line N: ...' error per other line).
    Raises InputError / OutputExistsError for results.jsonl (the whole batch writes it)."""
    from mlx_edit.imaging.images import OutputExistsError, check_output

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return lines, []  # a new folder holds nothing to lose (and no input)
    inputs = named_files(Path(manifest)) + [p for ln in lines for p in ln.inputs()]
    results = folder / RESULTS
    ours = _is_results(results)
    try:
        check_output(results, overwrite or ours, inputs)
    except OutputExistsError:
        raise OutputExistsError(f"{results} already exists and is not this batch's results; "
                                "pass --overwrite to replace it") from None
    for part in folder.glob(".results.*.jsonl"):  # the ranks append to these
        check_output(part, True, inputs, probe=False)
    records = read_records(folder, include_results=ours)
    claimed = {Path(o).name for r in records.values() for o in r.get("outputs") or []}
    safe, errors = [], []
    for ln in lines:
        try:
            for out in ln.outputs(folder):
                mine = ln.id in records or out.name in claimed
                check_output(out, overwrite or mine, inputs, probe=False)
        except OutputExistsError:
            errors.append(f"line {ln.number}: {out} already exists and this batch did not "
                          "write it; pass --overwrite to replace it")
        except InputError as e:
            errors.append(f"line {ln.number}: {e}")
        else:
            safe.append(ln)
    return safe, errors


# ------------------------------------------------------------------ results


def read_records(folder: Path, include_results: bool = True) -> dict[str, dict]:
    """The latest record per id from results.jsonl (unless not `include_results`) and the
    ranks' part files (a torn last line, from a kill mid-write, is ignored; a line without
    an id and hash is no record)."""
    records: list[dict] = []
    merged = [folder / RESULTS] if include_results else []
    for f in [*merged, *sorted(folder.glob(".results.*.jsonl"))]:
        if not f.is_file():
            continue
        for text in f.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and {"id", "hash"} <= set(rec):
                records.append(rec)
    latest: dict[str, dict] = {}
    for rec in sorted(records, key=lambda r: r.get("finished", 0)):
        latest[rec["id"]] = rec
    return latest


def is_done(line: Line, record: dict | None, folder: Path, digest: str) -> bool:
    """The line's outputs exist and its last record is a success with the same hash."""
    return (record is not None and record.get("status") == "ok"
            and record.get("hash") == digest
            and all(p.is_file() for p in line.outputs(folder)))


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line and fsync it (a kill leaves at most a torn last line)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def remove_stale_temps(folder: Path, lines: list[Line]) -> int:
    """Remove the hidden temp files a killed run (kill -9) left next to the lines'
    outputs (`.<name>.<pid>.<hex>.tmp`, see imaging.images). Call before any rank writes.
    Returns how many were removed."""
    names = {p.name for ln in lines for p in ln.outputs(folder)} | {RESULTS}
    n = 0
    for f in folder.glob(".*.tmp"):
        if f.name[1:].rsplit(".", 3)[0] in names:
            f.unlink(missing_ok=True)
            n += 1
    return n


def skipped_records(errors: list[str]) -> list[dict]:
    """The records of invalid lines skipped by --skip-invalid: {"line", "status":
    "skipped", "error"} from read_manifest's 'line N: ...' messages (no id: a resumed run
    checks those lines again)."""
    out = []
    for e in errors:
        head, _, msg = e.partition(": ")
        out.append({"line": int(head.split()[-1]), "status": "skipped", "error": msg})
    return out


def merge_results(folder: Path, order: list[str], skipped: list[dict] = ()) -> Path:
    """Write every id's latest record into results.jsonl atomically (manifest order
    first), then the `skipped` lines' records; then remove the part files."""
    from mlx_edit.imaging.images import write_together

    latest = read_records(folder)
    ids = [i for i in order if i in latest] + [i for i in latest if i not in order]
    records = [latest[i] for i in ids] + list(skipped)
    data = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
    parts = sorted(folder.glob(".results.*.jsonl"))
    write_together([(folder / RESULTS, lambda f: f.write(data.encode()))], overwrite=True)
    for p in parts:
        p.unlink(missing_ok=True)
    return folder / RESULTS


# ------------------------------------------------------------------ running


def edit_line(pipe, line: Line, progress=None) -> list:
    """Run the line's edit on `pipe` (FluxFill for inpaint/outpaint, FluxKontext for
    edit; FluxKlein for either on a klein folder); returns its PIL images."""
    if line.mode == "inpaint":
        extra = {"reference": line.references[0]} if line.references else {}  # klein's
        return pipe.inpaint(line.image, line.mask, line.prompt, line.options,
                            progress=progress, **extra)
    if line.mode == "outpaint":
        return pipe.outpaint(line.image, line.prompt, line.options, progress=progress)
    return pipe.edit([line.image, *line.references], line.prompt, line.options,
                     mask=line.mask, progress=progress)


def write_line(line: Line, images: list, folder: Path) -> list[Path]:
    """The line's images as PNGs (with their metadata and the photo's colour profile),
    written together and atomically; a stale output of the same id is replaced, an
    input of the line never (`check_outputs` checked every input of the batch before)."""
    from mlx_edit.imaging.images import load_image, png_writer, write_together

    icc = load_image(line.image).info.get("icc_profile")
    files = [(p, png_writer(img, dict(img.info), icc))
             for p, img in zip(line.outputs(folder), images)]
    return write_together(files, overwrite=True, protect=line.inputs())


def new_record(line: Line, digest: str, rank: int) -> dict:
    """The fields of a line's result record known before it runs."""
    return {"id": line.id, "line": line.number, "mode": line.mode, "image": str(line.image),
            "prompt": line.prompt, "seeds": line.options.seeds, "hash": digest, "rank": rank}


def close_record(rec: dict, start: float, *, outputs: list[Path] | None = None,
                 stats: dict | None = None, error: BaseException | None = None) -> dict:
    """`rec` completed: status ok with its outputs and numeric stats, or error with the
    message; `seconds` since `start` (a `now()` value) and the `finished` time."""
    if error is None:
        rec.update(status="ok", outputs=[str(p) for p in outputs or []],
                   stats={k: round(v, 4) for k, v in (stats or {}).items()
                          if isinstance(v, (int, float))})
    else:
        rec.update(status="error", error=f"{type(error).__name__}: {error}", outputs=[])
    rec.update(seconds=round(now() - start, 3), finished=now())
    return rec


def run_line(pipes, line: Line, folder: Path, digest: str, rank: int) -> dict:
    """Edit and write one line with `pipes(mode)` (the loaded pipeline for the mode);
    returns its result record (status ok, or error with the message: a failed line never
    stops the batch). A model that fails to load (WeightLoadError), Ctrl-C and kills
    pass through."""
    start = now()
    rec = new_record(line, digest, rank)
    pipe = pipes(line.mode)  # a model that cannot load stops the batch (one-line error)
    try:
        outputs = write_line(line, edit_line(pipe, line), folder)
        return close_record(rec, start, outputs=outputs, stats=pipe.last_stats)
    except Exception as e:  # noqa: BLE001  (recorded; the batch goes on)
        return close_record(rec, start, error=e)


def now() -> float:
    return time.time()
