"""Serve stage 2b, review: the review page of `neardup serve` (/review) and its JSON API (/v1/review/...).

- The queue: the duplicate pairs of the served generation (find_duplicates, run once per generation in a thread
  of its own, never per request: a big store makes the queue say "finding", not the page hang) less the pairs
  someone has decided (the store's decision journal, read again whenever it changed: a decision recorded
  meanwhile by `neardup review import` or another page drops its pair too), a page of pairs at a time.
- A pair's inlier lines: the ORB inlier correspondences of its verification (inliers.pair_points), computed on
  demand in the service's files pool.
- Decisions: POST /v1/review/decisions records one (journal record, source "page"); POST /v1/review/undo
  records the pair's decision before its last one again (or "undecided" when it had none: the pair is back in
  the queue) as a new record: the journal is append-only, undo never erases.

Every route but the page's files needs the bearer token when one is set (guard.py). Bad input is a 400 with a
one-line message and records nothing.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import Response

from ..errors import InputError, NeardupError
from ..search.duplicates import find_duplicates
from ..search.inliers import pair_points
from ..search.review import DecisionCache, decisions_for, record_decision
from ..store.decisions import DECISIONS, UNDECIDED, Decision, pair_key
from .guard import PAGE_CSP, SECURITY_HEADERS, ApiError
from .live import LiveStore, Served

log = logging.getLogger(__name__)

#: Pairs a queue page holds at most (the page asks for REVIEW_PAGE at a time).
MAX_PAGE = 200
#: The largest decision request body: a few ids and a word.
MAX_BODY = 4096
#: Inlier lines sent for one pair at most (a deterministic subset beyond: enough to see the correspondence).
MAX_LINES = 150


@dataclass
class _Found:
    """The duplicate pairs of one generation, in find_duplicates' order (exact first, verified first, by
    score), as catalogue rows, with what the page shows of each photo."""

    generation: str
    rows: np.ndarray  #: int64 [m, 2]
    score: np.ndarray  #: float32 [m]
    verified: list[bool | None]
    inliers: list[int | None]
    exact: np.ndarray  #: bool [m]
    keys: list[tuple[str, str]]  #: pair_key of each pair's digests
    ids: np.ndarray  #: catalogue row -> id
    paths: list[str]
    stale: dict[int, str]


class ReviewQueue:
    """The served generation's undecided duplicate pairs. The pairs are found once per generation in a thread;
    until a new generation's are found, the previous generation's are served (their ids are kept by `update`)."""

    def __init__(self, live: LiveStore) -> None:
        self.live = live
        self.decisions = DecisionCache(live.path)  # the journal, read again only when it changed
        self._lock = threading.Lock()
        self._found: _Found | None = None
        self._finding: str | None = None  #: the generation whose pairs are being found
        self.error: str | None = None  #: why the last search failed
        self._failed: str | None = None  #: the generation whose search failed (not tried again)
        self._filtered: tuple[int, str, np.ndarray] | None = None  # (journal records, generation, undecided)

    def found(self) -> tuple[_Found | None, bool]:
        """The pairs found last (None before the first search ends) and whether a search is running; starts
        one for the current generation when none has."""
        gen = self.live.current
        with self._lock:
            have = self._found.generation if self._found else None
            if self._finding is None and gen.id not in (have, self._failed):
                self._finding = gen.id
                self.live.acquire(gen)  # open until the search ends, even if a newer one replaces it
                threading.Thread(target=self._find, args=(gen,), name="neardup-review", daemon=True).start()
            return self._found, self._finding is not None

    def _find(self, gen: Served) -> None:
        try:
            # one process, the verification pool's threads: the service's queries keep the other cores; the
            # search alone (decisions=False): the journal is applied per request, so a decision taken back by an
            # undo brings its pair back, distinct ones included
            report = find_duplicates(gen.searcher.gen, processes=1, decisions=False)
            sha = gen.searcher.cat.sha256
            keep = [p for p in range(report.n_pairs) if sha[report.I[p]] != sha[report.J[p]]]  # same bytes: one
            rows = np.stack([report.I[keep], report.J[keep]], 1) if keep else np.zeros((0, 2), np.int64)  # photo
            found = _Found(gen.id, rows.astype(np.int64), report.D[keep],
                           report.verified[keep].tolist() if report.verify else [None] * len(keep),
                           report.inliers[keep].tolist() if report.verify else [None] * len(keep),
                           report.exact[keep], [pair_key(sha[a], sha[b]) for a, b in rows.tolist()],
                           report.ids, report.paths, report.stale)
            with self._lock:
                self._found, self.error, self._failed = found, None, None
            log.info("review: %d pairs to review in generation %s", len(keep), gen.id)
        except NeardupError as exc:
            log.error("review: the duplicates of generation %s could not be found: %s", gen.id, exc)
            with self._lock:
                self.error, self._failed = str(exc), gen.id
        except Exception as exc:  # noqa: BLE001 - said in the queue's answer and the log, never a dead thread
            log.exception("review: finding the duplicates of generation %s failed", gen.id)
            with self._lock:
                self.error, self._failed = f"{type(exc).__name__}: {exc}", gen.id
        finally:
            with self._lock:
                self._finding = None
            self.live.release(gen)

    def page(self, offset: int, limit: int) -> dict[str, Any]:
        """One page of the undecided pairs, and the counts (runs in a worker thread: it reads the journal)."""
        found, finding = self.found()
        state = self.decisions.state()
        if found is None:
            return {"status": "error" if self.error and not finding else "finding", "error": self.error,
                    "generation": None, "total": 0, "decided": len(state.current), "offset": offset, "pairs": [],
                    "problems": state.problems}
        with self._lock:  # the undecided pairs, filtered again only when the journal or the pairs changed
            cached = self._filtered
        if cached is not None and cached[:2] == (len(state.history), found.generation):
            undecided = cached[2]
        else:
            undecided = np.array([p for p, k in enumerate(found.keys) if k not in state.current], np.int64)
            with self._lock:
                self._filtered = (len(state.history), found.generation, undecided)
        pairs = []
        for p in undecided[offset:offset + limit].tolist():
            a, b = found.rows[p].tolist()
            pairs.append({"a": self._photo(found, a), "b": self._photo(found, b),
                          "score": round(float(found.score[p]), 6), "kind": "exact" if found.exact[p] else "near",
                          "verified": found.verified[p], "inliers": found.inliers[p]})
        return {"status": "refreshing" if finding else "ready", "error": self.error, "generation": found.generation,
                "total": len(undecided), "decided": len(state.current), "offset": offset, "pairs": pairs,
                "problems": state.problems}

    @staticmethod
    def _photo(found: _Found, row: int) -> dict[str, Any]:
        return {"id": int(found.ids[row]), "path": found.paths[row], "stale": found.stale.get(row)}


def decision_json(d: Decision, paths: dict[str, str]) -> dict[str, Any]:
    """A journal record as the API shows it: the photos by their current paths (when the store has them)."""
    return {"a": paths.get(d.a, d.a), "b": paths.get(d.b, d.b), "decision": d.decision,
            "keeper": paths.get(d.keeper, d.keeper) if d.keeper else None, "at": d.at, "source": d.source}


async def _json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, read to at most MAX_BODY bytes (ApiError 413/400 otherwise)."""
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise ApiError(413, "too_large", f"a review request is at most {MAX_BODY} bytes")
    try:
        body = json.loads(data or b"null")
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "bad_request", "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return body


