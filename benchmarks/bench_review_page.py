"""The review page's queue (`neardup serve`, /v1/review/...) over the whole Grocery Store Dataset.

Question: does a large store keep the review page responsive? The queue's pairs are found once per generation
in a thread of the service; until then every queue request must answer at once ("finding"), and afterwards a
page of pairs, a pair's inlier lines and a decision must cost milliseconds, not a search. Baseline in the same
run: find_duplicates on the same store in this process (what the service's thread runs), so the time to a
ready queue reads as a ratio to the search alone.

The store holds --photos real grocery photos (symlinked into a temporary folder, never copied), pHash with
local features (fast to build; the queue's work is the same search and verification for any model).
Correctness (exit status 1 when violated): the queue lists exactly the pairs find_duplicates lists; no queue
request fails while the pairs are being found; a decision leaves the queue and is in the journal.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import GROCERY_DIR, Report, all_photos, append_results, base_parser, link_photos, log, median

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.test_serve's server helpers

from tests.test_serve import start_server, stop_server  # noqa: E402

from neardup.indexer.build import build_index  # noqa: E402
from neardup.search.duplicates import find_duplicates  # noqa: E402
from neardup.search.review import decisions_for  # noqa: E402


def main() -> int:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=0, help="photos of the dataset to index (0: all)")
    ap.add_argument("--append", action="store_true", help="append the report to benchmarks/RESULTS.md")
    args = ap.parse_args()
    photos = all_photos(GROCERY_DIR)
    photos = photos[:args.photos] if args.photos else photos
    rep = Report("bench_review_page.py", "Review queue of neardup serve over a large store", __doc__.split("\n\n")[1],
                 {"photos": len(photos), "model": "phash"})
    with tempfile.TemporaryDirectory(prefix="bench-review-") as tmp:
        folder = link_photos(photos, Path(tmp) / "photos")
        store = Path(tmp) / "catalog.h5"
        t = time.perf_counter()
        build_index([folder], store, model="phash")
        log(f"indexed {len(photos)} photos in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        want = find_duplicates(store, processes=1, decisions=False)
        search_s = time.perf_counter() - t
        pairs_want = {(int(want.ids[a]), int(want.ids[b])) for a, b in zip(want.I.tolist(), want.J.tolist())}
        proc, url = start_server(store)

        def get(path: str) -> tuple[float, dict]:
            t0 = time.perf_counter()
            doc = json.loads(urllib.request.urlopen(url + path, timeout=120).read())
            return time.perf_counter() - t0, doc

        try:
            t0 = time.perf_counter()
            finding, failed = [], 0
            while True:
                try:
                    s, q = get("v1/review/queue?limit=200")
                except OSError:
                    failed += 1
                    continue
                if q["status"] != "finding":
                    break
                finding.append(s)
                time.sleep(0.2)
            ready_s = time.perf_counter() - t0
            got, offset = set(), 0
            page_s = []
            while True:
                s, q = get(f"v1/review/queue?offset={offset}&limit=200")
                page_s.append(s)
                got |= {(p["a"]["id"], p["b"]["id"]) for p in q["pairs"]}
                offset += len(q["pairs"])
                if not q["pairs"]:
                    break
            first = q["total"] and get("v1/review/queue?limit=1")[1]["pairs"][0]
            inl_s = [get(f"v1/review/inliers?a={first['a']['id']}&b={first['b']['id']}")[0] for _ in range(5)]
            post_s = []
            for word in ("duplicate", "distinct", "duplicate", "distinct", "duplicate"):
                body = json.dumps({"a": first["a"]["id"], "b": first["b"]["id"], "decision": word}).encode()
                t1 = time.perf_counter()
                urllib.request.urlopen(urllib.request.Request(url + "v1/review/decisions", data=body, method="POST"),
                                       timeout=60).read()
                post_s.append(time.perf_counter() - t1)
            after = get("v1/review/queue?limit=1")[1]
        finally:
            stop_server(proc)
        rep.table("The queue against the search alone (same store, same machine, same run)",
                  ["what", "value"],
                  [["find_duplicates in this process (the baseline)", f"{search_s:.1f} s"],
                   ["queue ready, from the first request", f"{ready_s:.1f} s ({ready_s / search_s:.2f}x the baseline)"],
                   ["queue requests answered while finding", f"{len(finding)}, slowest "
                    f"{max(finding or [0]) * 1000:.0f} ms"],
                   ["a page of 200 pairs, ready (median)", f"{median(page_s) * 1000:.1f} ms"],
                   ["a pair's inlier lines (median of 5)", f"{median(inl_s) * 1000:.0f} ms"],
                   ["a decision POST (median of 5)", f"{median(post_s) * 1000:.0f} ms"],
                   ["pairs in the queue", f"{len(got)} of {len(pairs_want)} found"]])
        rep.check("no queue request failed while finding", failed == 0, f"{failed} failed")
        rep.check("the queue lists the pairs find_duplicates lists (byte-identical pairs aside)",
                  got <= pairs_want and len(pairs_want - got) == int(want.exact.sum()),
                  f"{len(got)} listed, {len(pairs_want)} found, {int(want.exact.sum())} byte-identical")
        rep.check("a decision leaves the queue and is in the journal",
                  after["total"] == len(got) - 1 and len(decisions_for(store).history) == 5)
    rep.note("The machine was shared with other engineers' test runs (2 cores): read the ratio, not the seconds.")
    code = rep.finish(args.json)
    if args.append:
        append_results("Review queue of neardup serve (issue 31 item 4)", "bench_review_page.py", rep)
    return code


if __name__ == "__main__":
    sys.exit(main())
