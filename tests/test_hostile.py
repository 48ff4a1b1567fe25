"""Hostile input and damaged stores, through the real `neardup` command in a subprocess (so a hang is a timeout).

Each case asserts the exit code, the one-line message and that no stored row is lost. The corpus is made here:
FIFOs, a link to /dev/zero, a 4 GB sparse file, a decompression bomb, a newline in a file name.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from neardup.store import Store, read_catalog
from neardup.store.files import StoreFiles

TIMEOUT = 120  # seconds; every case here finishes in a few, so this only catches a hang
ENV = {**os.environ, "COLUMNS": "100"}


def nd(*args: object, cwd: Path | None = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "neardup", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=ENV)


def one_line(r: subprocess.CompletedProcess[str], *words: str, code: int = 2) -> str:
    """The error line of a failed run: exit `code`, one line on stderr, no traceback, containing `words`."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert err.startswith("neardup: error:") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.fixture
def store(tmp_path: Path, make_images) -> Path:
    make_images(12)
    r = nd("index", tmp_path / "imgs", "--store", tmp_path / "s.h5", "--model", "phash")
    assert r.returncode == 0, r.stderr
    return tmp_path / "s.h5"


def rows(store: Path) -> list[tuple[int, str, str]]:
    cat = read_catalog(store)
    return sorted(zip(cat.ids.tolist(), cat.paths, cat.sha256))


# ------------------------------------------------------------------------------------------- files that bite

def test_query_folder_with_fifo_and_dev_zero_link_does_not_hang(store: Path, tmp_path: Path, make_images) -> None:
    q = tmp_path / "q"
    make_images(1, folder="q")
    os.mkfifo(q / "p.jpg")
    (q / "zero.jpg").symlink_to("/dev/zero")
    r = nd("query", q, "-s", store, "-k", "1")
    assert r.returncode in (0, 1), r.stderr
    assert f"skipped {q / 'p.jpg'}: not a regular file" in r.stderr
    assert f"skipped {q / 'zero.jpg'}: not a regular file" in r.stderr
    r = nd("query", q / "p.jpg", "-s", store)  # the FIFO itself: a skipped row, not "Not a directory"
    assert r.returncode == 2 and "not a regular file" in r.stderr and "Not a directory" not in r.stderr


def test_huge_sparse_file_is_refused_unread_with_bounded_memory(tmp_path: Path, make_images) -> None:
    make_images(3)
    huge = tmp_path / "imgs" / "huge.jpg"
    with open(huge, "wb") as fh:
        fh.truncate(4 << 30)  # 4 GB, sparse: no disk used
    # The CLI runs in a fresh interpreter that reports its own peak memory: VmHWM, kB, which starts afresh at
    # exec (ru_maxrss would include the memory of this test process at fork).
    code = ("import re, sys\nfrom neardup.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('exit', e.code)\n"
            "print('peak', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])\n")
    r = subprocess.run([sys.executable, "-c", code, "index", str(tmp_path / "imgs"), "-s", str(tmp_path / "s.h5"),
                        "--model", "phash"], capture_output=True, text=True, timeout=TIMEOUT, env=ENV)
    peak_mb = int(r.stdout.split("peak ")[1]) / 1024
    assert "exit 0" in r.stdout and "added 3" in r.stdout, r.stdout + r.stderr
    assert "skipped imgs/huge.jpg: file too large: 4.0 GB (limit 128.0 MB" in r.stdout
    assert peak_mb < 500, f"peak memory {peak_mb:.0f} MB"
    r = nd("query", huge, "-s", tmp_path / "s.h5")
    assert r.returncode == 2 and "file too large" in r.stderr
    big = tmp_path / "big.png"  # the limit is an option: a 1.5 MB photo is refused under --max-file-mb 1
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 700, 3), np.uint8)).save(big)
    assert nd("query", big, "-s", tmp_path / "s.h5").returncode in (0, 1)
    r = nd("query", big, "-s", tmp_path / "s.h5", "--max-file-mb", "1")
    assert r.returncode == 2 and "file too large: 1.6 MB (limit 1.0 MB" in r.stderr


