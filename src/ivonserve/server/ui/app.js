// ivonserve's consensus page: streams POST /generate and shows what the draws said.
// Plain JS, no build step, no external network: every request goes to this server, relative to
// the page (so a proxy prefix keeps working). The API key is typed into the page, kept in this
// browser only (sessionStorage, or localStorage when "remember" is ticked) and sent as
// `Authorization: Bearer KEY` with every API call; it never goes into a URL or the curl command.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_NAME = "ivonserve.apiKey";
  const FIELDS = ["model", "n_models", "n_samples", "temperature", "max_tokens", "seed",
    "selection", "utility", "early_stop"];
  const INTEGER = new Set(["n_models", "n_samples", "max_tokens"]);
  // Tableau 20, strong shades first: the largest clusters get the most distinct colours
  const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
    "#ff9da7", "#9c755f", "#a0cbe8", "#ffbe7d", "#8cd17d", "#b6992d", "#f1ce63", "#499894",
    "#86bcb6", "#d37295", "#fabfd2", "#d4a6c8", "#79706e"];
  const OTHER = "#c9c9c9";
  const api = (path) => new URL(`../${path}`, new URL(".", window.location.href)).href;

  // --- state -------------------------------------------------------------------------------
  let S = fresh(null);

  function fresh(plan) {
    return {
      plan, // {n_models, n_samples} when known (from the form or the result)
      cands: new Map(), // "draw:sample" -> candidate
      stopped: new Set(), // keys shown as stopped (early stopping), when the server says so
      result: null,
      seed: null, // the seed as the server sent it (digits: 62-bit seeds exceed JS numbers)
      body: null,
      selected: null,
      draws: 0,
    };
  }
  const keyOf = (draw, sample) => `${draw === null || draw === undefined ? "mean" : draw}:${sample}`;

  // --- API key -------------------------------------------------------------------------------
  function loadKey() {
    const remembered = localStorage.getItem(KEY_NAME);
    $("remember-key").checked = remembered !== null;
    $("api-key").value = remembered ?? sessionStorage.getItem(KEY_NAME) ?? "";
  }
  function saveKey() {
    const key = $("api-key").value.trim();
    localStorage.removeItem(KEY_NAME);
    sessionStorage.removeItem(KEY_NAME);
    if (key) ($("remember-key").checked ? localStorage : sessionStorage).setItem(KEY_NAME, key);
  }
  function headers(json) {
    const h = json ? { "Content-Type": "application/json" } : {};
    const key = $("api-key").value.trim();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  // --- the posteriors (GET /v1/models) ---------------------------------------------------------
  const pools = new Map();
  async function loadModels() {
    const select = $("model");
    const keep = select.value;
    try {
      const answer = await fetch(api("v1/models"), { headers: headers(false) });
      if (!answer.ok) {
        const { message } = await errorOf(answer);
        $("key-note").textContent = answer.status === 401
          ? "this server needs an API key: enter it above"
          : `posteriors not listed: ${message}`;
        return;
      }
      $("key-note").textContent = "kept in this browser only; sent as Authorization: Bearer";
      const { data } = await answer.json();
      while (select.options.length > 1) select.remove(1);
      pools.clear();
      for (const card of data) {
        pools.set(card.id, card);
        const option = new Option(`${card.id} (${card.kind}, pool ${card.pool_size})`, card.id);
        select.add(option);
        if (card.default) select.options[0].textContent = `(server default: ${card.id})`;
      }
      if (keep) ensureOption(select, keep);
      hintPool();
    } catch (err) {
      $("key-note").textContent = `posteriors not listed: ${err.message}`;
    }
  }
  function ensureOption(select, value) {
    if (![...select.options].some((o) => o.value === value)) select.add(new Option(value, value));
    select.value = value;
  }
  function hintPool() {
    const id = $("model").value || [...pools.values()].find((c) => c.default)?.id;
    const card = pools.get(id);
    $("n_models").title = card ? `0..${card.pool_size} (0: the mean adapter alone)` : "";
  }

  // --- the request -----------------------------------------------------------------------------
  function requestBody() {
    const text = $("prompt").value;
    const body = {};
    if ($("as-messages").checked) {
      let messages;
      try {
        messages = JSON.parse(text);
      } catch (err) {
        throw new Error(`the messages are not valid JSON: ${err.message}`);
      }
      body.messages = messages;
    } else {
      body.prompt = text;
    }
    for (const name of FIELDS) {
      const raw = $(name).value.trim();
      if (raw === "") continue;
      if (name === "seed") {
        if (!/^\d+$/.test(raw)) throw new Error("seed: a whole number >= 0");
        body.seed = raw; // kept as digits; written into the JSON as a number by bodyJson
      } else if (INTEGER.has(name)) {
        body[name] = Number.parseInt(raw, 10);
      } else if (name === "temperature") {
        body[name] = Number.parseFloat(raw);
      } else {
        body[name] = raw;
      }
    }
    body.return_candidates = true;
    return body;
  }
  // JSON with the seed as a bare number of any size (JSON.stringify would round a 62-bit one)
  function bodyJson(body, extra) {
    const { seed, ...rest } = { ...body, ...extra };
    let json = JSON.stringify(rest);
    if (seed !== undefined && seed !== null) json = `${json.slice(0, -1)}${json.length > 2 ? "," : ""}"seed":${seed}}`;
    return json;
  }

  let controller = null;
  async function run(event) {
    if (event) event.preventDefault();
    if (controller) controller.abort();
    saveKey();
    hideError();
    let body;
    try {
      body = requestBody();
    } catch (err) {
      showError({ message: err.message });
      return;
    }
    const plan = body.n_models !== undefined && body.n_samples !== undefined
      ? { n_models: body.n_models, n_samples: body.n_samples } : null;
    S = fresh(plan);
    S.body = body;
    if (body.seed !== undefined) S.seed = String(body.seed);
    $("result").hidden = false;
    setState("running");
    renderAll();
    const mine = new AbortController();
    controller = mine;
    $("stop").disabled = false;
    $("run").disabled = true;
    status("sending…");
    try {
      const answer = await fetch(api("generate"), {
        method: "POST",
        headers: headers(true),
        body: bodyJson(body, { stream: true }),
        signal: mine.signal,
      });
      if (!answer.ok) {
        showError(await errorOf(answer));
        return;
      }
      status("generating…");
      await readEvents(answer, (data) => {
        let parsed;
        try {
          parsed = JSON.parse(data);
        } catch {
          return; // not ours (a keep-alive or a future event type): ignore
        }
        applyEvent(parsed, data);
      });
      if (S.result === null && $("result").dataset.state === "running") {
        showError({ message: "the stream ended without a result" });
      }
    } catch (err) {
      if (err.name === "AbortError") {
        if (controller === mine) {
          setState("stopped");
          status("stopped: you cancelled the request");
        }
      } else {
        showError({ message: `no answer from the server: ${err.message}` });
      }
    } finally {
      if (controller === mine) {
        controller = null;
        $("stop").disabled = true;
        $("run").disabled = false;
      }
    }
  }

  async function readEvents(answer, onData) {
    const reader = answer.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    const flush = (block) => {
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data && data !== "[DONE]") onData(data);
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        flush(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
    buffer += decoder.decode();
    if (buffer.trim()) flush(buffer);
  }

  async function errorOf(answer) {
    const text = await answer.text();
    try {
      const { error } = JSON.parse(text);
      if (error && error.message) return { ...error, status: answer.status };
    } catch {
      // not JSON: the text itself is the message
    }
    return { message: text || answer.statusText, status: answer.status };
  }

  // --- events ----------------------------------------------------------------------------------
  // A candidate (or an event) is "stopped" when the server says so: early stopping may flag it
  // `stopped: true` / `finished: false`, or vLLM's abort shows as finish_reason "abort".
  const STOPPED_REASONS = new Set(["abort", "aborted", "stopped", "early_stop", "early_stopped",
    "cancelled"]);
  function isStopped(obj) {
    if (!obj || typeof obj !== "object") return false;
    return obj.stopped === true || obj.early_stopped === true || obj.finished === false
      || STOPPED_REASONS.has(obj.finish_reason);
  }

  function applyEvent(ev, raw) {
    if (!ev || typeof ev !== "object") return;
    if (ev.type === "error" || (!ev.type && ev.error)) {
      showError(ev.error || ev);
      return;
    }
    if (ev.type === "result") {
      finish(ev.result, raw);
      return;
    }
    const flagged = isStopped(ev);
    if (Array.isArray(ev.candidates)) {
      for (const c of ev.candidates) addCandidate(c, flagged);
      if (ev.type === "candidates") S.draws += 1;
    } else if (flagged && "draw" in ev) {
      const samples = Array.isArray(ev.samples) ? ev.samples
        : ev.sample !== undefined ? [ev.sample] : [...Array(S.plan?.n_samples ?? 0).keys()];
      for (const s of samples) S.stopped.add(keyOf(ev.draw, s));
    }
    const of = S.plan ? ` of ${Math.max(1, S.plan.n_models)}` : "";
    status(`generating… ${S.draws}${of} draw${S.draws === 1 && !of ? "" : "s"} done`);
    renderAll();
  }

  function addCandidate(c, flagged) {
    const key = keyOf(c.draw, c.sample);
    S.cands.set(key, c);
    if (flagged || isStopped(c)) S.stopped.add(key);
  }

  function finish(result, raw) {
    S.result = result;
    const seed = /"seed"\s*:\s*(\d+)/.exec(raw || "");
    S.seed = seed ? seed[1] : String(result.seed);
    S.plan = { n_models: result.n_models, n_samples: result.n_samples };
    for (const c of result.candidates || []) addCandidate(c, false);
    for (const s of Array.isArray(result.stopped) ? result.stopped : []) {
      if (s && typeof s === "object") S.stopped.add(keyOf(s.draw, s.sample));
    }
    setState("done");
    status(`done in ${fmt(result.timing?.total_s, 2)} s`);
    $("raw").textContent = JSON.stringify(result, null, 2).replace(
      /"seed": \d+/, `"seed": ${S.seed}`);
    renderAll();
  }

  // --- rendering -------------------------------------------------------------------------------
  function clusterKey(c) {
    if (c.answer !== null && c.answer !== undefined && c.answer !== "") return `a:${c.answer}`;
    return `t:${(c.text || "").trim().replace(/\s+/g, " ")}`;
  }
  function clusterLabel(key) {
    if (key.startsWith("a:")) return key.slice(2);
    const text = key.slice(2);
    return text ? `“${clip(text, 40)}”` : "(empty)";
  }
  const clip = (s, n) => (s.length > n ? `${s.slice(0, n - 1)}…` : s);
  const fmt = (x, digits) => (typeof x === "number" ? x.toFixed(digits) : "–");
  const drawName = (d) => (d === null || d === undefined || d === "mean" ? "mean" : `draw ${d}`);

  function rows() {
    const draws = [];
    const samples = [];
    if (S.plan) {
      if (S.plan.n_models === 0) draws.push(null);
      for (let d = 0; d < S.plan.n_models; d++) draws.push(d);
      for (let s = 0; s < S.plan.n_samples; s++) samples.push(s);
    }
    for (const c of S.cands.values()) {
      const d = c.draw ?? null;
      if (!draws.includes(d)) draws.push(d);
      if (!samples.includes(c.sample)) samples.push(c.sample);
    }
    const order = (d) => (d === null ? -1 : d);
    draws.sort((a, b) => order(a) - order(b));
    samples.sort((a, b) => a - b);
    return { draws, samples };
  }

  // clusters of the counted (not stopped) candidates, largest first, then first seen
  function clusters() {
    const found = new Map();
    let i = 0;
    for (const [key, c] of S.cands) {
      if (S.stopped.has(key)) continue;
      const k = clusterKey(c);
      if (!found.has(k)) found.set(k, { key: k, count: 0, first: i, byDraw: new Map() });
      const cl = found.get(k);
      cl.count += 1;
      const d = c.draw ?? null;
      cl.byDraw.set(d, (cl.byDraw.get(d) || 0) + 1);
      i += 1;
    }
    const list = [...found.values()].sort((a, b) => b.count - a.count || a.first - b.first);
    list.forEach((cl, j) => {
      cl.index = j;
      cl.color = j < PALETTE.length ? PALETTE[j] : OTHER;
      cl.letter = j < 26 ? String.fromCharCode(65 + j) : `#${j + 1}`;
    });
    return { list, byKey: new Map(list.map((cl) => [cl.key, cl])) };
  }

  function chosenKey() {
    return S.result ? keyOf(S.result.chosen_draw, S.result.chosen_sample) : null;
  }

  function ink(hex) {
    const [r, g, b] = [1, 3, 5].map((i) => Number.parseInt(hex.slice(i, i + 2), 16) / 255);
    return 0.299 * r + 0.587 * g + 0.114 * b > 0.55 ? "#111" : "#fff";
  }

  function renderAll() {
    const cl = clusters();
    renderGrid(cl);
    renderShares(cl);
    renderConsensus(cl);
    renderTiming();
    renderRequest();
  }

  function renderGrid(cl) {
    const grid = $("grid");
    grid.replaceChildren();
    const { draws, samples } = rows();
    grid.style.gridTemplateColumns = `max-content repeat(${samples.length}, minmax(3.2rem, 1fr))`;
    if (!draws.length) return;
    grid.append(el("div", "corner", ""));
    for (const s of samples) grid.append(el("div", "col-head", `sample ${s}`));
    const chosen = chosenKey();
    for (const d of draws) {
      const head = el("div", "row-head", drawName(d));
      grid.append(head);
      for (const s of samples) {
        const key = keyOf(d, s);
        const c = S.cands.get(key);
        const cell = el("button", "cell", "");
        cell.type = "button";
        cell.dataset.draw = d === null ? "mean" : String(d);
        cell.dataset.sample = String(s);
        if (!c) {
          const stopped = S.stopped.has(key) || (S.result !== null);
          cell.dataset.state = stopped ? "stopped" : "pending";
          cell.classList.add(stopped ? "stopped" : "pending");
          cell.textContent = stopped ? "stopped" : "…";
          cell.title = stopped ? "no candidate: stopped early" : "still generating";
          cell.disabled = true;
        } else if (S.stopped.has(key)) {
          cell.dataset.state = "stopped";
          cell.classList.add("stopped");
          cell.textContent = "stopped";
          cell.title = `${drawName(d)}, sample ${s}: stopped early (not counted)`;
        } else {
          const k = clusterKey(c);
          const group = cl.byKey.get(k);
          cell.dataset.state = "done";
          cell.dataset.cluster = group ? group.letter : "";
          cell.style.background = group ? group.color : OTHER;
          cell.style.color = ink(group ? group.color : OTHER);
          cell.textContent = k.startsWith("a:") ? clip(k.slice(2), 8) : group?.letter ?? "?";
          cell.title = `${drawName(d)}, sample ${s}: ${clusterLabel(k)}`;
        }
        if (key === chosen) {
          cell.classList.add("chosen");
          cell.dataset.chosen = "true";
          cell.textContent = `★ ${cell.textContent}`;
          cell.title += " (chosen)";
        }
        if (key === S.selected) cell.classList.add("selected");
        if (c) cell.addEventListener("click", () => openCell(key));
        grid.append(cell);
      }
    }
    if (S.selected) openCell(S.selected, true);
  }

  function openCell(key, quiet) {
    const c = S.cands.get(key);
    if (!c) return;
    S.selected = key;
    const stopped = S.stopped.has(key);
    $("cell-detail").hidden = false;
    $("detail-title").textContent = `${drawName(c.draw)}, sample ${c.sample}`
      + (key === chosenKey() ? " · chosen" : "") + (stopped ? " · stopped" : "");
    const parts = [`answer: ${c.answer ?? "(none)"}`, `${c.tokens ?? "?"} tokens`,
      `finish: ${c.finish_reason ?? "–"}`];
    if (typeof c.logprob === "number") parts.push(`logprob ${c.logprob.toFixed(2)}`);
    if (typeof c.score === "number") parts.push(`score ${c.score.toFixed(3)}`);
    $("detail-meta").textContent = parts.join(" · ");
    $("detail-text").textContent = c.text ?? "";
    if (!quiet) {
      for (const cell of document.querySelectorAll("#grid .cell")) {
        cell.classList.toggle("selected",
          keyOf(cell.dataset.draw === "mean" ? null : Number(cell.dataset.draw),
            Number(cell.dataset.sample)) === key);
      }
    }
  }

  function renderShares(cl) {
    const shares = $("shares");
    const perDraw = $("draw-shares");
    shares.replaceChildren();
    perDraw.replaceChildren();
    const total = cl.list.reduce((n, c) => n + c.count, 0);
    const { draws } = rows();
    // per draw: its counted samples; model-wise share = mean over draws of the draw's share
    const drawTotals = new Map(draws.map((d) => [d, 0]));
    for (const [key, c] of S.cands) {
      if (S.stopped.has(key)) continue;
      const d = c.draw ?? null;
      drawTotals.set(d, (drawTotals.get(d) || 0) + 1);
    }
    const active = [...drawTotals.entries()].filter(([, n]) => n > 0);
    const chosen = S.result ? S.cands.get(chosenKey()) : null;
    const chosenCluster = chosen ? clusterKey(chosen) : null;
    if (!total) {
      shares.append(el("p", "note", "no finished candidates yet"));
    } else {
      const head = el("div", "share-row share-head", "");
      head.append(el("span", "", "answer"), el("span", "", ""), el("span", "num", "votes"),
        el("span", "num", "flat"), el("span", "num", "model-wise"));
      shares.append(head);
    }
    for (const group of cl.list) {
      const flat = group.count / total;
      const modelWise = active.length
        ? active.reduce((acc, [d, n]) => acc + (group.byDraw.get(d) || 0) / n, 0) / active.length
        : 0;
      const row = el("div", "share-row", "");
      row.dataset.cluster = group.letter;
      const label = el("span", "share-label", "");
      const sw = el("span", "swatch", group.letter);
      sw.style.background = group.color;
      sw.style.color = ink(group.color);
      label.append(sw, document.createTextNode(` ${clusterLabel(group.key)}`));
      if (group.key === chosenCluster) {
        label.append(el("span", "tag", "consensus"));
        row.classList.add("chosen-cluster");
      }
      const bar = el("span", "bar", "");
      const fill = el("span", "fill", "");
      fill.style.width = `${(100 * modelWise).toFixed(1)}%`;
      fill.style.background = group.color;
      bar.append(fill);
      row.append(label, bar, el("span", "num", `${group.count}/${total}`),
        el("span", "num", `${(100 * flat).toFixed(0)}%`),
        el("span", "num share-mw", `${(100 * modelWise).toFixed(0)}%`));
      shares.append(row);
    }
    for (const [d, n] of active) {
      const row = el("div", "draw-row", "");
      row.dataset.draw = d === null ? "mean" : String(d);
      row.append(el("span", "row-head", drawName(d)));
      const bar = el("span", "stack", "");
      for (const group of cl.list) {
        const k = group.byDraw.get(d) || 0;
        if (!k) continue;
        const seg = el("span", "seg", k / n >= 0.15 ? group.letter : "");
        seg.style.width = `${(100 * k) / n}%`;
        seg.style.background = group.color;
        seg.style.color = ink(group.color);
        seg.title = `${clusterLabel(group.key)}: ${k}/${n}`;
        bar.append(seg);
      }
      row.append(bar, el("span", "num", `${n}`));
      perDraw.append(row);
    }
    const stopped = S.stopped.size;
    $("stopped-note").hidden = stopped === 0;
    $("stopped-note").textContent = `${stopped} candidate${stopped === 1 ? "" : "s"} stopped early: shown grey, not counted`;
  }

  function renderConsensus() {
    const r = S.result;
    $("answer").textContent = r ? (r.answer ?? "(no final answer in the chosen text)") : "…";
    $("confidence").textContent = r ? `${(100 * r.confidence).toFixed(0)}%` : "…";
    $("confidence-bar").style.width = r ? `${(100 * r.confidence).toFixed(1)}%` : "0%";
    $("chosen").textContent = r
      ? `chosen: ${drawName(r.chosen_draw)}, sample ${r.chosen_sample} (${r.model})` : "";
    $("chosen-text").textContent = r ? r.text : "";
    $("chosen-text").hidden = !r;
    $("ran-with").textContent = r
      ? `${r.n_models} draws × ${r.n_samples} samples · ${r.selection} / ${r.utility} · `
        + `T ${r.temperature} · top_p ${r.top_p} · ${r.max_tokens} tokens max · seed ${S.seed}`
        + (r.early_stop && r.early_stop !== "off"
          ? ` · early stop ${r.early_stop}: ${r.n_stopped ?? S.stopped.size} stopped` : "")
      : "";
  }

  function renderTiming() {
    const table = $("timing");
    table.replaceChildren();
    const r = S.result;
    if (!r) return;
    const t = r.timing || {};
    const u = r.usage || {};
    const rowsOf = [
      ["queue", `${fmt(t.queue_s, 3)} s`], ["generate", `${fmt(t.generate_s, 3)} s`],
      ["select", `${fmt(t.select_s, 3)} s`], ["total", `${fmt(t.total_s, 3)} s`],
      ["prompt tokens", u.prompt_tokens], ["completion tokens (all candidates)", u.completion_tokens],
      ["total tokens", u.total_tokens], ["candidates", S.cands.size],
    ];
    for (const [k, v] of rowsOf) {
      const tr = el("tr", "", "");
      tr.append(el("th", "", k), el("td", "num", String(v ?? "–")));
      table.append(tr);
    }
  }

  function shellQuote(s) {
    return `'${s.replace(/'/g, "'\\''")}'`;
  }

  function renderRequest() {
    if (!S.body) return;
    const body = { ...S.body };
    if (S.seed !== null) body.seed = S.seed; // the seed it ran with: the same response again
    const lines = [`curl -s ${shellQuote(api("generate"))}`,
      "  -H 'Content-Type: application/json'"];
    if ($("api-key").value.trim()) lines.push('  -H "Authorization: Bearer $IVONSERVE_API_KEY"');
    lines.push(`  -d ${shellQuote(bodyJson(body))}`);
    $("curl").textContent = lines.join(" \\\n");
    $("share-link").href = shareLink(body);
  }

  function shareLink(body) {
    const params = new URLSearchParams();
    if (body.messages !== undefined) params.set("messages", JSON.stringify(body.messages));
    else params.set("prompt", body.prompt);
    for (const name of FIELDS) if (body[name] !== undefined) params.set(name, String(body[name]));
    params.set("run", "1");
    const url = new URL(window.location.href);
    url.search = params.toString();
    url.hash = "";
    return url.href;
  }

  // --- small helpers ---------------------------------------------------------------------------
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text) node.textContent = text;
    return node;
  }
  function status(text) {
    $("status").textContent = text;
  }
  function setState(state) {
    $("result").dataset.state = state;
  }
  function showError(error) {
    const e = error || {};
    $("error").hidden = false;
    $("error-message").textContent = e.message || "unknown error";
    const bits = [];
    if (e.status || e.code) bits.push(`HTTP ${e.status || e.code}`);
    if (e.type) bits.push(e.type);
    if (e.param) bits.push(`param: ${e.param}`);
    $("error-detail").textContent = bits.join(" · ");
    setState("error");
    status("failed");
    if (S.cands.size === 0) $("result").hidden = true;
  }
  function hideError() {
    $("error").hidden = true;
    $("error-message").textContent = "";
    $("error-detail").textContent = "";
  }

  async function copyCurl() {
    const text = $("curl").textContent;
    try {
      await navigator.clipboard.writeText(text);
      $("copy-note").textContent = "copied";
    } catch {
      const range = document.createRange(); // no clipboard API (plain http): select it instead
      range.selectNodeContents($("curl"));
      window.getSelection().removeAllRanges();
      window.getSelection().addRange(range);
      $("copy-note").textContent = "selected: press Ctrl+C";
    }
  }

  // --- query parameters: ?prompt=...&n_models=2&n_samples=2&seed=7&run=1 -------------------------
  function prefill() {
    const q = new URLSearchParams(window.location.search);
    if (q.has("messages")) {
      $("as-messages").checked = true;
      $("prompt").value = q.get("messages");
    } else if (q.has("prompt")) {
      $("prompt").value = q.get("prompt");
    }
    for (const name of FIELDS) {
      if (!q.has(name)) continue;
      if ($(name).tagName === "SELECT") ensureOption($(name), q.get(name));
      else $(name).value = q.get(name);
    }
    return q.get("run") === "1";
  }

  async function init() {
    loadKey();
    $("run-form").addEventListener("submit", run);
    $("stop").addEventListener("click", () => controller && controller.abort());
    $("copy-curl").addEventListener("click", copyCurl);
    $("detail-close").addEventListener("click", () => {
      S.selected = null;
      $("cell-detail").hidden = true;
      for (const cell of document.querySelectorAll("#grid .cell.selected")) cell.classList.remove("selected");
    });
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      saveKey();
      loadModels();
    });
    $("api-key").addEventListener("change", () => {
      saveKey();
      loadModels();
    });
    $("remember-key").addEventListener("change", saveKey);
    $("forget-key").addEventListener("click", () => {
      $("api-key").value = "";
      saveKey();
      loadModels();
    });
    $("model").addEventListener("change", hintPool);
    const runNow = prefill();
    await loadModels();
    prefill(); // again: a model option that /v1/models just listed
    document.body.dataset.ready = "true";
    if (runNow && $("prompt").value) run(null);
  }

  // for the browser test and the console: drive the page with events
  window.ivonserve = {
    applyEvent: (ev) => applyEvent(ev, JSON.stringify(ev)),
    begin(plan, body) {
      S = fresh(plan || null);
      S.body = body || { prompt: "" };
      $("result").hidden = false;
      hideError();
      setState("running");
      renderAll();
    },
    state: () => S,
  };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
