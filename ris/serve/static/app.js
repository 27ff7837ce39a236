// ris-serve page: upload or drop a photo, see its nearest database images, click one to search with it.
// Plain browser JavaScript, no libraries: everything comes from this server.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const state = {
    key: sessionStorage.getItem("ris-api-key") || "",
    health: null,
    query: null,   // {kind: "upload", file} or {kind: "id", id, path}
    shown: null,   // the query whose results are on the page, and their summary
    seq: 0,        // only the newest answer is shown
    blobs: [],
    turnsSet: false,  // the "turned photos" box starts as the server's --rotations, then is the user's
  };

  const authHeaders = () => (state.key ? { "X-API-Key": state.key } : {});
  const mb = (n) => `${(n / 1e6).toFixed(n < 1e7 ? 1 : 0)} MB`;
  const baseName = (p) => String(p).split("/").pop();

  async function api(path, options = {}) {
    let res;
    try {
      res = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...authHeaders() } });
    } catch (_) {
      throw Object.assign(new Error("The server cannot be reached; is ris-serve still running?"), { status: 0 });
    }
    let body = null;
    try { body = await res.json(); } catch (_) { /* not JSON */ }
    if (!res.ok) {
      const detail = body && typeof body.detail === "string" ? body.detail
        : `The server answered ${res.status} ${res.statusText}.`;
      throw Object.assign(new Error(detail), { status: res.status, body });
    }
    return body;
  }

  function showError(message) {
    const el = $("error");
    el.textContent = message;
    el.hidden = false;
  }
  const clearError = () => { $("error").hidden = true; $("error").textContent = ""; };

  // -- server status ------------------------------------------------------------------
  async function refreshHealth() {
    const status = $("status");
    try {
      const h = await api("/api/health");
      state.health = h;
      status.className = "status ok";
      const head = h.head ? ` + ${h.head}` : "";
      status.textContent = `${h.rows.toLocaleString()} images · ${h.model}${head} · ${h.dimension}-d · ${h.index} index`;
      fillRerank(h.rerank || ["none"], h.default_rerank);
      if (!state.turnsSet) { $("turns").checked = Boolean(h.rotations); state.turnsSet = true; }
      syncTurns();
      $("k").max = h.max_k;
      clearErrorIf401();
      if (!state.ready) {  // its first answer (at once, after loading, or once the key is in): k, then #id=N
        state.ready = true;
        $("k").value = h.default_k;
        if (!state.query) startFromUrl();
      }
      return true;
    } catch (e) {
      const waiting = e.status === 503 && e.body && ["loading", "reloading"].includes(e.body.status);
      if (waiting) {  // the server is starting, or reloading a database rewritten in place: look again
        status.className = "status wait";
        status.textContent = e.body.status === "loading" ? "loading the model and the database…"
          : "reloading the database…";
        setTimeout(refreshHealth, 1000);
      } else if (e.status === 503 && e.body && e.body.status === "failed") {
        status.className = "status";
        status.textContent = "not ready";
        showError(`The search engine failed to load: ${e.body.error}`);
      } else if (e.status === 401) {
        status.className = "status wait";
        status.textContent = "API key needed";
        showError(keyMessage(e));
      } else {
        status.className = "status";
        status.textContent = "not ready";
        showError(e.message);
      }
      return false;
    }
  }

  function keyMessage(e) {
    return /wrong/i.test(e.message) ? "Wrong API key: check the API key field."
      : "This server needs an API key: enter it in the API key field.";
  }

  function clearErrorIf401() {
    if (/API key/.test($("error").textContent)) clearError();
  }

  function fillRerank(methods, preferred) {
    const sel = $("rerank");
    // first fill: the service's default re-ranking; later: what the user chose, while offered
    const current = state.rerankSet ? sel.value : (preferred || "none");
    sel.replaceChildren(...methods.map((m) => new Option(m, m)));
    sel.value = methods.includes(current) ? current : "none";
    state.rerankSet = true;
  }

  // "Turned photos" and the re-rankings that cannot merge turned copies (their scores are normalised
  // per query: diffusion, kreciprocal) exclude each other; whichever is chosen first greys the other
  // out, so the page never sends a search the server refuses (400).
  function syncTurns() {
    const turnable = state.health && state.health.rerank_rotations;
    const fits = (m) => !turnable || turnable.includes(m);
    const sel = $("rerank"), box = $("turns"), note = $("turns-note");
    if (box.checked && !fits(sel.value)) box.checked = false;  // both at the start: the re-ranking wins
    for (const o of sel.options) {
      o.disabled = box.checked && !fits(o.value);
      o.textContent = o.disabled ? `${o.value} (not with turned photos)` : o.value;
    }
    box.disabled = !fits(sel.value);
    note.textContent = box.disabled ? `not with ${sel.value}` : "";
    note.hidden = !box.disabled;
  }

  // -- images (with a key, <img src> cannot send it: fetch, then show the blob) ---------------
  async function setImage(img, url) {
    img.onerror = () => img.classList.add("broken");
    if (!state.key) { img.src = url; return; }
    try {
      const res = await fetch(url, { headers: authHeaders() });
      if (!res.ok) throw new Error(String(res.status));
      const blob = URL.createObjectURL(await res.blob());
      state.blobs.push(blob);
      img.src = blob;
    } catch (_) {
      img.classList.add("broken");
    }
  }

  function forgetBlobs() {
    state.blobs.forEach((b) => URL.revokeObjectURL(b));
    state.blobs = [];
  }

  // -- searching ----------------------------------------------------------------------
  function kValue() {
    const max = state.health ? state.health.max_k : 100;
    const raw = $("k").value.trim();
    const k = raw === "" || !Number.isFinite(Number(raw)) ? (state.health ? state.health.default_k : 12) : Math.round(Number(raw));
    const clamped = Math.min(Math.max(k, 1), max);
    if (clamped !== k) $("k").value = clamped;
    return clamped;
  }

  function searchFile(file) {
    if (!file) return;
    const limit = state.health ? state.health.max_upload_bytes : Infinity;
    if (file.size > limit) {
      showError(`${file.name} is ${mb(file.size)}; the upload limit is ${mb(limit)}.`);
      return;
    }
    state.query = { kind: "upload", file };
    history.replaceState(null, "", location.pathname);  // the address no longer names a database image
    run();
  }

  function searchId(id, path) {
    state.query = { kind: "id", id, path };
    history.replaceState(null, "", `#id=${id}`);
    run();
  }

  async function run() {
    const q = state.query;
    if (!q) return;
    const seq = ++state.seq;
    const k = kValue();
    const rerank = $("rerank").value;
    clearError();
    $("results").setAttribute("aria-busy", "true");
    $("summary").textContent = "Searching…";
    try {
      let data;
      if (q.kind === "upload") {
        const form = new FormData();
        form.append("image", q.file, q.file.name);
        form.append("k", String(k));
        form.append("rerank", rerank);
        form.append("rotations", $("turns").checked ? "true" : "false");
        data = await api("/api/search", { method: "POST", body: form });
      } else {
        data = await api(`/api/search?id=${encodeURIComponent(q.id)}&k=${k}&rerank=${encodeURIComponent(rerank)}`);
      }
      if (seq === state.seq) render(data, q);
    } catch (e) {
      if (seq !== state.seq) return;
      showError(e.status === 401 ? keyMessage(e) : e.message);
      // the results on the page stay, and so do their query, address and summary: k and the
      // re-ranking then apply to what is shown, not to the file or id just refused
      $("summary").textContent = state.shown ? state.shown.summary : "";
      if (state.shown && q !== state.shown.query) {
        state.query = state.shown.query;
        history.replaceState(null, "", state.query.kind === "id" ? `#id=${state.query.id}` : location.pathname);
      }
      if (e.status === 401) $("key").focus();
    } finally {
      if (seq === state.seq) $("results").setAttribute("aria-busy", "false");
    }
  }

  function render(data, q) {
    forgetBlobs();
    $("hint").hidden = true;
    $("results").hidden = false;
    const img = $("query-img");
    img.classList.remove("broken");
    if (q.kind === "upload") {
      const url = URL.createObjectURL(q.file);
      state.blobs.push(url);
      img.src = url;
      $("query-name").textContent = data.query.filename;
      $("query-meta").textContent = `${data.query.width} × ${data.query.height} ${data.query.format}, uploaded`;
      history.replaceState(null, "", location.pathname);
    } else {
      setImage(img, data.query.thumb_url);
      $("query-name").textContent = baseName(data.query.path);
      const label = data.query.label ? ` · label ${data.query.label}` : "";
      $("query-meta").textContent = `image id ${data.query.id}${label}`;
    }
    if (state.health && data.database.generation !== state.health.generation) refreshHealth();  // reloaded
    const t = data.timing_ms;
    const rr = data.rerank === "none" ? "" : ` · re-ranked (${data.rerank})`;
    const turns = data.rotations ? " · turned copies searched too" : "";
    $("summary").textContent = `${data.results.length} of ${data.database.rows.toLocaleString()} images${rr}${turns} · `
      + `${Math.round(t.total + (t.queue || 0))} ms on the server`;
    const grid = $("grid");
    grid.replaceChildren(...data.results.map(card));
    state.shown = { query: q, summary: $("summary").textContent };
  }

  function card(hit) {
    const li = document.createElement("li");
    const btn = document.createElement("button");
    btn.type = "button";
    btn.className = "card";
    btn.dataset.testid = "result";
    btn.dataset.id = hit.id;
    btn.dataset.path = hit.path;
    btn.title = `${hit.path}\nclick: more like this`;
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = hit.rank;
    const img = document.createElement("img");
    img.className = "thumb";
    img.alt = hit.path;
    img.loading = "lazy";
    img.width = 256;
    img.height = 256;
    setImage(img, hit.thumb_url);
    const info = document.createElement("span");
    info.className = "info";
    const name = document.createElement("span");
    name.className = "name";
    name.dataset.testid = "result-name";
    name.textContent = baseName(hit.path);
    const meta = document.createElement("span");
    meta.className = "meta";
    const dist = document.createElement("span");
    dist.className = "dist";
    dist.dataset.testid = "result-distance";
    dist.textContent = hit.distance.toFixed(3);
    dist.title = "distance (smaller = more similar)";
    meta.append(dist);
    if (hit.label) {
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = `label ${hit.label}`;
      meta.append(label);
    }
    info.append(name, meta);
    btn.append(rank, img, info);
    btn.addEventListener("click", () => {
      window.scrollTo({ top: 0, behavior: "smooth" });
      searchId(hit.id, hit.path);
    });
    li.append(btn);
    return li;
  }

  // -- wiring -------------------------------------------------------------------------
  function firstImage(files) {
    const list = Array.from(files || []);
    return list.find((f) => f.type.startsWith("image/") || /\.(tiff?|webp|bmp)$/i.test(f.name)) || list[0];
  }

  $("file").addEventListener("change", (e) => {
    searchFile(firstImage(e.target.files));
    e.target.value = "";  // choosing the same file again searches again
  });
  let depth = 0;
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; document.body.classList.remove("dragging"); } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    document.body.classList.remove("dragging");
    const file = firstImage(e.dataTransfer && e.dataTransfer.files);
    if (file) searchFile(file);
    else showError("Drop an image file from your computer (a link or text cannot be searched).");
  });
  document.addEventListener("paste", (e) => {
    const file = firstImage(e.clipboardData && e.clipboardData.files);
    if (file) searchFile(file);
  });
  let timer = 0;
  const rerun = () => { clearTimeout(timer); timer = setTimeout(run, 250); };
  $("k").addEventListener("input", rerun);
  $("rerank").addEventListener("change", () => { syncTurns(); run(); });
  $("turns").addEventListener("change", () => {
    state.turnsSet = true;
    syncTurns();
    if (state.query && state.query.kind === "upload") run();
  });
  $("key").value = state.key;
  $("key").addEventListener("change", async () => {
    state.key = $("key").value.trim();
    if (state.key) sessionStorage.setItem("ris-api-key", state.key);
    else sessionStorage.removeItem("ris-api-key");
    const had = state.query;
    if (await refreshHealth()) (had ? run() : startFromUrl());
  });

  function startFromUrl() {  // #id=N (the address of a "more like this" search) searches at once
    const m = /^#id=(\d+)$/.exec(location.hash);
    if (m && !(state.query && state.query.kind === "id" && state.query.id === Number(m[1]))) searchId(Number(m[1]));
  }
  window.addEventListener("hashchange", () => { if (state.health) startFromUrl(); });  // a shared link pasted into this tab

  refreshHealth();
})();
