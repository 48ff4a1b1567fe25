"""Progress of long commands (issue 29 item 5): a bar on a terminal, lines at most every interval in a log,
nothing with --quiet; the library reports its stages to a reporter and is silent by default."""
from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

import neardup.search.verify_jobs as verify_jobs
from neardup.config import DEFAULTS, ENV_PROGRESS_INTERVAL
from neardup.indexer.build import build_index
from neardup.progress import SILENT, Progress, interval_s
from neardup.search.duplicates import find_duplicates

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "neardup" / "sample" / "catalog"
#: "neardup: NAME: DONE/TOTAL UNIT (P%), RATE UNIT/s, ETA T" and the last line "NAME: DONE/TOTAL UNIT done in T (...)"
LINE = re.compile(r"^neardup: (?P<name>[\w ]+): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+) \(\d+%\), "
                  r"[\d.]+ (?P=unit)/s, ETA \d+[smh]", re.MULTILINE)
LAST = re.compile(r"^neardup: (?P<name>[\w ]+): (?P<done>\d+)/(?P=done) (?P<unit>\w+) done in \d+[smh]"
                  r"\d*[sm]? \([\d.]+ (?P=unit)/s\)$", re.MULTILINE)
DEADLINE = 300.0


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1] / "src"),
                                                                     os.environ.get("PYTHONPATH", "")]))}
    out.update(extra)
    return out


def neardup(*args: object, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "neardup", *map(str, args)], env=env(**extra), capture_output=True,
                          text=True, timeout=DEADLINE)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """24 photos of the bundled sample catalogue (copies among them)."""
    root = tmp_path / "photos"
    root.mkdir()
    for p in sorted(q for q in SAMPLE.rglob("*") if q.is_file())[:24]:
        shutil.copy(p, root / f"{p.parent.name}_{p.name}")
    return root


def test_log_lines_carry_done_total_rate_eta_and_a_last_line() -> None:
    buf = io.StringIO()
    progress = Progress("log", stream=buf, interval=0.0)
    with progress.stage("verify", 40, "pairs") as stage:
        stage(0, 40)  # the start writes nothing
        for done in range(4, 41, 4):
            stage(done, 40)
    lines = buf.getvalue().splitlines()
    got = [m.groupdict() for m in LINE.finditer(buf.getvalue())]
    assert [int(g["done"]) for g in got] == list(range(4, 40, 4))  # every call but the last, whose line is the end
    assert all(g["name"] == "verify" and g["total"] == "40" and g["unit"] == "pairs" for g in got)
    assert LAST.match(lines[-1]) and lines[-1].startswith("neardup: verify: 40/40 pairs done in")
    assert len(lines) == len(got) + 1


def test_a_stage_shorter_than_the_interval_writes_nothing_and_quiet_never_writes() -> None:
    buf = io.StringIO()
    with Progress("log", stream=buf, interval=3600).stage("index", 10, "img") as stage:
        for done in range(1, 11):
            stage(done, 10)
    with Progress("quiet", stream=buf, interval=0).stage("index", 10, "img") as stage:
        stage.update(5)
        stage.update(5)
    with SILENT.stage("x") as stage:
        stage(1, 2)
    assert buf.getvalue() == ""
    assert Progress.auto(quiet=True).mode == "quiet"
    assert Progress.auto(stream=io.StringIO()).mode == "log"  # not a terminal


def test_the_interval_is_a_default_with_an_environment_override(monkeypatch) -> None:
    monkeypatch.delenv(ENV_PROGRESS_INTERVAL, raising=False)
    assert interval_s() == DEFAULTS.progress_interval_s == 10.0
    monkeypatch.setenv(ENV_PROGRESS_INTERVAL, "0.05")
    assert interval_s() == 0.05
    monkeypatch.setenv(ENV_PROGRESS_INTERVAL, "soon")  # ignored, not fatal
    assert interval_s() == DEFAULTS.progress_interval_s


