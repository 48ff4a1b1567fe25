// What both neardup pages share: requests to the service with the bearer token the search page keeps
// (sessionStorage, so one typed on either page works on the other); a JSON error becomes an Error carrying the
// server's {code, message, ...}, and a 401 shows the page's token box.
"use strict";
window.neardupApi = (function () {
  function headers(extra) {
    const token = sessionStorage.getItem("neardup-token") || "";
    return Object.assign(token ? { Authorization: "Bearer " + token } : {}, extra || {});
  }

  async function call(url, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = headers(opts.headers);
    const resp = await fetch(url, opts);
    if (resp.status === 401) { document.getElementById("token-row").hidden = false; }
    if (!resp.ok) {
      let detail = { code: String(resp.status), message: resp.statusText };
      try { detail = (await resp.json()).error; } catch (e) { /* not JSON */ }
      const err = new Error(detail.code + ": " + detail.message);
      err.detail = detail;
      throw err;
    }
    return resp;
  }

  return { headers, call };
})();
