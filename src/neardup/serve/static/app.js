// The neardup page: send photos to /v1/query, show each one's matches as thumbnails with scores and the verdict.
// Everything from the server or a file name reaches the page through textContent or a blob: URL, never HTML.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const state = { info: null, last: null, thumbs: new Map() };

  const { call } = window.neardupApi;

  function status(text) { $("status").textContent = text; }

  async function loadInfo() {
    try {
      const info = await (await call("v1/info")).json();
      state.info = info;
      $("store").textContent = info.store + ": " + info.count + " photos, model " + info.model +
        ", generation " + info.generation + (info.verify ? ", verified matches" : "");
      const t = $("threshold");
      t.min = String(Math.min(0, info.threshold - 0.5));
      t.value = String(info.threshold);
      showThreshold();
    } catch (err) {
      $("store").textContent = "Not connected: " + err.message;
    }
  }

  function threshold() { return parseFloat($("threshold").value); }
  function showThreshold() { $("threshold-value").textContent = threshold().toFixed(3); }

  // The verdict rule of QueryResult.found: verified matches count; a photo too plain to verify (null) and
  // unverified results compare their score with the threshold.
  function isMatch(result, m, t) {
    if (result.verified === true && m.verified !== null) return m.verified === true;
    return m.score >= t;
  }

  // One fetch per thumbnail and answer (a promise, so re-rendering while it loads does not fetch again); the
  // blob URLs are revoked when the next answer replaces these results.
  function thumb(img, id) {
    let p = state.thumbs.get(id);
    if (!p) {
      p = call("v1/thumbs/" + id).then((r) => r.blob()).then((b) => URL.createObjectURL(b));
      state.thumbs.set(id, p);
    }
    return p.then((url) => { img.src = url; });
  }

  function forget() {
    for (const p of state.thumbs.values()) p.then((u) => URL.revokeObjectURL(u), () => {});
    state.thumbs.clear();
    if (state.last) state.last.previews.forEach((u) => URL.revokeObjectURL(u));
  }

  async function openFull(event) {
    if (!sessionStorage.getItem("neardup-token")) return; // the plain link works without a token
    event.preventDefault();
    const blob = await (await call(event.currentTarget.getAttribute("href"))).blob();
    const url = URL.createObjectURL(blob);
    window.open(url, "_blank", "noopener");
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  function render() {
    const out = $("results");
    out.replaceChildren();
    if (!state.last) return;
    const t = threshold();
    const verified = state.last.verified;
    state.last.results.forEach((r, i) => {
      const card = $("result-tpl").content.firstElementChild.cloneNode(true);
      card.querySelector(".name").textContent = r.query;
      card.querySelector(".query-img").src = state.last.previews[i];
      const verdict = card.querySelector(".verdict");
      if (r.error) {
        card.querySelector(".error").textContent = r.error;
        verdict.textContent = "Not checked";
      } else {
        const found = r.matches.some((m) => isMatch(state.last, m, t));
        verdict.textContent = found ? "Already in the catalogue" : "New: no match" + (verified ? " verified" : " at this threshold");
        verdict.className = "verdict " + (found ? "found" : "new");
      }
      const list = card.querySelector(".matches");
      for (const m of r.matches) {
        const li = $("match-tpl").content.firstElementChild.cloneNode(true);
        if (isMatch(state.last, m, t)) li.classList.add("is-match");
        const img = li.querySelector(".thumb");
        img.dataset.id = String(m.id);
        img.alt = m.path;
        thumb(img, m.id).catch((err) => { img.alt = "thumbnail unavailable: " + err.message; });
        const a = li.querySelector(".full");
        a.href = "v1/images/" + m.id;
        a.addEventListener("click", openFull);
        li.querySelector(".score").textContent = "#" + m.rank + "  score " + m.score.toFixed(4);
        const badge = li.querySelector(".badge");
        if (m.verified === true) { badge.textContent = "verified, " + m.inliers + " inliers"; badge.classList.add("verified"); }
        else if (m.verified === false) { badge.textContent = "not verified (" + m.inliers + " inliers)"; }
        else if (verified) { badge.textContent = "unverified (too plain, or past the request's verification budget): judged by the threshold"; }
        // a person's decision on this photo and the catalogue one (the review page, `neardup review import`)
        const reviewed = li.querySelector(".reviewed");
        if (m.decision) {
          reviewed.textContent = "reviewed: " + (m.decision === "duplicate" ? "a duplicate" : "not a duplicate (distinct)")
            + (m.keeper === true ? ", keep this one" : m.keeper === false ? ", keep the other" : "");
          reviewed.classList.add(m.decision);
          reviewed.hidden = false;
        }
        li.querySelector(".path").textContent = m.path;
        list.appendChild(li);
      }
      out.appendChild(card);
    });
  }

  // Photos go in requests of at most the server's image count; a photo over its size cap, or one the server
  // could not read, is shown with its reason beside the others' answers.
  async function send(files) {
    files = Array.from(files);
    if (!files.length) return;
    const limits = (state.info && state.info.limits) || { max_images: 16, max_upload_mb: 20 };
    const cap = limits.max_upload_mb * 1048576;
    const answer = { results: new Array(files.length), generation: null, verified: false, previews: [] };
    const started = performance.now();
    let failure = null;
    const ok = [];
    files.forEach((f, i) => {
      if (f.size > cap) answer.results[i] = { query: f.name, error: "larger than " + limits.max_upload_mb + " MiB", matches: [] };
      else ok.push(i);
    });
    for (let at = 0; at < ok.length; at += limits.max_images) {
      const chunk = ok.slice(at, at + limits.max_images);
      status("Looking up photos " + (at + 1) + "–" + (at + chunk.length) + " of " + ok.length + "…");
      const form = new FormData();
      for (const i of chunk) form.append("image", files[i], files[i].name);
      try {
        const got = await (await call("v1/query?k=" + encodeURIComponent($("k").value), { method: "POST", body: form })).json();
        answer.generation = got.generation;
        answer.verified = answer.verified || got.verified;
        chunk.forEach((i, j) => { answer.results[i] = got.results[j]; });
      } catch (err) {
        const each = (err.detail && err.detail.images) || [];
        chunk.forEach((i, j) => { answer.results[i] = { query: files[i].name, error: each[j] ? each[j].error : err.message, matches: [] }; });
        if (!each.length) failure = err.message;
      }
    }
    forget();
    answer.previews = files.map((f) => URL.createObjectURL(f));
    state.last = answer;
    const ms = Math.round(performance.now() - started);
    status(failure ? "Failed: " + failure
      : "Answered" + (answer.generation ? " by generation " + answer.generation : "") + " in " + ms + " ms.");
    render();
  }

  function init() {
    const drop = $("drop");
    $("files").addEventListener("change", (e) => { send(e.target.files); e.target.value = ""; });
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); send(e.dataTransfer.files); });
    drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("files").click(); });
    $("threshold").addEventListener("input", () => { showThreshold(); render(); });
    $("token").addEventListener("change", (e) => { sessionStorage.setItem("neardup-token", e.target.value); loadInfo(); });
    loadInfo();
  }

  init();
})();
