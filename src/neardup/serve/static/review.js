// The neardup review page: the store's undecided duplicate pairs one at a time, side by side with the inlier
// lines of their verification; keys record decisions through /v1/review/decisions (and undo through
// /v1/review/undo: a new record, the journal keeps its history). Text from the server reaches the page through
// textContent or SVG attributes, never HTML.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const PAGE = 50;
  const state = {
    items: [], index: 0, total: null, generation: null, loading: null, done: false,
    images: new Map(), inliers: new Map(), undo: [],
  };
  // key presses act one after another, in the order pressed (a decision's request ends before the next key acts)
  let chain = Promise.resolve();

  function status(text, failed) {
    $("status").textContent = text;
    $("status").className = failed ? "failed" : "";
  }

  const { call } = window.neardupApi;  // requests with the token (api.js)

  function post(url, body) {
    return call(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  }

  const keyOf = (item) => item.a.id + "-" + item.b.id;
  // decided on the server: an undo that took the only decision back leaves the pair undecided
  const isDecided = (item) => !!item.decided && item.decided.decision !== "undecided";

  async function loadInfo() {
    try {
      const info = await (await call("v1/info")).json();
      $("store").textContent = info.store + ": " + info.count + " photos, model " + info.model +
        ", generation " + info.generation;
      return true;
    } catch (err) {
      $("store").textContent = "Not connected: " + err.message;
      return false;
    }
  }

  // The next page of undecided pairs. The server's queue leaves out decided pairs, so the pairs loaded here and
  // still undecided are its first ones: the next page starts after them.
  function loadMore() {
    if (state.loading) return state.loading;
    if (state.done) return Promise.resolve();
    const offset = state.items.filter((it) => !isDecided(it)).length;
    state.loading = (async () => {
      try {
        for (;;) {
          const q = await (await call("v1/review/queue?offset=" + offset + "&limit=" + PAGE)).json();
          if (q.status === "finding") {
            status("Finding the duplicate pairs of the store…");
            await new Promise((r) => setTimeout(r, 1000));
            continue;
          }
          if (q.status === "error") { status("The duplicate pairs could not be found: " + q.error, true); return; }
          state.generation = q.generation;
          const have = new Set(state.items.map(keyOf));
          const fresh = q.pairs.filter((p) => !have.has(keyOf(p)));
          state.items.push(...fresh);
          state.total = q.total + state.items.filter(isDecided).length;
          if (q.offset + q.pairs.length >= q.total || !fresh.length) state.done = true;
          status(q.total + " pairs to review" + (q.decided ? ", " + q.decided + " decided" : "") + "." +
            (q.problems && q.problems.length ? " The decisions journal: " + q.problems.join("; ") : ""),
            !!(q.problems && q.problems.length));
          return;
        }
      } catch (err) {
        status("Could not load the queue: " + err.message, true);
      } finally {
        state.loading = null;
      }
    })();
    return state.loading;
  }

  // a photo as a blob: URL (fetched with the token), one fetch per photo
  function image(id) {
    let p = state.images.get(id);
    if (!p) {
      p = call("v1/images/" + id).then((r) => r.blob()).then((b) => URL.createObjectURL(b));
      state.images.set(id, p);
    }
    return p;
  }

  function inliers(item) {
    const key = keyOf(item);
    let p = state.inliers.get(key);
    if (!p) {
      p = call("v1/review/inliers?a=" + item.a.id + "&b=" + item.b.id).then((r) => r.json());
      state.inliers.set(key, p);
    }
    return p;
  }

  function loaded(img) {
    return img.complete && img.naturalWidth > 0 ? Promise.resolve() : new Promise((resolve) => {
      img.addEventListener("load", resolve, { once: true });
      img.addEventListener("error", resolve, { once: true });
    });
  }

  // The inlier correspondences as SVG lines over the two photos (positions are fractions of each photo).
  function drawLines(item, got) {
    const svg = $("lines");
    svg.replaceChildren();
    if (current() !== item || !got) return;
    const stage = $("stage").getBoundingClientRect();
    const ra = $("img-a").getBoundingClientRect();
    const rb = $("img-b").getBoundingClientRect();
    if (!ra.width || !rb.width || !$("img-a").naturalWidth || !$("img-b").naturalWidth) return;
    svg.setAttribute("class", got.verified ? "verified" : "unverified");
    svg.dataset.lines = String(got.lines.length);
    for (const [xa, ya, xb, yb] of got.lines) {
      const line = document.createElementNS(SVG, "line");
      line.setAttribute("x1", (ra.left - stage.left + xa * ra.width).toFixed(1));
      line.setAttribute("y1", (ra.top - stage.top + ya * ra.height).toFixed(1));
      line.setAttribute("x2", (rb.left - stage.left + xb * rb.width).toFixed(1));
      line.setAttribute("y2", (rb.top - stage.top + yb * rb.height).toFixed(1));
      svg.appendChild(line);
    }
  }

  function current() { return state.items[state.index] || null; }

  function verdictText(item) {
    const parts = [item.kind === "exact" ? "byte-identical" : "score " + item.score.toFixed(4)];
    if (item.verified === true) parts.push("verified, " + item.inliers + " inliers");
    else if (item.verified === false) parts.push("not verified (" + item.inliers + " inliers)");
    else parts.push("not verified (judged by the threshold)");
    return parts.join(", ");
  }

  function decidedText(d) {
    if (!d) return "";
    if (d.decision === "undecided") return "Undecided again (the undo is kept in the history)";
    const keeper = d.keeper ? ", keep " + d.keeper : "";
    return "Decided: " + d.decision + keeper + (d.source === "page undo" ? " (undo)" : "");
  }

  async function render() {
    const item = current();
    $("pair").hidden = !item;
    $("empty").hidden = !!item || !state.done || state.loading !== null;
    $("lines").replaceChildren();
    if (!item) {
      $("position").textContent = state.total === null ? "" : "No pairs";
      return;
    }
    $("position").textContent = "Pair " + (state.index + 1) + " of " + state.total;
    $("pair").dataset.a = String(item.a.id);
    $("pair").dataset.b = String(item.b.id);
    $("path-a").textContent = item.a.path + (item.a.stale ? " (" + item.a.stale + ")" : "");
    $("path-b").textContent = item.b.path + (item.b.stale ? " (" + item.b.stale + ")" : "");
    $("verdict").textContent = verdictText(item);
    const d = item.decided;
    $("decided").textContent = decidedText(d);
    $("decided").className = d ? d.decision : "";
    const sides = document.querySelectorAll(".side");
    sides[0].classList.toggle("keeper", !!(d && d.keeper && d.keeper === item.a.path));
    sides[1].classList.toggle("keeper", !!(d && d.keeper && d.keeper === item.b.path));
    const imgs = [$("img-a"), $("img-b")];
    const want = [item.a, item.b];
    imgs.forEach((img, i) => {
      img.removeAttribute("src");
      img.alt = want[i].path;
      image(want[i].id).then((url) => { if (current() === item) img.src = url; },
        (err) => { if (current() === item) img.alt = "photo unavailable: " + err.message; });
    });
    let got = null;
    try { got = await inliers(item); } catch (err) { status("No inlier lines: " + err.message, true); }
    await Promise.all(imgs.map(loaded));
    drawLines(item, got);
    $("pair").dataset.drawn = keyOf(item);
  }

  async function move(step) {
    const next = state.index + step;
    if (next < 0) return;
    if (next >= state.items.length) {
      await loadMore();
      if (next >= state.items.length) { state.index = state.items.length; render(); return; }
    }
    state.index = next;
    if (state.items.length - state.index < 5) loadMore();
    render();
  }

  async function decide(decision, side) {
    const item = current();
    if (!item) return;
    const body = { a: item.a.id, b: item.b.id, decision: decision };
    if (side) body.keeper = side === 1 ? item.a.id : item.b.id;
    try {
      const got = await (await post("v1/review/decisions", body)).json();
      item.decided = got.recorded;
      state.undo.push(item);
      status("Recorded: " + decidedText(got.recorded).replace("Decided: ", "") + ".");
      await move(1);
    } catch (err) {
      status("Not recorded: " + err.message, true);
    }
  }

  async function undo() {
    const item = state.undo.pop();
    if (!item) { status("Nothing to undo in this session."); return; }
    try {
      const got = await (await post("v1/review/undo", { a: item.a.id, b: item.b.id })).json();
      item.decided = got.recorded;
      state.index = state.items.indexOf(item);
      status("Undone: " + got.undid.decision + "; recorded " + got.recorded.decision + " as the new decision.");
      render();
    } catch (err) {
      state.undo.push(item);
      status("Not undone: " + err.message, true);
    }
  }

  const KEYS = {
    d: () => decide("duplicate"), n: () => decide("distinct"), 1: () => decide("duplicate", 1),
    2: () => decide("duplicate", 2), u: undo, j: () => move(1), ArrowRight: () => move(1), k: () => move(-1),
    ArrowLeft: () => move(-1),
  };

  function onKey(e) {
    if (e.target instanceof HTMLInputElement || e.ctrlKey || e.metaKey || e.altKey) return;
    const act = KEYS[e.key];
    if (!act) return;
    e.preventDefault();
    chain = chain.then(act, act);
  }

  async function start() {
    state.items = []; state.index = 0; state.total = null; state.done = false;
    if (await loadInfo()) {
      await loadMore();
      render();
    }
  }

  function init() {
    document.addEventListener("keydown", onKey);
    $("token").addEventListener("change", (e) => {
      sessionStorage.setItem("neardup-token", e.target.value);
      e.target.blur(); // the keys act on the page again, not on the token box
      start();
    });
    window.addEventListener("resize", () => { const it = current(); if (it) inliers(it).then((g) => drawLines(it, g), () => {}); });
    start();
  }

  init();
})();