def test_bomb_warning_newline_name_and_url(tmp_path: Path, make_images) -> None:
    make_images(2)
    # 10000 x 9000 = 90 MP: above Pillow's warning limit (89.5 MP), below its error limit
    Image.new("1", (10000, 9000)).save(tmp_path / "imgs" / "bomb.png")
    (tmp_path / "imgs" / "bad\nname.jpg").write_bytes(b"not a jpeg")
    r = nd("index", tmp_path / "imgs", "-s", tmp_path / "s.h5", "--model", "phash")
    assert r.returncode == 0, r.stderr
    assert "skipped imgs/bomb.png: refused as a decompression bomb" in r.stdout
    assert "DecompressionBombWarning" not in r.stderr and r.stderr == ""
    assert "skipped imgs/bad\\nname.jpg: not a recognised image format" in r.stdout  # escaped: one line
    r = nd("info", "-s", tmp_path / "s.h5", "--failures")
    assert "imgs/bad\\nname.jpg" in r.stdout
    one_line(nd("query", "http://example.com/a.jpg", "-s", tmp_path / "s.h5"), "URLs are not supported",
             "http://example.com/a.jpg")
    one_line(nd("query", tmp_path / "no\nsuch.jpg", "-s", tmp_path / "s.h5"), "no such file", "no\\nsuch.jpg")


def test_store_that_is_a_folder_leaves_nothing_behind(tmp_path: Path, make_images) -> None:
    make_images(2)
    (tmp_path / "folder").mkdir()
    one_line(nd("index", tmp_path / "imgs", "-s", tmp_path / "folder", "--model", "phash"), "is a folder")
    one_line(nd("query", tmp_path / "imgs", "-s", tmp_path / "folder"), "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "imgs"]
    assert list((tmp_path / "folder").iterdir()) == []


# ------------------------------------------------------------------------------------------ damaged stores

def flip(path: Path, offset: int, n: int = 8) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        data = bytearray(fh.read(n))
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in data))


def _segment_of(store: Path, k: int = 0) -> Path:
    with Store.open(store) as gen:
        return StoreFiles(store).segment(gen.segments[k].name)


def test_flipped_bytes_in_embeddings_are_detected_and_repaired(store: Path, tmp_path: Path, make_images) -> None:
    make_images(3, start=12)
    assert nd("update", tmp_path / "imgs", "-s", store).returncode == 0  # a second segment: the 3 new photos
    before = {(p, sha) for _, p, sha in rows(store)}
    seg = _segment_of(store)  # the first segment, shared by both generations
    with h5py.File(seg) as f:
        offset = f["embeddings"].id.get_chunk_info(0).byte_offset
    flip(seg, offset + 64 * 4 * 3)  # inside row 3's vector
    damaged = seg.read_bytes()
    truth = tmp_path / "truth.csv"
    truth.write_text("path,group\nimgs/img_0000.jpg,a\nimgs/img_0001.jpg,a\n")
    for args in (["duplicates"], ["info", "--check"], ["evaluate", "--truth", truth], ["query", tmp_path / "imgs"]):
        one_line(nd(*args, "-s", store), "does not match its digest", "--repair")
    assert seg.read_bytes() == damaged  # damage is never written over, or served
    # a restore cannot help (both generations share the segment): the photos are indexed again instead
    one_line(nd("restore", "-s", store), "damaged too")
    r = nd("update", tmp_path / "imgs", "-s", store, "--repair")
    assert r.returncode == 0 and "repaired: dropped damaged segment" in r.stdout and "added 12" in r.stdout, r.stdout
    assert {(p, sha) for _, p, sha in rows(store)} == before  # nothing lost (the 12 photos have new ids)
    assert nd("info", "--check", "-s", store).returncode == 0 and not seg.exists()