def _photo_id(body: dict[str, Any], name: str, required: bool = True) -> int | None:
    v = body.get(name)
    if v is None and not required:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ApiError(400, "bad_request", f"'{name}' must be a photo id (a non-negative integer), got {v!r}")
    return v


def _rows(gen: Served, *ids: int) -> list[int]:
    """The catalogue rows of photo ids in a generation (ApiError 400 for an id it does not hold)."""
    rows = gen.searcher.rows_of(list(ids)).tolist()
    for i, r in zip(ids, rows):
        if r < 0:
            raise ApiError(400, "unknown_photo", f"no photo with id {i} in the store (generation {gen.id})")
    return [int(r) for r in rows]


def _pair_of(gen: Served, body: dict[str, Any]) -> tuple[int, int, int, int]:
    """The pair's ids and catalogue rows (ApiError 400 for an unknown photo, or one photo twice)."""
    a, b = _photo_id(body, "a") or 0, _photo_id(body, "b") or 0
    if a == b:
        raise ApiError(400, "unknown_pair", f"a pair needs two photos; 'a' and 'b' are both {a}")
    ra, rb = _rows(gen, a, b)
    sha = gen.searcher.cat.sha256
    if sha[ra] == sha[rb]:
        raise ApiError(400, "unknown_pair", f"photos {a} and {b} hold the same bytes: one photo, nothing to decide")
    return a, b, ra, rb


