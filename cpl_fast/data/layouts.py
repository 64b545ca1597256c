"""Readers for the standard restoration dataset layouts, with an up-front validation report.

Each reader walks a folder tree, pairs degraded inputs with their ground truth (or, where a benchmark
synthesises the degradation, pairs the clean image with a degradation name from
:mod:`cpl_fast.data.degradations`) and records every problem it meets (missing folders, listed files
that do not exist, inputs without a target, targets without an input, names that do not follow the
layout's convention) instead of stopping at the first one. :func:`verify_layout` returns that report;
:func:`load_layout` returns the samples and raises :class:`LayoutError` (carrying the report) when
there are problems, so a training run never starts on a half-broken tree.

Layouts (see ``LAYOUTS``): ``promptir3``, ``promptir5``, ``allweather``, ``cdd11``, ``weatherbench``,
``paired``.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpl_fast.data.degradations import PROMPTIR_SIGMAS
from cpl_fast.data.io import is_image_file

_MAX_LISTED = 20  # problems printed per report; the full list stays in Report.problems


@dataclass(frozen=True)
class Sample:
    """One training or test pair.

    ``input`` is the degraded file, or ``None`` when the input is synthesised from ``target`` with the
    degradation ``degradation`` (a name in ``DEGRADATIONS``) and ``params``. ``task`` is the fine task
    name (``"denoise_25"``, ``"derain"``, ``"low_haze"``...); ``subset`` names the test set it belongs to
    (``"bsd68"``, ``"Rain100L"``...; empty for training samples).
    """

    target: Path
    task: str
    input: Path | None = None
    degradation: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    subset: str = ""

    def __post_init__(self) -> None:
        if (self.input is None) == (self.degradation is None):
            raise ValueError("a Sample needs exactly one of `input` (a file) or `degradation` (a name)")

    @property
    def name(self) -> str:
        """File stem identifying the sample (the input's when there is an input file)."""
        return (self.input if self.input is not None else self.target).stem


@dataclass
class Report:
    """What a layout reader found: samples per task, problems (errors) and notes (information)."""

    layout: str
    root: Path
    split: str | None
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        where = f"{self.root}" + (f" (split: {self.split})" if self.split else "")
        lines = [f"layout {self.layout} at {where}: {'OK' if self.ok else 'PROBLEMS FOUND'}"]
        lines.append(f"  samples: {self.total}")
        lines += [f"    {task}: {n}" for task, n in sorted(self.counts.items())]
        lines += [f"  note: {n}" for n in self.notes]
        if self.problems:
            lines.append(f"  problems ({len(self.problems)}):")
            lines += [f"    - {p}" for p in self.problems[:_MAX_LISTED]]
            if len(self.problems) > _MAX_LISTED:
                lines.append(f"    ... and {len(self.problems) - _MAX_LISTED} more")
        return "\n".join(lines)


class LayoutError(ValueError):
    """A dataset tree does not follow its layout; ``.report`` lists every problem."""

    def __init__(self, report: Report) -> None:
        super().__init__(str(report))
        self.report = report


# ---------------------------------------------------------------------------------------- helpers

class _Scan:
    """Collects samples and problems while a reader walks the tree."""

    def __init__(self, root: Path, report: Report) -> None:
        self.root = root
        self.report = report
        self.samples: list[Sample] = []

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def problem(self, msg: str) -> None:
        self.report.problems.append(msg)

    def note(self, msg: str) -> None:
        self.report.notes.append(msg)

    def require_dir(self, path: Path) -> bool:
        if path.is_dir():
            return True
        self.problem(f"missing folder {self.rel(path)}/")
        return False

    def images(self, folder: Path, recursive: bool = False) -> list[Path]:
        pattern = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(p for p in pattern if p.is_file() and is_image_file(p))

    def read_list(self, path: Path) -> list[str]:
        """The non-empty lines of a file list; a list that is not UTF-8 text, and lines listed twice, are
        problems naming the list."""
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            self.problem(f"file list {self.rel(path)} is not UTF-8 text "
                         f"(byte 0x{exc.object[exc.start]:02x} at offset {exc.start})")
            return []
        except OSError as exc:
            self.problem(f"file list {self.rel(path)} cannot be read ({exc.strerror or exc})")
            return []
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        twice = [line for line, n in Counter(lines).items() if n > 1]
        if twice:
            shown = ", ".join(twice[:5]) + (f", ... ({len(twice) - 5} more)" if len(twice) > 5 else "")
            entries = "entry" if len(twice) == 1 else "entries"
            self.problem(f"file list {self.rel(path)} lists {len(twice)} {entries} more than once: {shown}")
            lines = list(dict.fromkeys(lines))
        return lines

    def inside(self, listfile: Path, folder: Path, line: str) -> Path | None:
        """``folder / line`` when it stays inside the dataset root; a problem naming the list otherwise.

        The test is on the path as written (``..``, absolute paths), not on where symbolic links in the
        tree lead, so a tree whose folders are links to another disk stays usable."""
        path = Path(os.path.normpath(folder / line))
        try:
            path.relative_to(os.path.normpath(self.root))
        except ValueError:
            self.problem(f"{self.rel(listfile)}: entry {line!r} points outside the dataset root {self.root}")
            return None
        return path

    def listed(self, listfile: Path, folder: Path) -> list[Path]:
        """The entries of a file list as paths under ``folder`` (those that leave the root are problems)."""
        paths = (self.inside(listfile, folder, line) for line in self.read_list(listfile))
        return [p for p in paths if p is not None]

    def pair(self, input_dir: Path, target_dir: Path, task: str, subset: str = "", by: str = "stem") -> None:
        """Pair every input with the target of the same file name (``by="name"``) or stem (``"stem"``)."""
        if not (self.require_dir(input_dir) & self.require_dir(target_dir)):
            return
        inputs, targets = self.images(input_dir), self.images(target_dir)
        if not inputs:
            self.problem(f"no images in {self.rel(input_dir)}/")
        key: Callable[[Path], str] = (lambda p: p.stem) if by == "stem" else (lambda p: p.name)
        target_by_key: dict[str, Path] = {}
        for t in targets:
            if key(t) in target_by_key:
                self.problem(f"two targets share the name {key(t)!r} in {self.rel(target_dir)}/")
            target_by_key[key(t)] = t
        used: set[str] = set()
        for i in inputs:
            t = target_by_key.get(key(i))
            if t is None:
                self.problem(f"no target for input {self.rel(i)} in {self.rel(target_dir)}/")
                continue
            if key(i) in used:
                self.problem(f"two inputs share the name {key(i)!r} in {self.rel(input_dir)}/")
                continue
            used.add(key(i))
            self.samples.append(Sample(target=t, input=i, task=task, subset=subset))
        for k in sorted(set(target_by_key) - used):
            self.problem(f"no input for target {self.rel(target_by_key[k])} in {self.rel(input_dir)}/")

    def synthesised(self, clean: Iterable[Path], sigmas: Iterable[int], subset: str = "") -> None:
        """One noise sample per clean image and sigma (PromptIR's quantised protocol)."""
        clean = list(clean)
        for s in sigmas:
            self.samples += [Sample(target=c, task=f"denoise_{s}", degradation="noise_promptir",
                                    params={"sigma": s}, subset=subset) for c in clean]


def _existing(scan: _Scan, paths: Iterable[Path], what: str) -> list[Path]:
    out = []
    for p in paths:
        if p.is_file():
            out.append(p)
        else:
            scan.problem(f"{what} {scan.rel(p)} does not exist")
    return out


# ------------------------------------------------------------------------------ PromptIR / AdaIR

_HAZY_NAME = re.compile(r"^(?P<id>[^_]+)_[^_]+_[^_]+$")  # OTS: <id>_<A>_<beta>.<ext>


def _promptir_train_denoise(scan: _Scan, train: Path, lists: Path | None) -> None:
    folder = train / "Denoise"
    if not scan.require_dir(folder):
        return
    files = scan.images(folder)
    if lists is not None:
        candidates = [lists / "noisy" / "denoise.txt", lists / "noisy" / "denoise_airnet.txt"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            scan.problem(f"missing file list {scan.rel(candidates[0])} (or denoise_airnet.txt)")
            return
        if len(found) == 2:
            scan.note(f"both denoise lists exist; using {scan.rel(found[0])}")
        by_name = {f.name: f for f in files}
        names = scan.read_list(found[0])
        for n in names:
            if n not in by_name:
                scan.problem(f"{scan.rel(found[0])} lists {n}, missing from {scan.rel(folder)}/")
        files = [by_name[n] for n in names if n in by_name]
    if not files:
        scan.problem(f"no clean images for denoising in {scan.rel(folder)}/")
    scan.synthesised(files, PROMPTIR_SIGMAS)


def _promptir_train_derain(scan: _Scan, train: Path, lists: Path | None) -> None:
    folder = train / "Derain"
    if not (scan.require_dir(folder / "rainy") & scan.require_dir(folder / "gt")):
        return
    if lists is not None:
        listfile = lists / "rainy" / "rainTrain.txt"
        if not listfile.is_file():
            scan.problem(f"missing file list {scan.rel(listfile)}")
            return
        rainy = _existing(scan, scan.listed(listfile, folder), "listed rainy image")
    else:
        rainy = scan.images(folder / "rainy")
    matched: set[Path] = set()
    for r in rainy:
        if not r.name.startswith("rain-"):
            scan.problem(f"rainy image {scan.rel(r)} is not named rain-<N>.<ext>")
            continue
        gt = folder / "gt" / ("norain-" + r.name[len("rain-"):])
        if not gt.is_file():
            scan.problem(f"no ground truth {scan.rel(gt)} for {scan.rel(r)}")
            continue
        matched.add(gt)
        scan.samples.append(Sample(target=gt, input=r, task="derain"))
    if lists is None:
        for gt in scan.images(folder / "gt"):
            if gt not in matched:
                scan.problem(f"no rainy image for ground truth {scan.rel(gt)}")


def _promptir_train_dehaze(scan: _Scan, train: Path, lists: Path | None) -> None:
    folder = train / "Dehaze"
    if not (scan.require_dir(folder / "synthetic") & scan.require_dir(folder / "original")):
        return
    if lists is not None:
        listfile = lists / "hazy" / "hazy_outside.txt"
        if not listfile.is_file():
            scan.problem(f"missing file list {scan.rel(listfile)}")
            return
        hazy = _existing(scan, scan.listed(listfile, folder), "listed hazy image")
    else:
        hazy = scan.images(folder / "synthetic", recursive=True)
    for h in hazy:
        m = _HAZY_NAME.match(h.stem)
        if m is None:
            scan.problem(f"hazy image {scan.rel(h)} is not named <id>_<A>_<beta>.<ext>")
            continue
        gt = folder / "original" / (m["id"] + h.suffix)  # PromptIR copies the extension from the hazy name
        if not gt.is_file():
            scan.problem(f"no ground truth {scan.rel(gt)} for {scan.rel(h)}")
            continue
        scan.samples.append(Sample(target=gt, input=h, task="dehaze"))


def _promptir_test(scan: _Scan, test: Path, five_task: bool) -> None:
    optional = ("urban100", "kodak24") if five_task else ("urban100",)
    for name in ("bsd68",) + optional:
        folder = test / "denoise" / name
        if not folder.is_dir():
            if name == "bsd68":
                scan.problem(f"missing folder {scan.rel(folder)}/")
            else:
                scan.note(f"optional test set {scan.rel(folder)}/ not present")
            continue
        files = scan.images(folder)
        if not files:
            scan.problem(f"no images in {scan.rel(folder)}/")
        scan.synthesised(files, PROMPTIR_SIGMAS, subset=name)
    scan.pair(test / "derain" / "Rain100L" / "input", test / "derain" / "Rain100L" / "target", "derain",
              subset="Rain100L", by="name")
    _sots_test(scan, test / "dehaze")
    if five_task:
        scan.pair(test / "deblur" / "gopro" / "input", test / "deblur" / "gopro" / "target", "deblur",
                  subset="gopro", by="name")
        scan.pair(test / "enhance" / "lol" / "input", test / "enhance" / "lol" / "target", "enhance",
                  subset="lol", by="name")


def _sots_test(scan: _Scan, folder: Path) -> None:
    """SOTS-outdoor as PromptIR stores it: input/<id>_<A>_<beta>.jpg, target/<id>.png."""
    if not (scan.require_dir(folder / "input") & scan.require_dir(folder / "target")):
        return
    targets = {t.stem: t for t in scan.images(folder / "target")}
    used: set[str] = set()
    inputs = scan.images(folder / "input")
    if not inputs:
        scan.problem(f"no images in {scan.rel(folder / 'input')}/")
    for h in inputs:
        ident = h.stem.split("_")[0]
        t = targets.get(ident)
        if t is None or t.suffix.lower() != ".png":
            scan.problem(f"no target {scan.rel(folder / 'target' / (ident + '.png'))} for {scan.rel(h)}")
            continue
        used.add(ident)
        scan.samples.append(Sample(target=t, input=h, task="dehaze", subset="SOTS"))
    for ident in sorted(set(targets) - used):
        scan.problem(f"no hazy input for target {scan.rel(targets[ident])}")


def _read_promptir(scan: _Scan, split: str, five_task: bool) -> None:
    if split == "test":
        if scan.require_dir(scan.root / "test"):
            _promptir_test(scan, scan.root / "test", five_task)
        return
    train = scan.root / "Train"
    if not scan.require_dir(train):
        return
    lists: Path | None = scan.root / "data_dir"
    if not lists.is_dir():
        scan.note("no data_dir/ file lists: every image in the training folders is used")
        lists = None
    _promptir_train_denoise(scan, train, lists)
    _promptir_train_derain(scan, train, lists)
    _promptir_train_dehaze(scan, train, lists)
    if five_task:
        scan.pair(train / "Deblur" / "blur", train / "Deblur" / "sharp", "deblur", by="name")
        scan.pair(train / "Enhance" / "low", train / "Enhance" / "gt", "enhance", by="name")


def _read_promptir3(scan: _Scan, split: str | None) -> None:
    _read_promptir(scan, split or "train", five_task=False)


def _read_promptir5(scan: _Scan, split: str | None) -> None:
    _read_promptir(scan, split or "train", five_task=True)


# ------------------------------------------------------------------------------------ AllWeather

def _swap_input_for_gt(path: Path) -> Path:
    """TransWeather's GT path: the ``input`` folder component replaced by ``gt``."""
    parts = list(path.parts)
    if "input" not in parts:
        raise ValueError(f"{path} has no 'input' folder")
    idx = len(parts) - 1 - parts[::-1].index("input")
    parts[idx] = "gt"
    return Path(*parts)


def _read_allweather(scan: _Scan, split: str | None) -> None:
    base = scan.root / (split or "train")
    if not scan.require_dir(base):
        return
    lists = sorted(base.glob("*.txt"))
    if not lists:
        scan.note(f"no file list in {scan.rel(base)}/: every <set>/input/ folder is used")
        sets = sorted(d for d in base.iterdir() if d.is_dir())
        if not sets:
            scan.problem(f"no <set>/ folders in {scan.rel(base)}/")
        for d in sets:
            scan.pair(d / "input", d / "gt", task=d.name, by="name")
        return
    for listfile in lists:
        for line in scan.read_list(listfile):
            rel = Path(line[2:] if line.startswith("./") else line)
            if scan.inside(listfile, base, str(rel)) is None:
                continue
            if "input" not in rel.parts:
                scan.problem(f"{scan.rel(listfile)}: line {line!r} has no input/ folder")
                continue
            inp, gt = base / rel, base / _swap_input_for_gt(rel)
            if not inp.is_file():
                scan.problem(f"{scan.rel(listfile)} lists {scan.rel(inp)}, which does not exist")
            elif not gt.is_file():
                scan.problem(f"no ground truth {scan.rel(gt)} for {scan.rel(inp)}")
            else:
                scan.samples.append(Sample(target=gt, input=inp, task=rel.parts[0], subset=listfile.stem))


# ----------------------------------------------------------------------------------------- CDD-11

CDD11_DEGRADED = ("low", "haze", "rain", "snow", "low_haze", "low_rain", "low_snow", "haze_rain", "haze_snow",
                  "low_haze_rain", "low_haze_snow")


def _read_cdd11(scan: _Scan, split: str | None) -> None:
    base = scan.root / (split or "train")
    if not (scan.require_dir(base) and scan.require_dir(base / "clear")):
        return
    clear = {p.name: p for p in scan.images(base / "clear")}
    if not clear:
        scan.problem(f"no images in {scan.rel(base / 'clear')}/")
    used: set[str] = set()
    for task in CDD11_DEGRADED:
        folder = base / task
        if not scan.require_dir(folder):
            continue
        for inp in scan.images(folder):
            t = clear.get(inp.name)
            if t is None:
                scan.problem(f"no clear image {scan.rel(base / 'clear' / inp.name)} for {scan.rel(inp)}")
                continue
            used.add(inp.name)
            scan.samples.append(Sample(target=t, input=inp, task=task))
    extra = sorted(d.name for d in base.iterdir() if d.is_dir() and d.name not in CDD11_DEGRADED + ("clear",))
    if extra:
        scan.note(f"folders ignored (not CDD-11 degradations): {', '.join(extra)}")
    unused = len(set(clear) - used)
    if unused:
        scan.note(f"{unused} clear image(s) have no degraded version")


# ----------------------------------------------------------------------------- WeatherBench, paired

WEATHERBENCH_TASKS = ("rain", "haze", "snow")


def _read_weatherbench(scan: _Scan, split: str | None) -> None:
    for task in WEATHERBENCH_TASKS:
        if scan.require_dir(scan.root / task):
            scan.pair(scan.root / task / "input", scan.root / task / "target", task)


def _read_paired(scan: _Scan, split: str | None) -> None:
    inp, tgt = scan.root / "input", scan.root / "target"
    if not (scan.require_dir(inp) & scan.require_dir(tgt)):
        return
    subdirs = sorted(d for d in inp.iterdir() if d.is_dir())
    loose = [p for p in inp.iterdir() if p.is_file() and is_image_file(p)]
    if subdirs and loose:
        scan.problem("input/ mixes images and task folders; use either input/<task>/ folders or images only")
        return
    if not subdirs:
        scan.pair(inp, tgt, task=scan.root.name)
        return
    for d in subdirs:
        scan.pair(d, tgt / d.name, task=d.name)
    extra = sorted(d.name for d in tgt.iterdir() if d.is_dir() and not (inp / d.name).is_dir())
    for name in extra:
        scan.problem(f"target/{name}/ has no matching input/{name}/")


# -------------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Layout:
    """A dataset layout: ``splits`` is ``None`` when the root already is one split."""

    name: str
    description: str
    splits: tuple[str, ...] | None
    read: Callable[[_Scan, str | None], None]


LAYOUTS: dict[str, Layout] = {
    "promptir3": Layout("promptir3", "PromptIR three-task (denoise, derain, dehaze): Train/ test/ data_dir/",
                        ("train", "test"), _read_promptir3),
    "promptir5": Layout("promptir5", "AdaIR/IDR five-task: promptir3 + Deblur (GoPro) and Enhance (LOL)",
                        ("train", "test"), _read_promptir5),
    "allweather": Layout("allweather", "TransWeather AllWeather: <split>/<set>/{input,gt} + <split>/*.txt",
                         ("train", "test"), _read_allweather),
    "cdd11": Layout("cdd11", "CDD-11: <split>/{clear,low,haze,...}/NNNNNN.png", ("train", "test"),
                    _read_cdd11),
    "weatherbench": Layout("weatherbench", "WeatherBench: {rain,haze,snow}/{input,target}", None,
                           _read_weatherbench),
    "paired": Layout("paired", "input/ and target/ with matching names, optionally input/<task>/", None,
                     _read_paired),
}


def _get_layout(layout: str) -> Layout:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[layout]


def scan_layout(layout: str, root: str | Path, split: str | None = None) -> tuple[list[Sample], Report]:
    """Read a tree: the samples found and the report (problems do not raise here)."""
    spec = _get_layout(layout)
    if spec.splits is None and split is not None:
        raise ValueError(f"layout {layout!r} has no splits; point the root at the split's folder instead")
    if spec.splits is not None:
        split = split or spec.splits[0]
        if split not in spec.splits:
            raise ValueError(f"layout {layout!r} has splits {spec.splits}, got split={split!r}")
    root = Path(root)
    report = Report(layout=layout, root=root, split=split)
    if not root.is_dir():
        report.problems.append(f"root folder {root} does not exist")
        return [], report
    scan = _Scan(root, report)
    spec.read(scan, split)
    if not scan.samples and not report.problems:
        report.problems.append("no samples found")
    counts = Counter(s.task if not s.subset else f"{s.task} [{s.subset}]" for s in scan.samples)
    report.counts = dict(sorted(counts.items()))
    return scan.samples, report


def check_images(samples: Iterable[Sample], report: Report, progress: bool = False) -> None:
    """Decode every file the samples name, once each: a file that does not decode, and an input whose
    size differs from its target's, are problems of ``report`` (what training would otherwise meet at
    some step). ``progress``: a bar on stderr."""
    from PIL import Image
    from tqdm.auto import tqdm

    samples = list(samples)
    files = list(dict.fromkeys(p for s in samples for p in (s.input, s.target) if p is not None))
    sizes: dict[Path, tuple[int, int] | None] = {}
    root = report.root
    for path in tqdm(files, desc="decoding images", unit="image", disable=not progress or not files):
        try:
            with Image.open(path) as img:
                img.load()
                sizes[path] = img.size
        except Exception as exc:  # noqa: BLE001 - Pillow fails in many ways on damaged files
            sizes[path] = None
            report.problems.append(f"image {_relative(path, root)} cannot be decoded ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})")
    for s in samples:
        size, target_size = sizes.get(s.input) if s.input is not None else None, sizes.get(s.target)
        if size and target_size and size != target_size:
            (w, h), (tw, th) = size, target_size
            report.problems.append(f"input {_relative(s.input, root)} is {w}x{h} but its target "
                                   f"{_relative(s.target, root)} is {tw}x{th}")
    report.notes.append(f"{len(files)} image file(s) decoded")


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def verify_layout(layout: str, root: str | Path, split: str | None = None, decode: bool = True,
                  progress: bool = False) -> Report:
    """Validate a tree against ``layout`` and return the report (``.ok``, ``.counts``, ``.problems``).

    Checks the structure (folders, pairs, names, file lists: entries that exist, stay inside the root,
    appear once, lists in UTF-8) and, with ``decode`` (the default), decodes every image and compares
    input and target sizes (``decode=False``: the structure only, much faster on large sets).
    """
    samples, report = scan_layout(layout, root, split)
    if decode:
        check_images(samples, report, progress=progress)
    else:
        report.notes.append("images not decoded (quick check: names and structure only)")
    return report


def load_layout(layout: str, root: str | Path, split: str | None = None) -> list[Sample]:
    """The samples of a valid tree; raises :class:`LayoutError` with the full report otherwise."""
    samples, report = scan_layout(layout, root, split)
    if not report.ok:
        raise LayoutError(report)
    return samples
