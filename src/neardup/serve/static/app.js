// The neardup page: send photos to /v1/query, show each one's matches as thumbnails with scores and the verdict.
// Everything from the server or a file name reaches the page through textContent or a blob: URL, never HTML.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const state = { info: null, last: null, thumbs: new Map() };

  function headers() {
    const token = sessionStorage.getItem("neardup-token") || "";
    return token ? { Authorization: "Bearer " + token } : {};
  }

  function status(text) { $("status").textContent = text; }

  async function call(url, options) {
    const resp = await fetch(url, Object.assign({ headers: headers() }, options || {}));
    if (resp.status === 401) { $("token-row").hidden = false; }
    if (!resp.ok) {
      let message = resp.status + " " + resp.statusText;
      try { const body = await resp.json(); message = body.error.code + ": " + body.error.message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    return resp;
  }

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

  async function thumb(img, id) {
    const key = state.last.generation + "/" + id;
    let url = state.thumbs.get(key);
    if (!url) {
      const blob = await (await call("v1/thumbs/" + id)).blob();
      url = URL.createObjectURL(blob);
      state.thumbs.set(key, url);
    }
    img.src = url;
  }

  async function openFull(event) {
    if (!sessionStorage.getItem("neardup-token")) return; // the plain link works without a token
    event.preventDefault();
    const blob = await (await call(event.currentTarget.getAttribute("href"))).blob();
    window.open(URL.createObjectURL(blob), "_blank", "noopener");
  }

  function render() {
    const out = $("results");
    out.replaceChildren();
    if (!state.last) return;
    const t = threshold();
    const verified = state.last.verified;
    state.last.results.forEach((r, i) => {
      const card = $("result-tpl").content.firstElementChild.cloneNode(true);
      card.querySelector(".name").textContent = r.name;
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
        else if (verified) { badge.textContent = "too plain to verify"; }
        li.querySelector(".path").textContent = m.path;
        list.appendChild(li);
      }
      out.appendChild(card);
    });
  }

  async function send(files) {
    files = Array.from(files).filter((f) => f.size > 0);
    if (!files.length) return;
    const form = new FormData();
    for (const f of files) form.append("image", f, f.name);
    status("Looking up " + files.length + " photo" + (files.length > 1 ? "s" : "") + "…");
    const started = performance.now();
    try {
      const answer = await (await call("v1/query?k=" + encodeURIComponent($("k").value), { method: "POST", body: form })).json();
      if (state.last) state.last.previews.forEach((u) => URL.revokeObjectURL(u));
      answer.previews = files.map((f) => URL.createObjectURL(f));
      state.last = answer;
      status("Answered by generation " + answer.generation + " in " + Math.round(performance.now() - started) + " ms.");
      render();
    } catch (err) {
      status("Failed: " + err.message);
    }
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