def test_flipped_bytes_in_the_index_are_never_served(tmp_path: Path, make_images) -> None:
    make_images(12)
    store = tmp_path / "ivf.h5"
    assert nd("index", tmp_path / "imgs", "-s", store, "--model", "phash", "--index", "IVF2,Flat").returncode == 0
    cat = read_catalog(store)
    (part,) = StoreFiles(store).segments.glob("*.faiss")
    # zero one stored vector (ids intact: FAISS still reads the file) — what a silent corruption looks like
    data = bytearray(part.read_bytes())
    vec = cat.xb[0].astype(np.float32).tobytes()
    at = data.find(vec)
    assert at > 0
    data[at:at + len(vec)] = bytes(len(vec))
    part.write_bytes(bytes(data))
    r = nd("query", tmp_path / "imgs" / "img_0000.jpg", "-s", store, "-k", "1", "--json")
    assert r.returncode == 0 and "searching its vectors exactly instead" in r.stderr, r.stderr
    match = json.loads(r.stdout)["results"][0]["matches"][0]
    assert match["path"] == "imgs/img_0000.jpg" and match["score"] > 0.999
    r = nd("info", "--check", "-s", store)
    assert r.returncode == 1 and "does not match its digest" in r.stdout
    make_images(1, start=12)  # the next update that publishes checks every part it keeps, and mends this one
    r = nd("update", tmp_path / "imgs", "-s", store)
    assert r.returncode == 0 and "published generation" in r.stdout, r.stdout
    assert nd("info", "--check", "-s", store).returncode == 0
    assert "exactly instead" not in nd("query", tmp_path / "imgs" / "img_0000.jpg", "-s", store).stderr


