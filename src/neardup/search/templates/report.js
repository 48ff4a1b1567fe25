(function () {
  "use strict";
  // Everything from the data island is put into the page with textContent or DOM properties, never innerHTML.
  var D = JSON.parse(document.getElementById("neardup-data").textContent);
  var state = { tab: D.has_groups && D.groups.length ? "groups" : "pairs", page: { groups: 0, pairs: 0 },
                lo: null, hi: null };
  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function readBound(id) {
    var v = parseFloat($(id).value);
    return isNaN(v) ? null : v;
  }
  function inRange(s) {
    // 1e-9 absorbs decimal round-off between the typed bound and the 6-decimal scores
    return (state.lo === null || s >= state.lo - 1e-9) && (state.hi === null || s <= state.hi + 1e-9);
  }
  function figure(i, badge, keeper) {
    var im = D.images[i];
    var f = el("figure", keeper ? "keeper" : "");
    if (!im.t) { f.classList.add("missing"); }
    if (badge) { f.appendChild(el("span", "badge", badge)); }
    var frame = el(im.u ? "a" : "div", "frame");
    if (im.u) { frame.href = im.u; frame.target = "_blank"; frame.rel = "noopener"; frame.title = "open the original"; }
    var img = el("img");
    img.alt = im.p;
    img.src = im.t || D.placeholder;
    frame.appendChild(img);
    f.appendChild(frame);
    var cap = el("figcaption");
    var name = el("span", "path");
    name.title = im.p;
    var cut = im.d.lastIndexOf("/");
    if (cut >= 0) { name.appendChild(el("span", "dir", im.d.slice(0, cut + 1))); }
    name.appendChild(el("span", "name", im.d.slice(cut + 1)));
    cap.appendChild(name);
    var meta = im.t ? (im.w ? im.w + "\u00d7" + im.h + " px \u00b7 " + im.s : "") : "missing or unreadable";
    cap.appendChild(el("span", "meta", meta));
    f.appendChild(cap);
    return f;
  }
  function pairCard(k) {
    var p = D.pairs[k];
    var card = el("div", "card pair");
    var head = el("div", "card-head");
    head.appendChild(el("span", "idx", "#" + (k + 1)));
    head.appendChild(el("span", "score", p[2].toFixed(4)));
    head.appendChild(el("span", p[3] ? "kind exact" : "kind near", p[3] ? "exact" : "near"));
    // p[4]: 1 verified, 0 failed verification, -1 not verified; p[5]: RANSAC inliers (-1: none measured)
    if (p[4] >= 0 && !p[3]) {
      head.appendChild(el("span", p[4] ? "kind verified" : "kind unverified", p[4] ? "verified" : "not verified"));
      if (p[5] >= 0) { head.appendChild(el("span", "idx", p[5] + " inliers")); }
    }
    // p[6]: a person's decision on the pair, recorded in the store's journal: 1 duplicate, 2 distinct
    if (p[6] === 1) { head.appendChild(el("span", "kind decided", "reviewed: duplicate")); }
    if (p[6] === 2) { head.appendChild(el("span", "kind distinct", "reviewed: distinct")); }
    card.appendChild(head);
    var sides = el("div", "sides");
    sides.appendChild(figure(p[0], "", false));
    sides.appendChild(figure(p[1], "", false));
    card.appendChild(sides);
    return card;
  }
  function groupCard(k) {
    var g = D.groups[k];
    var card = el("div", "card group");
    var head = el("div", "card-head");
    head.appendChild(el("span", "idx", "Group " + g.n));
    head.appendChild(el("span", "", g.m.length + " images"));
    head.appendChild(el("span", "score", g.lo.toFixed(4)));
    head.appendChild(el("span", "idx", "lowest score to keeper"));
    if (g.d) { head.appendChild(el("span", "kind decided", "reviewed: keeper chosen")); }
    card.appendChild(head);
    var sides = el("div", "sides");
    g.m.forEach(function (m) {
      var badge = m.k ? "\u2605 KEEP" : m.st ? "not removable: " + (m.st === "alias" ? "another name of the same "
                                                                  + "file" : m.st + " since indexed") :
        (m.x ? "exact copy" : "score " + m.s.toFixed(4) + (m.v >= 0 ? " \u00b7 " + m.v + " inliers" : ""));
      if (m.dc === 1) { badge += " \u00b7 reviewed: duplicate"; }
      if (m.dc === 2) { badge += " \u00b7 reviewed: distinct"; }
      sides.appendChild(figure(m.i, badge, m.k));
    });
    card.appendChild(sides);
    return card;
  }
  function matching() {
    var out = [], i;
    if (state.tab === "pairs") {
      for (i = 0; i < D.pairs.length; i++) { if (inRange(D.pairs[i][2])) { out.push(i); } }
    } else {
      for (i = 0; i < D.groups.length; i++) { if (inRange(D.groups[i].lo)) { out.push(i); } }
    }
    return out;
  }
  function render() {
    var list = $("list"), items = matching(), size = D.page_size;
    var pages = Math.max(1, Math.ceil(items.length / size));
    var page = Math.min(state.page[state.tab], pages - 1);
    state.page[state.tab] = page;
    var first = page * size, last = Math.min(items.length, first + size);
    var fragment = document.createDocumentFragment();
    for (var k = first; k < last; k++) {
      fragment.appendChild(state.tab === "pairs" ? pairCard(items[k]) : groupCard(items[k]));
    }
    list.replaceChildren(fragment);
    var given = state.tab === "pairs" ? D.has_pairs : D.has_groups;
    var noun = state.tab === "pairs" ? "pairs" : "groups";
    var total = state.tab === "pairs" ? D.pairs.length : D.groups.length;
    if (!items.length) {
      list.appendChild(el("p", "empty", !given ? "No " + noun + " were given to this report." :
                                        !total ? "No duplicate " + noun + " were found." :
                                                 "No " + noun + " in this score range."));
    }
    var count = $("count");
    count.dataset.matching = String(items.length);
    count.textContent = items.length ? "showing " + (first + 1) + "\u2013" + last + " of " + items.length +
        " " + noun + (items.length < total ? " (" + total + " in all)" : "") : "0 of " + total + " " + noun;
    $("page").textContent = "page " + (page + 1) + " of " + pages;
    $("prev").disabled = page === 0;
    $("next").disabled = page >= pages - 1;
    $("tab-pairs").setAttribute("aria-selected", String(state.tab === "pairs"));
    $("tab-groups").setAttribute("aria-selected", String(state.tab === "groups"));
  }
  function go(delta) {
    state.page[state.tab] += delta;
    if (state.page[state.tab] < 0) { state.page[state.tab] = 0; }
    render();
    window.scrollTo(0, 0);
  }
  function onFilter() {
    state.lo = readBound("min");
    state.hi = readBound("max");
    state.page.pairs = 0;
    state.page.groups = 0;
    render();
  }
  $("tab-pairs").textContent = "Pairs (" + D.pairs.length + ")";
  $("tab-groups").textContent = "Groups (" + D.groups.length + ")";
  $("min").value = D.lo.toFixed(2);
  $("max").value = String(D.hi);
  state.lo = readBound("min");
  state.hi = readBound("max");
  $("min").addEventListener("input", onFilter);
  $("max").addEventListener("input", onFilter);
  $("reset").addEventListener("click", function () {
    $("min").value = D.lo.toFixed(2);
    $("max").value = String(D.hi);
    onFilter();
  });
  $("prev").addEventListener("click", function () { go(-1); });
  $("next").addEventListener("click", function () { go(1); });
  $("tab-pairs").addEventListener("click", function () { state.tab = "pairs"; render(); });
  $("tab-groups").addEventListener("click", function () { state.tab = "groups"; render(); });
  document.addEventListener("keydown", function (e) {
    if (e.target && e.target.tagName === "INPUT") { return; }
    if (e.key === "ArrowLeft" && !$("prev").disabled) { go(-1); }
    if (e.key === "ArrowRight" && !$("next").disabled) { go(1); }
  });
  render();
})();