def test_duplicates_reports_candidates_then_verification(photos: Path, tmp_path: Path, monkeypatch) -> None:
    store = tmp_path / "s.h5"
    build_index([photos], store, model="phash")
    # several reports from a few dozen candidates: chunks of 4 pairs
    monkeypatch.setitem(verify_jobs.verify_many.__kwdefaults__, "chunk", 4)
    calls: list[tuple[str, int, int]] = []

    class Spy(Progress):
        def stage(self, name: str, total: int | None = None, unit: str = "it") -> _Recorder:
            return _Recorder(super().stage(name, total, unit), calls)

    silent = find_duplicates(store)
    rep = find_duplicates(store, progress=Spy("quiet"))
    assert (rep.I.tolist(), rep.J.tolist()) == (silent.I.tolist(), silent.J.tolist())  # reporting changes nothing
    names = [c[0] for c in calls]
    assert names.index("candidates") < names.index("verify")
    verify = [(d, t) for n, d, t in calls if n == "verify"]
    assert verify[-1] == (rep.candidates, rep.candidates) and len(verify) >= 3
    assert [d for d, _ in verify] == sorted(d for d, _ in verify)


class _Recorder:
    """A stage that records its (done, total) calls."""

    def __init__(self, stage, calls: list) -> None:
        self.stage, self.calls = stage, calls

    def __call__(self, done: int, total: int | None = None) -> None:
        self.calls.append((self.stage.name, done, total))
        self.stage(done, total)

    def __enter__(self) -> _Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stage.close()


def test_a_command_whose_stderr_is_not_a_terminal_writes_progress_lines(photos: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    r = neardup("index", photos, "-s", store, "--model", "phash", "--batch-size", "4",
                **{ENV_PROGRESS_INTERVAL: "0.0"})
    assert r.returncode == 0, r.stderr
    got = [m.groupdict() for m in LINE.finditer(r.stderr)]
    assert got and all(g["name"] == "index" and g["total"] == "24" and g["unit"] == "img" for g in got)
    assert re.search(r"^neardup: index: 24/24 img done in ", r.stderr, re.MULTILINE)
    assert "\r" not in r.stderr and "%|" not in r.stderr  # lines, not a bar
    q = neardup("index", photos, "-s", tmp_path / "q.h5", "--model", "phash", "--quiet", "--batch-size", "4",
                **{ENV_PROGRESS_INTERVAL: "0.0"})
    assert q.returncode == 0 and q.stderr == "" and "24 images" in q.stdout


def run_in_pty(args: list[str], extra: dict[str, str]) -> tuple[int, str]:
    """Run neardup with stdout and stderr on a pseudo-terminal of 100 columns; (exit status, what it showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "neardup", *args], stdin=slave, stdout=slave, stderr=slave,
                            env=env(**extra), close_fds=True)
    os.close(slave)
    out, deadline = b"", time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=DEADLINE), out.decode("utf-8", "replace")


def test_a_terminal_sees_a_bar_and_quiet_hides_it(photos: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    code, shown = run_in_pty(["index", str(photos), "-s", str(store), "--model", "phash", "--batch-size", "4"],
                             {ENV_PROGRESS_INTERVAL: "0.0"})
    assert code == 0, shown
    assert re.search(r"index: +100%\|.*\| 24/24 \[", shown), shown  # tqdm's bar, at its end
    assert "neardup: index: " not in shown  # a bar, not log lines
    code, shown = run_in_pty(["duplicates", "-s", str(store), "--quiet"], {ENV_PROGRESS_INTERVAL: "0.0"})
    assert code == 0 and "%|" not in shown and "groups" in shown


def test_evaluate_and_report_report_their_stages(tmp_path: Path) -> None:
    from neardup.search.evaluate import evaluate
    from neardup.search.report import write_report

    store = tmp_path / "s.h5"
    build_index([SAMPLE], store, model="phash")
    calls: list[tuple[str, int, int]] = []

    class Spy(Progress):
        def stage(self, name: str, total: int | None = None, unit: str = "it") -> _Recorder:
            return _Recorder(super().stage(name, total, unit), calls)

    res = evaluate(store, SAMPLE.parent / "truth.csv", progress=Spy("quiet"))
    stages = {n: (d, t) for n, d, t in calls}  # the last call of each stage
    assert stages["candidates"] == (res.evaluated, res.evaluated) and stages["verify"][0] == stages["verify"][1] > 0
    calls.clear()
    out = write_report(store, tmp_path / "r.html", progress=Spy("quiet"))
    stages = {n: (d, t) for n, d, t in calls}
    assert stages["thumbnails"] == (out.images, out.images) and "verify" in stages