def test_truncated_store_says_how_to_recover_and_restore_undoes(store: Path, tmp_path: Path, make_images) -> None:
    first = rows(store)
    one_line(nd("restore", "-s", store), "no previous generation")
    make_images(2, start=12)
    assert nd("update", tmp_path / "imgs", "-s", store).returncode == 0
    second = rows(store)
    # restore on a healthy store swaps the generations, so a second restore undoes the first
    assert "now the previous generation" in nd("restore", "-s", store).stdout and rows(store) == first
    assert nd("restore", "-s", store).returncode == 0 and rows(store) == second
    size = store.stat().st_size
    with open(store, "r+b") as fh:
        fh.truncate(size // 2)
    one_line(nd("query", tmp_path / "imgs", "-s", store), "neardup restore --store")
    one_line(nd("index", tmp_path / "imgs", "-s", store), "neardup restore --store")
    assert store.stat().st_size == size // 2
    assert nd("restore", "-s", store).returncode == 0 and rows(store) == first
    r = nd("query", tmp_path / "imgs" / "img_0001.jpg", "-s", store, "-k", "1")
    assert r.returncode == 0 and "imgs/img_0001.jpg  <- match" in r.stdout


# ---------------------------------------------------------------------------------------- honest commands

def test_help_shows_every_default() -> None:
    r = nd("query", "--help")
    # the help is wrapped to the terminal's width, also after a hyphen ("efficientnet-" / "lite0")
    text = " ".join(r.stdout.split()).replace("- ", "-")
    assert ("[default: per model: resnet50 0.9, vgg16 0.95, efficientnet-lite0 0.9, efficientnet-lite2 0.9, "
            "phash 0.5625, onnx 0.9 (phash: Hamming <= 14 of 64 bits)]") in text
    assert "[default: verify when the store caches local features" in text  # --verify/--no-verify
    for shown in ("NEARDUP_STORE; default: catalog.h5]", "[default: 10; x>=1]", "default: 32; x>=1]",
                  "default: float32]", "[env var: NEARDUP_MAX_FILE_MB; default: 128; x>=1]",
                  "[default: the store's, else imagenet]"):
        assert shown in text, shown
    for cmd in ("index", "update", "info", "restore", "compare", "duplicates", "report", "plot", "evaluate", "demo"):
        text = " ".join(nd(cmd, "--help").stdout.split())
        assert not re.search(r" \.( |$)", text), (cmd, text)  # a swallowed "[default: ...]" leaves "text ."
    assert "[default: the store's, else resnet50]" in " ".join(nd("index", "--help").stdout.split())


def test_broken_pipe_is_quiet(store: Path, tmp_path: Path, make_images) -> None:
    """`neardup query … | head -1`: the reader goes away while the command still has lines to write. Made
    certain, not likely: the pipe holds one page (F_SETPIPE_SZ), far less than the answer (40 photos x 12
    rows), so the command is still writing when the reader closes; and a reader gone before the first line."""
    make_images(40, folder="more", start=12)
    cmd = [sys.executable, "-m", "neardup", "query", tmp_path / "more", "-s", store, "-k", "12"]
    for read_first_line in (True, False):
        r, w = os.pipe()
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
        if not read_first_line:
            os.close(r)  # `| head -0`: gone before the first write
        p = subprocess.Popen(cmd, stdout=w, stderr=subprocess.PIPE, env=ENV)
        os.close(w)
        if read_first_line:
            with os.fdopen(r, "rb") as out:
                assert out.readline().strip()  # a line came, and the command blocks on the full pipe
        err = p.stderr.read().decode()
        p.wait(timeout=TIMEOUT)
        assert err == "" and p.returncode == 141, (read_first_line, p.returncode, err)  # as SIGPIPE ends one


def test_compare_and_plot_follow_a_store_and_update_accepts_its_model(store: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "imgs" / "img_0000.jpg", tmp_path / "imgs" / "img_0001.jpg"
    r = nd("compare", a, a, "--store", store)
    assert r.returncode == 0 and "model phash" in r.stdout
    one_line(nd("compare", a, b, "--store", store, "--model", "vgg16"), "made with phash")
    r = nd("plot", a, b, "--store", store, "--out", tmp_path / "p.jpg")
    assert r.returncode == 0 and (tmp_path / "p.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    assert nd("plot", a, b, "--score", "0.5", "-o", tmp_path / "p.pdf").returncode == 0
    assert (tmp_path / "p.pdf").read_bytes()[:5] == b"%PDF-"
    one_line(nd("plot", a, b, "--score", "0.5", "-o", tmp_path / "p.xyz"), "cannot tell the image format")
    one_line(nd("plot", a, b, "--score", "nan", "-o", tmp_path / "p.png"), "must be a number")
    assert not (tmp_path / "p.png").exists()
    assert nd("update", tmp_path / "imgs", "-s", store, "--model", "phash").returncode == 0
    one_line(nd("update", tmp_path / "imgs", "-s", store, "--model", "vgg16"), "made with model phash")


def test_report_from_groups_alone_is_complete(store: Path, tmp_path: Path) -> None:
    # a low threshold makes pairs among the synthetic products
    assert nd("duplicates", "-s", store, "-t", "0.3", "--groups", tmp_path / "g.json").returncode == 0
    r = nd("report", "-s", store, "--groups", tmp_path / "g.json", "-o", tmp_path / "r.html",
           "--png-dir", tmp_path / "new" / "pngs")
    assert r.returncode == 0, r.stderr
    pairs = int(r.stdout.split(" pairs,")[0].rsplit(" ", 1)[1])
    assert pairs > 0 and len(list((tmp_path / "new" / "pngs").glob("pair_*.png"))) == pairs


def test_evaluate_without_true_pairs_is_undefined(store: Path, tmp_path: Path) -> None:
    truth = tmp_path / "truth.csv"
    truth.write_text("path,group\n" + "".join(f"imgs/img_{k:04d}.jpg,g{k}\n" for k in range(12)))
    one_line(nd("evaluate", "--truth", truth, "-s", store), "no true pairs", "undefined")


# ------------------------------------------------------------------------------------- recovery, the hard way

def test_a_lower_size_limit_never_drops_unchanged_rows(store: Path, tmp_path: Path) -> None:
    r = nd("update", tmp_path / "imgs", "-s", store, "--max-file-mb", "1")
    assert r.returncode == 0 and "removed 0" in r.stdout and len(rows(store)) == 12
    big = tmp_path / "imgs" / "img_0001.jpg"  # a stored file that changed and is now over the limit: listed
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 900, 3), np.uint8)).save(big, quality=100)
    r = nd("update", tmp_path / "imgs", "-s", store, "--max-file-mb", "1")
    assert "skipped imgs/img_0001.jpg: file too large" in r.stdout and len(rows(store)) == 11


def test_a_killed_restore_is_finished_or_dropped_never_lost(store: Path, tmp_path: Path, make_images) -> None:

    first = rows(store)
    make_images(2, start=12)
    assert nd("update", tmp_path / "imgs", "-s", store).returncode == 0
    second = rows(store)
    files = StoreFiles.resolved(store)
    # killed after linking the restored manifest, before touching anything else: dropped
    os.link(files.previous, files.restoring)
    assert not files.finish_restore() and not files.restoring.exists() and rows(store) == second
    # killed after keeping the current manifest as the previous one: both names hold one file, and the
    # restored manifest exists only as .restoring; the next restore (or any writer) finishes it
    os.link(files.previous, files.restoring)
    files.keep_previous()
    r = nd("restore", "-s", store)
    assert r.returncode == 0 and rows(store) == first and rows(files.previous) == second
    assert not files.restoring.exists()