def add_review_routes(app: FastAPI) -> None:
    """The review page and its JSON API, on the app of create_app (its state.service serves the store)."""
    queues: dict[int, ReviewQueue] = {}

    def queue(request: Request) -> ReviewQueue:
        s = request.app.state.service
        q = queues.get(id(s))
        if q is None:  # made on the event loop's thread: no race
            q = queues[id(s)] = ReviewQueue(s.live)
        return q

    async def in_thread(request: Request, fn: Any, *args: Any) -> Any:
        """fn(gen, *args) in the service's files pool, the current generation held while it runs."""
        s = request.app.state.service
        client = request.client.host if request.client else "?"
        with s.live.use() as gen:
            try:
                return await s.files.run(client, s.live.held, gen, fn, gen, *args)
            except InputError as exc:
                raise ApiError(400, "bad_request", str(exc)) from None

    @app.get("/review", include_in_schema=False)
    async def review_page() -> Response:
        page = resources.files("neardup.serve").joinpath("static", "review.html").read_text(encoding="utf-8")
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={**SECURITY_HEADERS, "Content-Security-Policy": PAGE_CSP})

    @app.get("/v1/review/queue", summary="Duplicate pairs nobody has decided yet, a page at a time")
    async def review_queue(request: Request,
                           offset: Annotated[int, Query(ge=0, le=2**62, description="Pairs to skip.")] = 0,
                           limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Pairs to send.")] = 50
                           ) -> dict:
        q = queue(request)
        return await in_thread(request, lambda gen: q.page(offset, limit))

    @app.get("/v1/review/inliers", summary="The inlier correspondences of a pair's verification")
    async def review_inliers(request: Request,
                             a: Annotated[int, Query(ge=0, le=2**63 - 1, description="One photo's id.")],
                             b: Annotated[int, Query(ge=0, le=2**63 - 1, description="The other's.")]) -> dict:
        def points(gen: Served) -> dict:
            ra, rb = _rows(gen, a, b)
            v = pair_points(gen.searcher.gen, ra, rb)
            lines: list[list[float]] = []
            if v.xy_a is not None and v.xy_b is not None:
                pick = np.sort(np.random.default_rng(0).permutation(len(v.xy_a))[:MAX_LINES])
                lines = np.round(np.hstack([v.xy_a[pick], v.xy_b[pick]]).astype(np.float64), 4).tolist()
            return {"a": a, "b": b, "verified": v.verified, "judged": v.judged, "inliers": v.inliers, "lines": lines}
        return await in_thread(request, points)

    @app.post("/v1/review/decisions", summary="Record a decision on a pair: duplicate (with a keeper) or distinct")
    async def review_decide(request: Request) -> dict:
        body = await _json_body(request)
        word = body.get("decision")
        if word not in DECISIONS:
            raise ApiError(400, "unknown_decision", f"unknown decision {word!r}: use one of {', '.join(DECISIONS)}")
        unknown = set(body) - {"a", "b", "decision", "keeper"}
        if unknown:
            raise ApiError(400, "bad_request", f"unknown field(s) {', '.join(sorted(unknown))}: send a, b, decision "
                           "and optionally keeper")
        keeper = _photo_id(body, "keeper", required=False)

        def decide(gen: Served) -> dict:
            a, b, ra, rb = _pair_of(gen, body)
            if keeper is not None and keeper not in (a, b):
                raise ApiError(400, "bad_request", f"the keeper ({keeper}) must be one of the pair ({a}, {b})")
            if keeper is not None and word != "duplicate":
                raise ApiError(400, "bad_request", "only a duplicate pair has a keeper")
            d = record_decision(gen.searcher.gen, a, b, str(word), keeper, source="page")
            return {"recorded": _shown(gen, d, ra, rb)}
        return await in_thread(request, decide)

    @app.post("/v1/review/undo", summary="Undo the latest decision on a pair (recorded as a new decision)")
    async def review_undo(request: Request) -> dict:
        body = await _json_body(request)
        unknown = set(body) - {"a", "b"}
        if unknown:
            raise ApiError(400, "bad_request", f"unknown field(s) {', '.join(sorted(unknown))}: send a and b")

        def undo(gen: Served) -> dict:
            a, b, ra, rb = _pair_of(gen, body)
            sha = gen.searcher.cat.sha256
            key = pair_key(sha[ra], sha[rb])
            mine = [d for d in decisions_for(gen.searcher.gen).history if (d.a, d.b) == key]
            if not mine:
                raise ApiError(400, "nothing_to_undo", f"no decision on photos {a} and {b} to undo")
            last, before = mine[-1], None
            for d in mine[:-1]:  # the pair's decision before the last one (an "undecided" takes it back)
                before = None if d.decision == UNDECIDED else d
            word, keep = (before.decision, before.keeper) if before else (UNDECIDED, None)
            keeper = None if keep is None else (a if keep == sha[ra] else b)
            d = record_decision(gen.searcher.gen, a, b, word, keeper, source="page undo")
            return {"undid": _shown(gen, last, ra, rb), "recorded": _shown(gen, d, ra, rb)}
        return await in_thread(request, undo)

    def _shown(gen: Served, d: Decision, *rows: int) -> dict[str, Any]:
        cat = gen.searcher.cat
        return decision_json(d, {cat.sha256[r]: cat.paths[r] for r in rows})