def test_recovery_advice_never_goes_in_a_circle(store: Path, tmp_path: Path, make_images) -> None:
    make_images(1, start=12)
    assert nd("update", tmp_path / "imgs", "-s", store).returncode == 0
    files = StoreFiles.resolved(store)
    prev_size = files.previous.stat().st_size
    with open(files.previous, "r+b") as fh:
        fh.truncate(prev_size // 2)
    r = nd("info", "--check", "-s", store)
    assert r.returncode == 1 and "cannot be restored" in r.stdout
    with open(store, "r+b") as fh:
        fh.truncate(store.stat().st_size // 2)
    for args in (["index", tmp_path / "imgs"], ["restore"]):
        err = one_line(nd(*args, "-s", store), "damaged too", "move", "away and rebuild")
        assert "neardup restore" not in err


def test_a_symlinked_store_finds_its_previous_generation(store: Path, tmp_path: Path, make_images) -> None:
    make_images(1, start=12)
    assert nd("update", tmp_path / "imgs", "-s", store).returncode == 0
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "cat.h5").symlink_to(store)
    assert "s.h5.prev (12 images" in nd("info", "-s", tmp_path / "links" / "cat.h5").stdout
    with open(store, "r+b") as fh:
        fh.truncate(store.stat().st_size // 2)
    one_line(nd("query", tmp_path / "imgs", "-s", tmp_path / "links" / "cat.h5"), "the previous generation is kept")


def test_model_variable_does_not_stop_an_update(store: Path, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "neardup", "update", str(tmp_path / "imgs"), "-s", str(store)],
                       capture_output=True, text=True, timeout=TIMEOUT, env={**ENV, "NEARDUP_MODEL": "resnet50"})
    assert r.returncode == 0, r.stderr




@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2.5 MB tmpfs at tmp_path/disk, grown or shrunk with resize(bytes) (skipped where tmpfs cannot be
    mounted: that needs root, as in CI and this project's machines)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("full-disk test skipped: a small tmpfs cannot be mounted here (needs root)")

    def resize(nbytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={nbytes // 1024}k", str(disk)], check=True)

    try:
        yield disk, resize
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_ends_with_one_line_and_loses_nothing(small_disk, tmp_path: Path, make_images) -> None:
    """HDF5 crashed the process (SIGSEGV) when the disk filled mid-write. Now every write reserves its space
    first: a full disk is one line and exit 2, the store is as it was, and the next run resumes."""
    disk, resize = small_disk
    make_images(120, size=(200, 200))
    store = disk / "s.h5"
    one_line(nd("index", tmp_path / "imgs", "-s", store, "--model", "phash"), "No space left on device",
             "run it again")
    assert not store.exists() and not list(disk.rglob("*.neardup-tmp"))
    resize(16 << 20)
    r = nd("index", tmp_path / "imgs", "-s", store, "--model", "phash")
    assert r.returncode == 0 and "reused 120 from an interrupted run" in r.stdout, r.stdout
    before = rows(store)
    make_images(150, start=120, size=(200, 200))
    used = sum(p.stat().st_size for p in disk.rglob("*") if p.is_file())
    resize(used + (600 << 10))  # room for the checkpoint of the new photos, not for their segment
    one_line(nd("update", tmp_path / "imgs", "-s", store), "No space left on device")
    assert rows(store) == before and nd("info", "--check", "-s", store).returncode == 0
    assert not list(disk.rglob("*.neardup-tmp"))
    resize(32 << 20)
    r = nd("update", tmp_path / "imgs", "-s", store)
    assert r.returncode == 0 and "added 150" in r.stdout and len(rows(store)) == 270


FILL_HOOK = r"""
import os, sys
from neardup import fileio
import neardup.store.manifest, neardup.store.segment
left, target = int(sys.argv[1]), sys.argv[2]
real = fileio.ensure_space
def filled(path, nbytes):  # the check passes, then another process fills the disk (as in a race)
    real(path, nbytes)
    st = os.statvfs(os.path.dirname(str(path)))
    with open(os.path.join(os.path.dirname(str(path)), "..", "fill") if path.parent.name.endswith(".segments")
              else os.path.join(os.path.dirname(str(path)), "fill"), "ab") as fh:
        fh.write(bytes(max(0, st.f_bavail * st.f_frsize - left)))
setattr(getattr(neardup.store, target), "ensure_space", filled)
from neardup.cli import main
sys.argv = ["neardup", *sys.argv[3:]]
main()
"""


@pytest.mark.parametrize("target", ["segment", "manifest"])
def test_a_disk_filled_during_a_write_is_one_line_every_time(small_disk, tmp_path: Path, make_images,
                                                              target: str) -> None:
    """The disk fills after the space check passed, at several points of HDF5's write: HDF5 never meets the
    failed write (h5io.GuardedFile), so every run is one line and exit 2 — never a crash at exit (SIGSEGV)."""
    disk, resize = small_disk
    make_images(120, size=(200, 200))
    resize(12 << 20)
    store = disk / "s.h5"
    lefts = [0, 64 << 10, 512 << 10, 1 << 20, 1600 << 10] if target == "segment" else [0, 4 << 10]
    for cmd in ("index", "update"):
        for left in lefts:
            if cmd == "update":
                assert nd("index", tmp_path / "imgs", "-s", store, "--model", "phash").returncode == 0
                make_images(30, start=200 + left % 1000, folder="more", size=(200, 200))
                args = ["update", tmp_path / "imgs", tmp_path / "more", "-s", store]
            else:
                args = ["index", tmp_path / "imgs", "-s", store, "--model", "phash"]
            r = subprocess.run([sys.executable, "-c", FILL_HOOK, str(left), target, *map(str, args)],
                               capture_output=True, text=True, timeout=TIMEOUT, env=ENV)
            one_line(r, "No space left on device")
            assert not list(disk.rglob("*.neardup-tmp")), (cmd, left)
            if cmd == "update":
                assert nd("info", "--check", "-s", store).returncode == 0  # the store is as it was
            for p in disk.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def _empty_string_size_fields(data: bytes) -> list[int]:
    """Offsets of the size field of each empty string in the HDF5 global heaps of a file (a flipped byte there
    made HDF5 loop forever: issue 29's offsets 3066, 3082, 3098 of a 10,535-byte manifest)."""
    out, at = [], data.find(b"GCOL")
    while at >= 0:
        size = int.from_bytes(data[at + 8:at + 16], "little")
        p = at + 16
        while p + 16 <= min(at + size, len(data)):
            index, length = int.from_bytes(data[p:p + 2], "little"), int.from_bytes(data[p + 8:p + 16], "little")
            if index == 0:
                break
            if length == 0:
                out.append(p + 8)
            p += 16 + (length + 7) // 8 * 8
        at = data.find(b"GCOL", at + 4)
    return out


def _flipped(path: Path, data: bytes, off: int) -> None:
    bad = bytearray(data)
    if off < len(bad):
        bad[off] ^= 0xFF
    tmp = path.with_name(path.name + ".flip")
    tmp.write_bytes(bytes(bad))
    os.replace(tmp, path)  # a new file, as a disk hands back a rotted block: nothing cached from an earlier read


def test_bit_rot_is_a_right_answer_or_one_line_naming_the_previous_generation(store: Path, tmp_path: Path,
                                                                             make_images) -> None:
    """A flipped byte anywhere in a manifest or a segment: the right answer, or exit 2 and one line that names
    the previous generation — never a traceback or a hang (the digest of the bytes is checked before HDF5
    parses them)."""
    make_images(3, start=12)
    assert nd("update", tmp_path / "imgs", "--store", store).returncode == 0  # a previous generation is kept
    files = StoreFiles(store)
    want = rows(store)
    with Store.open(store) as gen:
        vectors = gen.vectors()
        seg = files.segment(min(gen.segments, key=lambda s: s.rows).name)
    manifest = store.read_bytes()
    heap = _empty_string_size_fields(manifest)
    assert len(heap) >= 3, heap
    for off in heap[:3]:  # where HDF5 looped forever on an unchecked manifest
        _flipped(store, manifest, off)
        one_line(nd("info", "--store", store), "damaged", files.previous.name, "neardup restore")
    _flipped(store, manifest, len(manifest))
    # a sampled sweep, in this process (a hang would stop the test: the digests come before any parsing)
    from neardup.errors import StoreError

    outcomes = {"detected": 0, "no effect": 0}
    for path, step in ((store, 7), (seg, max(1, seg.stat().st_size // 400))):
        data = path.read_bytes()
        for off in range(0, len(data), step):
            _flipped(path, data, off)
            try:
                with Store.open(store) as gen:
                    assert rows(store) == want and np.array_equal(gen.vectors(), vectors), (path.name, off)
                    outcomes["no effect"] += 1
            except StoreError as exc:
                assert "\n" not in str(exc) and "damaged" in str(exc), str(exc)
                outcomes["detected"] += 1
        _flipped(path, data, len(data))  # the intact bytes back (a flip past the end is none)
    assert outcomes["detected"] > 0
    # and through the command, a few of each: exit 0 with the right answer, or exit 2 and one line
    for path, offs in ((store, heap[3:5] + [0, 600, len(manifest) - 9]), (seg, [0, 300, seg.stat().st_size // 2])):
        data = path.read_bytes()
        for off in offs:
            _flipped(path, data, off)
            r = nd("query", tmp_path / "imgs" / "img_0001.jpg", "--store", store, "--json")
            if r.returncode == 0:
                assert json.loads(r.stdout)["results"][0]["matches"][0]["path"].endswith("img_0001.jpg"), r.stdout
            else:
                one_line(r, "damaged")
        _flipped(path, data, len(data))
    assert rows(store) == want


def test_a_symlinked_or_odd_lock_file_is_refused_and_its_target_untouched(store: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    lock = StoreFiles(store).lock
    lock.unlink()
    lock.symlink_to(victim)
    one_line(nd("update", tmp_path / "imgs", "--store", store), "symbolic link", lock.name)
    assert victim.read_text() == "precious"
    lock.unlink()
    os.mkfifo(lock)  # opening a FIFO would block a writer that did not check
    one_line(nd("update", tmp_path / "imgs", "--store", store), "not a regular file")
    lock.unlink()
    assert nd("update", tmp_path / "imgs", "--store", store).returncode == 0


def test_a_renamed_store_says_what_is_wrong_and_works_renamed_whole(tmp_path: Path, make_images) -> None:
    make_images(12)
    store = tmp_path / "catalog.h5"
    assert nd("index", tmp_path / "imgs", "--store", store, "--model", "phash", "--index", "hnsw").returncode == 0
    other = tmp_path / "other.h5"
    store.rename(other)  # the manifest alone
    one_line(nd("info", "--store", other), "segments folder", "was the store renamed",
             "rename catalog.h5.segments to other.h5.segments")
    for p in tmp_path.glob("catalog.h5*"):  # and now its files too: it just works
        p.rename(tmp_path / ("other.h5" + p.name[len("catalog.h5"):]))
    r = nd("query", tmp_path / "imgs" / "img_0003.jpg", "--store", other, "--json")
    assert r.returncode == 0 and "index" not in r.stderr, r.stderr  # its HNSW file found under the new name
    assert json.loads(r.stdout)["results"][0]["matches"][0]["path"].endswith("img_0003.jpg")
    make_images(2, start=12)
    assert nd("update", tmp_path / "imgs", "--store", other).returncode == 0
    r = nd("info", "--check", "--store", other)
    assert r.returncode == 0 and "ok:" in r.stdout, r.stdout + r.stderr


def test_a_first_generations_damaged_manifest_is_rebuilt_from_its_segments(store: Path, tmp_path: Path) -> None:
    """No previous generation to restore, every segment intact: `update --repair` rebuilds the manifest from the
    segments (each records the store's meta) instead of embedding every photo again."""
    before = rows(store)
    data = bytearray(store.read_bytes())
    data[len(data) // 2] ^= 0xFF
    store.write_bytes(bytes(data))
    one_line(nd("info", "--store", store), "damaged", "no previous generation")
    r = nd("update", tmp_path / "imgs", "--store", store, "--repair")
    assert r.returncode == 0 and "rebuilt from its 1 segments" in r.stderr, r.stdout + r.stderr
    assert "embedded" not in r.stdout and "added 0" in r.stdout, r.stdout  # nothing embedded again
    assert rows(store) == before and StoreFiles(store).damaged.exists()
    r = nd("info", "--check", "--store", store)
    assert r.returncode == 0 and "model  phash" in r.stdout, r.stdout
