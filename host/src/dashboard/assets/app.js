/* Modelyard operator dashboard: everything it shows comes from /admin/ with the token the
 * operator signs in with. No framework and no build step; the page's CSP forbids inline
 * scripts and styles, so every element is made with createElement and styled by class (or
 * element.style), and server text only ever reaches the page through textContent. */
(() => {
  'use strict';

  // ---------------------------------------------------------------- DOM helpers

  const $ = (sel, root = document) => root.querySelector(sel);

  /** h('td', {class: 'num', 'data-field': 'requests'}, 'text', node): strings become text
   *  nodes, so nothing the server says is ever parsed as markup. */
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    append(el, kids);
    return el;
  }
  function append(el, kids) {
    for (const k of kids.flat(Infinity)) {
      if (k != null && k !== false) el.append(k instanceof Node ? k : String(k));
    }
  }
  /** Writes text only when it changed: polling then touches nothing that did not move. */
  function setText(el, v) {
    const s = v == null ? '' : String(v);
    if (el.textContent !== s) el.textContent = s;
  }
  function setClass(el, cls) {
    if (el.className !== cls) el.className = cls;
  }

  /** Keeps `parent`'s children in the order of `items`, reusing the element made for each
   *  key, so an element a user (or a test) holds is updated, never replaced. */
  function syncKeyed(parent, items, keyOf, make, update) {
    const old = new Map();
    for (const el of [...parent.children]) {
      if (old.has(el._key)) el.remove(); // a duplicate key must not leave strays behind
      else old.set(el._key, el);
    }
    items.forEach((item, i) => {
      const key = keyOf(item);
      let el = old.get(key);
      if (el) old.delete(key);
      else { el = make(item, key); el._key = key; }
      update(el, item);
      if (parent.children[i] !== el) parent.insertBefore(el, parent.children[i] || null);
    });
    for (const el of old.values()) el.remove();
  }

  /** Rebuilds a small, rarely changing block only when its data changed. */
  function renderIf(el, data, build) {
    const sig = JSON.stringify(data);
    if (el._sig === sig) return;
    el._sig = sig;
    el.replaceChildren();
    append(el, [build(data)]);
  }

  /** Fills a cell from a string or {text, href, badge, cls, title}, in place. */
  function fill(td, v, baseCls) {
    if (v == null || typeof v !== 'object') v = { text: v };
    const tag = v.href ? 'A' : v.badge ? 'SPAN' : null;
    let target = td;
    if (tag) {
      target = td.firstElementChild;
      if (!target || target.tagName !== tag) { target = document.createElement(tag); td.replaceChildren(target); }
      if (v.href && target.getAttribute('href') !== v.href) target.setAttribute('href', v.href);
      if (v.badge) setClass(target, 'badge ' + v.badge);
    } else if (td.firstElementChild) td.replaceChildren();
    setText(target, v.text);
    setClass(td, [baseCls, v.cls].filter(Boolean).join(' '));
    if ((td.title || '') !== (v.title || '')) td.title = v.title || '';
  }

  /** A table kept by row key: cols are {field, label, num, wrap, get(item)}. `rowAttrs` is
   *  the attribute that carries the key, or a function of the item giving the attributes. */
  function keyedTable(id, rowAttrs, cols) {
    const tbody = h('tbody');
    const table = h('table', { id, class: 'data' },
      h('thead', null, h('tr', null, cols.map((c) => h('th', { class: c.num ? 'num' : null }, c.label)))), tbody);
    const cls = (c) => [c.num && 'num', c.wrap && 'wrap', c.clip && 'clip'].filter(Boolean).join(' ');
    return {
      el: h('div', { class: 'table-wrap' }, table),
      tbody,
      update(items, keyOf) {
        syncKeyed(tbody, items, keyOf,
          (item, key) => h('tr', typeof rowAttrs === 'function' ? rowAttrs(item) : { [rowAttrs]: key }, cols.map((c) => h('td', { 'data-field': c.field }))),
          (tr, item) => cols.forEach((c, i) => c.get && fill(tr.cells[i], c.get(item), cls(c)))); // no get: drawn by the caller
      },
    };
  }

  const panel = (title, ...kids) => h('section', { class: 'panel' }, title && h('h2', null, title), kids);
  const badge = (text, kind) => h('span', { class: 'badge ' + (kind || '') }, text);
  /** A legend entry: a colour square (coloured through element.style: CSP) and a label. */
  function swatch(colour, label) {
    const i = h('i');
    i.style.background = colour;
    return h('span', null, i, label);
  }
  const kv = (pairs) => h('dl', { class: 'kv' },
    pairs.filter((p) => p && p[1] != null && p[1] !== '').map(([k, v]) => [h('dt', null, k), h('dd', null, v)]));

  // ---------------------------------------------------------------- formatting

  const dash = '–';
  const isNum = (x) => typeof x === 'number' && Number.isFinite(x);
  const fmt = {
    ms: (us) => (isNum(us) ? (us / 1000).toFixed(2) : dash), // µs as ms, as the tests compare
    fixed: (x, d) => (isNum(x) ? x.toFixed(d) : dash),
    pct: (x, d = 1) => (isNum(x) ? (x * 100).toFixed(d) + '%' : dash),
    sig4: (x) => (isNum(x) ? String(Number(x.toPrecision(4))) : dash),
    p: (p) => (!isNum(p) ? dash : p < 1e-4 ? p.toExponential(1) : p.toFixed(4)),
    signed: (x, d = 3) => (isNum(x) ? (x >= 0 ? '+' : '') + x.toFixed(d) : dash),
    pad: (n) => String(n).padStart(2, '0'),
    /** Local "YYYY-MM-DD HH:MM:SS" of a time in ms. */
    time(ms) {
      if (!isNum(ms)) return dash;
      const d = new Date(ms);
      return `${d.getFullYear()}-${fmt.pad(d.getMonth() + 1)}-${fmt.pad(d.getDate())} ` +
        `${fmt.pad(d.getHours())}:${fmt.pad(d.getMinutes())}:${fmt.pad(d.getSeconds())}`;
    },
    ago(ms) {
      if (!isNum(ms)) return dash;
      const s = Math.max(0, (Date.now() - ms) / 1000);
      if (s < 90) return Math.round(s) + ' s ago';
      if (s < 5400) return Math.round(s / 60) + ' min ago';
      if (s < 172800) return Math.round(s / 3600) + ' h ago';
      return Math.round(s / 86400) + ' d ago';
    },
  };
  const enc = encodeURIComponent;
  // An endpoint that could not be built is listed with its name and error only.
  const variantsOf = (e) => e.variants || [];

  // Variant colours: stable per position in an endpoint's variant list; blue-green gets its own.
  const PALETTE = ['#2557d6', '#e07b00', '#1e9e5a', '#8e44d8', '#d63a3a', '#0f97b3', '#7a8a00', '#d23f91'];
  function colourOf(names, name) {
    if (name === 'blue') return '#2557d6';
    if (name === 'green') return '#1e9e5a';
    const i = names.indexOf(name);
    return PALETTE[(i < 0 ? 0 : i) % PALETTE.length];
  }

  // ---------------------------------------------------------------- API and messages

  const TOKEN_KEY = 'modelyard.token';
  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }
  let me = null; // what /admin/whoami said about the token

  /** One admin API call. Every failure becomes an ApiError with the server's own words; a
   *  401 also returns the page to the sign-in form. Nothing is left to reject unhandled. */
  async function api(path, { method = 'GET', body } = {}) {
    const headers = { Accept: 'application/json' };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = 'Bearer ' + token;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let res;
    try {
      res = await fetch(path, { method, headers, cache: 'no-store', credentials: 'same-origin', body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (e) {
      throw new ApiError(0, 'The server did not answer (' + e.message + ').');
    }
    let data = null;
    try { data = await res.json(); } catch (e) { /* not JSON: the status says enough */ }
    const why = (data && typeof data.error === 'string' && data.error) || `${res.status} ${res.statusText}`;
    if (res.status === 401) {
      const said = token ? 'The token was not accepted: ' + why : withoutToken && !probing ? 'This server needs a token: ' + why : null;
      withoutToken = false;
      showSignIn(said);
      throw new ApiError(401, why);
    }
    if (!res.ok) throw new ApiError(res.status, why);
    return data;
  }

  // The message area: `source` lets a successful poll clear its own earlier failure
  // without wiping the answer to an action the operator is still reading.
  let messageSource = null;
  function showMessage(text, kind = 'error', source = 'action') {
    const bar = $('#message-bar');
    setText($('#message'), text);
    $('#message').dataset.kind = kind;
    setClass(bar, kind);
    bar.hidden = false;
    messageSource = source;
  }
  function clearMessage(source) {
    if (source && source !== messageSource) return;
    $('#message-bar').hidden = true;
    setText($('#message'), '');
    messageSource = null;
  }
  function report(e, source) {
    if (e && e.status === 401) return; // the sign-in form already says it
    const text = e instanceof ApiError ? e.message : 'Unexpected problem: ' + (e && e.message);
    showMessage(source === 'poll' ? 'Could not refresh: ' + text : text, 'error', source);
  }

  // ---------------------------------------------------------------- sign in

  function showSignIn(why) {
    me = null;
    unmount();
    $('#nav').hidden = true;
    $('#who').hidden = true;
    $('#app').replaceChildren();
    $('#signin').hidden = false;
    if (why) showMessage(why, 'error', 'auth'); else clearMessage();
    $('#token').value = '';
    $('#token').focus();
  }

  // Opened without a stored token, the page asks the server once without one: a server
  // that configures no tokens answers and the dashboard shows (the sample configuration);
  // one that does answers 401 and the form shows, with nothing said against the operator
  // (the console lists that 401). After a sign-out the form shows without asking; an
  // empty sign-in asks without a token again.
  let withoutToken = true;
  let probing = true;
  async function start() {
    if (!sessionStorage.getItem(TOKEN_KEY) && !withoutToken) { showSignIn(null); return; }
    try {
      me = await api('/admin/whoami');
    } catch (e) {
      if (e.status !== 401) { report(e, 'auth'); setTimeout(start, 5000); }
      return;
    } finally {
      probing = false;
    }
    clearMessage('auth');
    $('#signin').hidden = true;
    $('#nav').hidden = false;
    $('#who').hidden = false;
    setText($('#who-name'), me.token == null ? 'no token' : me.token);
    setText($('#who-role'), me.role + (me.can_act ? '' : ' · read only'));
    setClass($('#who-role'), 'badge ' + (me.can_act ? 'info' : ''));
    route();
  }

  // ---------------------------------------------------------------- routing and polling

  const ROUTES = [
    [/^\/?$/, 'overview', () => overviewPage()],
    [/^\/endpoint\/(.+)$/, 'overview', (name) => endpointPage(name)],
    [/^\/models$/, 'models', () => modelsPage()],
    [/^\/model\/(.+)$/, 'models', (name) => modelPage(name)],
    [/^\/cost$/, 'cost', () => costPage()],
    [/^\/plugins$/, 'plugins', () => pluginsPage()],
    [/^\/audit$/, 'audit', (_, q) => auditPage(q)],
  ];
  let page = null;
  let timer = 0;
  let running = false;
  let again = false; // a refresh was asked for while one ran: run once more right after

  function route() {
    if (!me) return;
    const [path, query] = (location.hash || '#/').slice(1).split('?');
    let made = null;
    let nav = null;
    for (const [re, key, make] of ROUTES) {
      const m = path.match(re);
      if (!m) continue;
      let arg = m[1];
      try { arg = arg && decodeURIComponent(arg); } catch (e) { /* keep it raw */ }
      made = make(arg, new URLSearchParams(query || ''));
      nav = key;
      break;
    }
    if (!made) made = { root: panel('Not found', h('p', null, 'No page here. ', h('a', { href: '#/' }, 'Back to the overview.'))) };
    unmount();
    page = made;
    for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', a.dataset.nav === nav);
    $('#app').replaceChildren(page.root);
    window.scrollTo(0, 0);
    schedule(0);
  }

  function unmount() {
    clearTimeout(timer);
    if (page && page.destroy) page.destroy();
    page = null;
  }

  function schedule(delay) {
    clearTimeout(timer);
    timer = setTimeout(tick, delay);
  }

  /** One refresh of the visible page; the next is scheduled only when it is done, so slow
   *  answers never pile up. Hidden tabs are not polled. */
  async function tick() {
    const p = page;
    if (running) { again = true; return; }
    if (!p || !p.refresh || document.hidden) return;
    running = true;
    try {
      await p.refresh();
      if (p === page) clearMessage('poll');
    } catch (e) {
      if (p === page) report(e, 'poll');
    } finally {
      running = false;
      if (page && (page !== p || again)) schedule(0);
      else if (page && page.interval) schedule(page.interval);
      again = false;
    }
  }

  /** Times a render and leaves the figure on #app (data-render-ms) for anyone measuring. */
  function timed(render) {
    const t0 = performance.now();
    render();
    $('#app').dataset.renderMs = (performance.now() - t0).toFixed(2);
  }

  // ---------------------------------------------------------------- charts (uPlot)

  const resizer = new ResizeObserver((entries) => {
    for (const e of entries) if (e.target._chart) e.target._chart.fit();
  });

  /** One uPlot in `box`, as wide as the box. `opts(width)` makes its options; the plot is
   *  made again only when `key` (its series) changes, otherwise data goes in by setData. */
  class Chart {
    constructor(box, height) {
      this.box = box;
      this.height = height;
      this.u = null;
      this.key = null;
      box._chart = this;
      resizer.observe(box);
    }
    width() { return Math.max(160, Math.floor(this.box.clientWidth || 300)); }
    set(key, opts, data) {
      if (key !== this.key || !this.u) {
        if (this.u) this.u.destroy();
        this.key = key;
        this.u = new uPlot(opts(this.width(), this.height), data, this.box);
      } else this.u.setData(data);
    }
    fit() {
      const w = this.width();
      if (this.u && Math.abs(this.u.width - w) >= 2) this.u.setSize({ width: w, height: this.height });
    }
    destroy() {
      resizer.unobserve(this.box);
      if (this.u) this.u.destroy();
      this.u = null;
    }
  }

  const AXIS = { stroke: '#667085', grid: { stroke: '#eef0f3', width: 1 }, ticks: { stroke: '#dfe3e8', width: 1 }, font: '11px system-ui, sans-serif' };
  const yAxis = (format, size = 52) => ({ ...AXIS, size, values: (u, vals) => vals.map(format) });

  /** Time ticks as a wall clock, seconds shown only when ticks are less than a minute apart
   *  (uPlot's default puts the date under the first tick, which crowds a narrow chart). */
  function clockTicks(u, splits, axis, space, increment) {
    const options = increment < 60 ? { hour: '2-digit', minute: '2-digit', second: '2-digit' } : { hour: '2-digit', minute: '2-digit' };
    return splits.map((t) => new Date(t * 1000).toLocaleTimeString([], options));
  }

  /** Options for a time chart: series [{label, stroke, dash, fill}], y formatted by yFmt. */
  function timeOpts(series, yFmt, extra = {}) {
    return (width, height) => ({
      width, height,
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: extra.range ? { range: extra.range } : {} },
      axes: [{ ...AXIS, space: 70, values: clockTicks }, yAxis(yFmt)],
      series: [{}, ...series.map((s, i) => ({
        label: s.label, stroke: s.stroke, width: 1.5, dash: s.dash, fill: s.fill, points: { show: false }, spanGaps: !!extra.spanGaps,
        value: extra.value ? (u, v, si, idx) => extra.value(i, idx) : (u, v) => (v == null ? dash : yFmt(v)),
      }))],
      bands: extra.bands,
    });
  }

  /** Options for grouped bars: one bar per series at each x index, labelled by labels[i]. */
  function barOpts(series, labels, yFmt, legend = true) {
    const n = series.length;
    const group = n > 1 ? 0.7 : 0.6; // of each x slot, shared by the series side by side
    const size = group / n;
    return (width, height) => ({
      width, height,
      cursor: { drag: { x: false, y: false } },
      legend: { show: legend },
      scales: { x: { time: false, range: () => [-0.5, labels.length - 0.5] }, y: { range: (u, lo, hi) => [0, hi > 0 ? hi * 1.1 : 1] } },
      axes: [
        // Every label when they fit, else every second or third: about 44 px each.
        { ...AXIS, splits: () => labels.map((_, i) => i), gap: 3, size: 30,
          values: (u, splits) => { const every = Math.ceil(labels.length * 44 / Math.max(44, u.width - 60)); return splits.map((s, i) => (i % every ? '' : labels[s])); } },
        yAxis(yFmt, 64),
      ],
      series: [{ value: (u, v) => (v == null ? dash : labels[v]) }, ...series.map((s, i) => ({
        label: s.label, stroke: s.stroke, fill: s.stroke + 'b0', width: 1, points: { show: false },
        value: (u, v) => (v == null ? dash : yFmt(v)),
        paths: uPlot.paths.bars({ disp: {
          x0: { unit: 1, values: () => labels.map((_, j) => j - group / 2 + i * size) },
          size: { unit: 1, values: () => [size] },
        } }),
      }))],
    });
  }

  // ---------------------------------------------------------------- confirm and act

  /** Asks in <dialog id="confirm">; resolves true only for "yes". */
  function confirmAction(text) {
    const dlg = $('#confirm');
    setText($('#confirm-text'), text);
    return new Promise((resolve) => {
      const done = (answer) => {
        $('#confirm-yes').onclick = $('#confirm-no').onclick = dlg.oncancel = null;
        if (dlg.open) dlg.close();
        resolve(answer);
      };
      $('#confirm-yes').onclick = () => done(true);
      $('#confirm-no').onclick = () => done(false);
      dlg.oncancel = (e) => { e.preventDefault(); done(false); };
      dlg.showModal();
      $('#confirm-no').focus();
    });
  }

  /** A short line for a strategy as a router describes it, for the answer to an action. */
  function strategyLine(s) {
    if (!s) return '';
    if (s.weights) return 'weights ' + Object.entries(s.weights).map(([k, v]) => `${k} ${v}`).join(', ');
    if (s.strategy === 'canary') return `${s.status}, canary at ${s.share_percent}%`;
    if (s.active) return 'active: ' + s.active;
    return s.strategy || '';
  }

  async function act(endpoint, action, body, text) {
    if (!(await confirmAction(text))) return;
    try {
      const answer = await api(`/admin/endpoints/${enc(endpoint)}/${action === 'switch' ? 'promote' : action}`, { method: 'POST', body });
      showMessage(`${endpoint}: ${action} done${answer && answer.strategy ? ' — ' + strategyLine(answer.strategy) : ''}.`, 'ok');
    } catch (e) {
      report(e, 'action');
    }
    schedule(0);
  }

  // ---------------------------------------------------------------- overview

  const VCOLS = [
    ['variant', 'Variant'], ['model', 'Model'], ['share', 'Share'], ['rate', 'Req/s', 1], ['requests', 'Requests', 1],
    ['errors', 'Errors', 1], ['error_rate', 'Err rate', 1], ['p50_ms', 'p50 ms', 1], ['p99_ms', 'p99 ms', 1],
  ];
  const HOUR_MS = 3600e3;
  const STATE_SHOWN = new Set(['plugin.refused', 'model.refused', 'model.config_refused', 'endpoint.refused', 'admin.refused']);

  function overviewPage() {
    const problems = h('section', { id: 'problems', class: 'panel' }, h('h2', null, 'What is wrong now'));
    const problemList = h('ul');
    const healthy = h('p', { class: 'ok-line' }, 'Nothing is wrong: every model, plugin and endpoint is serving, nothing has drifted and no canary was rolled back in the last hour.');
    problems.append(problemList, healthy);
    const tbody = h('tbody');
    const count = h('span', { class: 'muted' });
    const endpoints = panel(null,
      h('h2', null, 'Endpoints', count),
      h('p', { class: 'muted small' }, 'Share, rate and error rate cover the last poll (about 2 s); shown in grey italics they are since the start, when no request came in between.'),
      h('div', { class: 'table-wrap' }, h('table', { id: 'endpoints', class: 'data' },
        h('thead', null, h('tr', null, h('th', null, 'Endpoint'), h('th', null, 'Status'),
          h('th', null, h('div', { class: 'vrow vhead' }, VCOLS.map(([f, label, n]) => h('span', { class: n ? 'n' : null }, label)))))),
        tbody)));
    const models = keyedTable('overview-models', 'data-model', [
      { field: 'name', label: 'Model', get: (m) => ({ text: m.name, href: '#/model/' + enc(m.name) }) },
      { field: 'serving', label: 'Serving', get: (m) => ({ text: m.serving ? 'serving' : 'not serving', badge: m.serving ? 'ok' : 'bad' }) },
      { field: 'versions', label: 'Versions', wrap: true, get: (m) => versionsLine(m) },
      { field: 'drifted', label: 'Drift', get: (m) => (m.drifted.length ? { text: m.drifted.length + ' drifted', cls: 'bad' } : { text: 'none', cls: 'good' }) },
    ]);
    const plugins = keyedTable('overview-plugins', 'data-plugin', [
      { field: 'name', label: 'Plugin', get: (p) => p.name },
      { field: 'world', label: 'World', get: (p) => p.world || dash },
      { field: 'state', label: 'State', get: (p) => ({ text: p.serving ? 'serving' : 'refused', badge: p.serving ? 'ok' : 'bad' }) },
      { field: 'error', label: 'Error', wrap: true, get: (p) => ({ text: p.error || '', cls: 'bad' }) },
    ]);
    const root = h('div', null, problems, endpoints,
      h('div', { class: 'grid2' }, panel('Models', models.el), panel('Plugins', plugins.el)));

    let previous = new Map(); // endpoint/variant -> {requests, errors, at}
    let audits = { state: [], rollback: [] };
    let ticks = 0;
    let recordsKept = null; // unknown until the first /admin/status
    // Records switched off since the last status: no rollbacks to show, nothing wrong.
    const offAudit = (e) => { if (e.status === 404) return null; throw e; };

    async function refresh() {
      // Rollbacks come from the audit trail; read it every fifth poll, it changes rarely,
      // and only once the status said the server keeps one (monitoring.database set).
      const wantAudit = recordsKept === true && ticks++ % 5 === 0;
      const [status, list, states, rollbacks] = await Promise.all([
        api('/admin/status'), api('/admin/endpoints'),
        wantAudit ? api('/admin/audit?kind=endpoint.state&limit=50').catch(offAudit) : null,
        wantAudit ? api('/admin/audit?kind=endpoint.rollback&limit=20').catch(offAudit) : null,
      ]);
      recordsKept = status.records_kept;
      if (states && rollbacks) audits = { state: states.changes, rollback: rollbacks.changes };
      const now = performance.now();
      timed(() => {
        // Operators' rollbacks count for canary routers only (a blue-green one is routine).
        renderProblems(status, new Set(list.endpoints.filter((e) => e.router && /canary/.test(e.router.plugin)).map((e) => e.name)));
        renderEndpoints(list.endpoints, now);
        models.update(status.models, (m) => m.name);
        plugins.update(status.plugins, (p) => p.name);
      });
    }

    function versionsLine(m) {
      const loaded = m.versions.filter((v) => v.loaded).map((v) => v.version);
      const top = loaded.length ? Math.max(...loaded) : null;
      return m.versions.map((v) => `v${v.version} ${v.refused ? 'refused' : v.loaded ? (v.version === top ? 'serving' : 'loaded') : 'not loaded'}`).join(', ') +
        (m.config_refused ? ' · model.toml refused' : '');
    }

    function renderProblems(status, canaries) {
      const list = [];
      const add = (kind, id, what, detail, href) => list.push({ key: kind + '\0' + id, kind, what, detail, href });
      if (!status.ready) add('not-ready', '', 'Not ready', 'No model version can serve yet: /v2/health/ready answers 503.');
      for (const p of status.plugins) if (!p.serving || p.error) add('plugin', p.name, 'Plugin refused', `${p.name}: ${p.error || 'not serving'}`, '#/plugins');
      for (const m of status.models) {
        for (const v of m.versions) if (v.refused) add('version', m.name + '\0' + v.version, 'Version refused', `${m.name} v${v.version}: ${v.refused}`, '#/model/' + enc(m.name));
        if (m.config_refused) add('config', m.name, 'model.toml refused', `${m.name}: ${m.config_refused}`, '#/model/' + enc(m.name));
        const byVersion = new Map();
        for (const d of m.drifted) byVersion.set(d.version, [...(byVersion.get(d.version) || []), d]);
        for (const [version, ds] of byVersion) {
          const figures = ds.map((d) => `${d.feature} (KS ${fmt.fixed(d.ks, 2)}, PSI ${fmt.fixed(d.psi, 2)})`).join(', ');
          add('drift', m.name + '\0' + version, 'Drift', `${m.name} v${version}: ${figures}`, '#/model/' + enc(m.name));
        }
      }
      for (const e of status.endpoints) if (e.error || !e.serving) add('endpoint', e.name, 'Endpoint error', `${e.name}: ${e.error || 'not serving'}`, '#/endpoint/' + enc(e.name));
      for (const r of rolledBack(canaries)) {
        add('rollback', r.endpoint, 'Canary rolled back', `${r.endpoint} at ${fmt.time(r.at_ms)} by ${r.actor}` + (r.automatic ? ': ' + r.detail : ''), '#/endpoint/' + enc(r.endpoint));
      }
      // Refusals already show above as state (and vanish once fixed); a refused admin action
      // is the operator's own. Everything else of the last hour: request failures, config.refused…
      const recent = (status.recent_errors || []).filter((e) => Date.now() - Date.parse(e.at) < HOUR_MS && !STATE_SHOWN.has(e.source));
      for (const e of recent.slice(0, 5)) add('error', e.at + e.source + e.message, 'Recent error', `${fmt.time(Date.parse(e.at))} ${e.source}: ${e.message}`);
      if (recent.length > 5) add('error-more', '', 'Errors', `${recent.length - 5} more in the last hour (the server keeps 20).`);

      syncKeyed(problemList, list, (p) => p.key,
        (p) => h('li', { class: 'problem', 'data-problem': p.kind }, h('span', { class: 'what' }, p.what), h('span', { class: 'detail' }),
          p.href ? h('a', { href: p.href }, 'open') : null),
        (li, p) => setText(li.children[1], p.detail));
      problemList.hidden = !list.length;
      healthy.hidden = !!list.length;
      setClass(problems, 'panel ' + (list.length ? 'has-problems' : 'healthy'));
    }

    /** Canaries rolled back in the last hour, newest per endpoint: automatic ones are
     *  `endpoint.state` entries whose new state says so, manual ones `endpoint.rollback`. */
    function rolledBack(canaries) {
      const seen = new Map();
      const recent = (c) => Date.now() - c.at_ms < HOUR_MS && c.endpoint;
      for (const c of audits.state) {
        if (!recent(c)) continue;
        // `to` is the router's new state as JSON; a canary's says its status and why.
        let state = null;
        try { state = JSON.parse(c.to || 'null'); } catch (e) { /* not a canary's state */ }
        if (state && state.status === 'rolled-back' && !seen.has(c.endpoint)) {
          seen.set(c.endpoint, { ...c, automatic: true, detail: state.reason || c.detail });
        }
      }
      for (const c of audits.rollback) {
        const s = seen.get(c.endpoint);
        if (recent(c) && canaries.has(c.endpoint) && (!s || s.at_ms < c.at_ms)) seen.set(c.endpoint, c);
      }
      return [...seen.values()].sort((a, b) => b.at_ms - a.at_ms);
    }

    function renderEndpoints(list, now) {
      setText(count, `${list.length}`);
      const seen = new Map();
      syncKeyed(tbody, list, (e) => e.name, makeEndpointRow, (tr, e) => updateEndpointRow(tr, e, now, seen));
      previous = seen;
    }

    function makeEndpointRow(e) {
      return h('tr', { 'data-endpoint': e.name },
        h('td', null, h('a', { class: 'ep-name', href: '#/endpoint/' + enc(e.name) }, e.name), h('span', { class: 'sub' })),
        h('td', null, h('span', { class: 'badge' })),
        h('td', null, h('div', { class: 'vgrid' })));
    }

    function updateEndpointRow(tr, e, now, seen) {
      const how = e.router ? e.router.plugin + (e.router.failures ? ` · ${e.router.failures} failures` : '') : e.flag_routing ? 'flag ' + e.flag_routing.flag : 'default variant';
      setText(tr.cells[0].children[1], how + (e.fallback_variant ? ' · fallback ' + e.fallback_variant : ''));
      const st = tr.cells[1].firstChild;
      setText(st, e.error ? 'error' : 'serving');
      setClass(st, 'badge ' + (e.error ? 'bad' : 'ok'));
      st.title = e.error || '';

      // Deltas since the last poll; share and error rate fall back to totals without any.
      const variants = variantsOf(e);
      const names = variants.map((x) => x.name);
      const deltas = variants.map((v) => {
        const key = e.name + '\0' + v.name;
        const before = previous.get(key);
        seen.set(key, { requests: v.requests, errors: v.errors, at: now });
        if (!before || v.requests < before.requests) return null;
        return { requests: v.requests - before.requests, errors: v.errors - before.errors, seconds: (now - before.at) / 1000 };
      });
      const liveSum = deltas.reduce((s, d) => s + (d ? d.requests : 0), 0);
      const totalSum = variants.reduce((s, v) => s + v.requests, 0);
      const live = liveSum > 0;
      const grid = tr.cells[2].firstChild;
      syncKeyed(grid, variants, (v) => v.name, makeVariantRow, (row, v) => {
        const d = deltas[variants.indexOf(v)];
        const f = row._fields;
        const share = live ? (d ? d.requests : 0) / liveSum : totalSum ? v.requests / totalSum : null;
        const errRate = live ? (d && d.requests ? d.errors / d.requests : null) : v.requests ? v.errors / v.requests : null;
        setText(f.variant, v.name);
        setText(f.model, `${v.model}@${v.version ?? 'latest'}`);
        setText(f.share, fmt.pct(share));
        f.share.dataset.basis = live ? 'live' : 'cumulative';
        setClass(f.share, live ? '' : 'cum');
        f.share.title = live ? 'share of the requests since the last poll' : 'share of all requests since the start';
        f.bar.style.width = ((share || 0) * 100).toFixed(1) + '%';
        f.bar.style.background = colourOf(names, v.name);
        setText(f.rate, d && d.seconds > 0 ? (d.requests / d.seconds).toFixed(1) : dash);
        setText(f.requests, String(v.requests));
        setText(f.errors, String(v.errors));
        setText(f.error_rate, fmt.pct(errRate, 2));
        f.error_rate.dataset.basis = live ? 'live' : 'cumulative';
        setClass(f.error_rate, (live ? '' : 'cum ') + (errRate > 0 ? 'bad' : ''));
        setClass(f.errors, v.errors > 0 ? 'bad' : '');
        setText(f.p50_ms, fmt.ms(v.latency_p50_us));
        setText(f.p99_ms, fmt.ms(v.latency_p99_us));
      });
    }

    function makeVariantRow(v) {
      const row = h('div', { class: 'vrow', 'data-variant': v.name });
      row._fields = {};
      for (const [field, , num] of VCOLS) {
        const span = h('span', { 'data-field': field });
        if (field === 'share') {
          row._fields.bar = h('i');
          row.append(h('span', { class: 'share' }, span, h('span', { class: 'bar' }, row._fields.bar)));
        } else row.append(h('span', { class: num ? 'n' : null }, span));
        row._fields[field] = span;
      }
      return row;
    }

    return { root, refresh, interval: 2000 };
  }

  // ---------------------------------------------------------------- endpoint

  function endpointPage(name) {
    const title = h('div', { class: 'page-head' }, h('h1', null, name), h('span', { id: 'endpoint-state', class: 'badge' }), h('span', { class: 'muted', id: 'endpoint-meta' }),
      h('a', { href: '#/audit?endpoint=' + enc(name) }, 'audit trail'));
    const actions = h('section', { id: 'actions', class: 'panel', hidden: true });
    const strategy = h('div', { id: 'strategy' });
    const arms = keyedTable('arms', 'data-variant', [
      { field: 'variant', label: 'Variant', get: (a) => ({ text: a.variant, cls: 'ep-name' }) },
      { field: 'model', label: 'Model', get: (a) => a.model || dash },
      { field: 'requests', label: 'Requests', num: 1, get: (a) => String(a.requests) },
      { field: 'errors', label: 'Errors', num: 1, get: (a) => ({ text: String(a.errors), cls: a.errors ? 'bad' : '' }) },
      { field: 'error_rate', label: 'Err rate', num: 1, get: (a) => fmt.pct(a.requests ? a.errors / a.requests : null, 2) },
      { field: 'p50_ms', label: 'p50 ms', num: 1, get: (a) => fmt.ms(a.latency_p50_us) },
      { field: 'p99_ms', label: 'p99 ms', num: 1, get: (a) => fmt.ms(a.latency_p99_us) },
      { field: 'reward_count', label: 'Rewards', num: 1, get: (a) => String(a.reward_count) },
      { field: 'reward_mean', label: 'Mean reward', num: 1, get: (a) => fmt.fixed(a.reward_mean, 4) },
      { field: 'accuracy', label: 'Accuracy', num: 1, get: (a) => (a.accuracy && a.accuracy.count ? `${fmt.pct(a.accuracy.mean)} (n ${a.accuracy.count})` : dash) },
    ]);
    const comparisons = keyedTable('comparisons', 'data-treatment', [
      { field: 'pair', label: 'Treatment vs control', get: (c) => `${c.treatment} vs ${c.control}` },
      { field: 'test', label: 'Test', get: (c) => (c.result ? c.result.test : 'needs 2+ rewards on each side, with some spread') },
      { field: 'difference', label: 'Difference', num: 1, get: (c) => fmt.signed(c.result && c.result.difference, 4) },
      { field: 'ci95', label: '95% CI', num: 1, get: (c) => (c.result ? `${fmt.signed(c.result.ci95[0], 4)} … ${fmt.signed(c.result.ci95[1], 4)}` : dash) },
      { field: 'ci_bar', label: '' },
      { field: 'p_value', label: 'p-value', num: 1, get: (c) => fmt.p(c.result && c.result.p_value) },
      { field: 'significant', label: 'Significant (p < 0.05)', get: (c) => (!c.result ? dash : c.result.p_value < 0.05 ? { text: 'yes', badge: 'warn' } : { text: 'no', badge: '' }) },
    ]);
    const shadows = keyedTable('shadows', 'data-shadow', [
      { field: 'shadow', label: 'Shadow', get: (s) => s.name },
      { field: 'runs', label: 'Runs', num: 1, get: (s) => String(s.runs) },
      { field: 'compared', label: 'Compared', num: 1, get: (s) => String(s.compared) },
      { field: 'agreement', label: 'Agreement', num: 1, get: (s) => (s.agreement != null
        ? { text: fmt.pct(s.agreement), cls: s.agreement < 0.9 ? 'bad' : 'good' }
        : s.mean_abs_diff != null ? 'mean |Δ| ' + fmt.fixed(s.mean_abs_diff, 4) : dash) },
      { field: 'errors', label: 'Errors', num: 1, get: (s) => ({ text: String(s.errors), cls: s.errors ? 'bad' : '' }) },
      { field: 'dropped', label: 'Dropped', num: 1, get: (s) => String(s.dropped) },
      { field: 'p50_ms', label: 'p50 ms', num: 1, get: (s) => fmt.ms(s.latency_p50_us) },
      { field: 'latency_delta_ms', label: 'Δp50 vs primary', num: 1, get: (s) => (s.primaryP50 ? fmt.signed((s.latency_p50_us - s.primaryP50) / 1000, 2) + ' ms' : dash) },
    ]);
    const decisions = keyedTable('decisions', 'data-id', [
      { field: 'at', label: 'At', get: (d) => fmt.time(d.at_ms).slice(11) },
      { field: 'variant', label: 'Variant', get: (d) => ({ text: d.variant, cls: d.ok ? '' : 'bad' }) },
      { field: 'reason', label: 'Reason', wrap: true, get: (d) => d.reason },
      { field: 'extra', label: 'Shadows / fallback', get: (d) => [d.shadows.join(', '), d.fallback ? 'fallback' : ''].filter(Boolean).join(' · ') || dash },
      { field: 'id', label: 'Request id', get: (d) => d.id },
    ]);
    const flags = h('div', { id: 'flags' });
    const historyNote = h('p', { class: 'chart-note' });
    const boxes = {
      traffic: h('div', { id: 'chart-traffic', class: 'chart' }),
      latency: h('div', { id: 'chart-latency', class: 'chart' }),
      share: h('div', { id: 'chart-share', class: 'chart' }),
    };
    const charts = { traffic: new Chart(boxes.traffic, 180), latency: new Chart(boxes.latency, 180), share: new Chart(boxes.share, 180) };
    const shadowPanel = panel('Shadows', h('p', { class: 'muted small' }, 'Agreement: share of rows whose top class (or label) matched the primary\'s. ' +
      'A shadow\'s latency is its model run alone, the primary\'s the whole request (routing and processors too), so Δp50 flatters the shadow.'), shadows.el);
    const root = h('div', null, title, actions,
      panel('Strategy', strategy),
      panel('Variants and A/B arms', arms.el, h('h3', null, 'Comparisons against the control'), comparisons.el),
      historyNote,
      h('div', { class: 'grid2' },
        panel('Traffic (requests/s)', boxes.traffic),
        panel('Latency (ms, p50 solid, p99 dashed)', boxes.latency),
        panel('Traffic share over time (%)', boxes.share)),
      shadowPanel,
      panel('Flags', flags),
      panel('Last routing decisions', decisions.el));
    let noHistory = null; // why /admin/history cannot be drawn, once it said so

    async function refresh() {
      const base = '/admin/endpoints/' + enc(name);
      const detail = await api(base);
      // Configured but not built: its error is all there is to show.
      const built = Array.isArray(detail.variants);
      for (const part of root.children) if (part !== title) part.hidden = !built;
      if (!built) {
        timed(() => {
          const st = $('#endpoint-state', title);
          setText(st, 'not built');
          setClass(st, 'badge bad');
          setText($('#endpoint-meta', title), detail.error || '');
        });
        return;
      }
      const [exp, hist] = await Promise.all([
        api('/admin/experiments/' + enc(name)),
        noHistory ? null : api('/admin/history/' + enc(name)).catch((e) => {
          if (e.status === 401) throw e;
          noHistory = e.message;
          return null;
        }),
      ]);
      timed(() => {
        renderHead(detail);
        renderActions(detail);
        renderStrategy(detail);
        renderArms(detail, exp);
        renderShadows(detail, exp);
        renderIf(flags, [detail.flag_definitions, detail.flag_routing, detail.flags], () => flagsBlock(detail));
        decisions.update([...detail.recent_decisions].reverse().slice(0, 10), (d) => d.id);
        if (hist) renderHistory(hist, detail.variants.map((v) => v.name));
        else setText(historyNote, 'History unavailable: ' + noHistory);
      });
    }

    function renderHead(d) {
      const st = $('#endpoint-state', title);
      setText(st, d.error ? 'error: ' + d.error : 'serving');
      setClass(st, 'badge ' + (d.error ? 'bad' : 'ok'));
      const parts = [d.router ? 'router ' + d.router.plugin : 'no router', 'default ' + d.default_variant];
      if (d.fallback_variant) parts.push(`fallback ${d.fallback_variant}` + (d.latency_budget_ms ? ` within ${d.latency_budget_ms} ms` : ''));
      for (const p of d.processors) parts.push(`processor ${p.plugin}` + (p.failures ? ` (${p.failures} failures)` : ''));
      if (d.router && d.router.failures) parts.push(`router failures ${d.router.failures}: ${d.router.last_error || ''}`);
      setText($('#endpoint-meta', title), parts.join(' · '));
    }

    /** Action buttons, for tokens that may act. Which a router accepts: weighted takes
     *  weights; canary and blue-green promote and roll back; anything else may refuse with
     *  400, which #message then shows. Built once per set of variants, so a half-typed
     *  weight survives polling. */
    function renderActions(d) {
      actions.hidden = !me.can_act;
      if (!me.can_act) return;
      const s = d.strategy || {};
      const names = d.variants.map((v) => v.name);
      const key = JSON.stringify([names, s.strategy, s.active]);
      if (actions._key === key) return;
      actions._key = key;
      const kind = s.strategy;
      const likely = (action) => !kind || { weighted: ['weights'], canary: ['promote', 'rollback'], 'blue-green': ['promote', 'rollback', 'switch'] }[kind]?.includes(action);
      const style = (action, cls) => (likely(action) ? cls : 'subtle');
      const weights = s.weights || {};
      const inputs = names.map((n) => h('input', { type: 'number', min: 0, step: 'any', name: n, 'data-weight': n, value: weights[n] ?? '' }));
      const form = h('form', { id: 'weights-form', onsubmit: (ev) => {
        ev.preventDefault();
        const w = {};
        for (const i of inputs) if (i.value !== '') w[i.name] = Number(i.value);
        const split = Object.entries(w).map(([k, v]) => `${k} ${v}`).join(', ') || '(nothing)';
        act(name, 'weights', { weights: w }, `Set the traffic split of ${name} to ${split}? It applies from the next request until the configuration changes.`);
      } }, inputs.map((i) => h('label', { class: 'field' }, i.name, i)),
      h('button', { type: 'submit', 'data-action': 'weights', class: style('weights', 'primary'),
        title: likely('weights') ? null : `a ${kind} router will probably refuse weights` }, 'Set weights'));
      const canary = kind === 'canary';
      const promoteText = canary ? `Promote the canary '${s.canary}' of ${name} straight to 100% of traffic?`
        : kind === 'blue-green' ? `Switch ${name} from '${s.active}' to the other colour?` : `Ask ${name}'s router to promote?`;
      const rollbackText = canary ? `Roll the canary of ${name} back to 0%? All traffic returns to '${s.stable}'.`
        : kind === 'blue-green' ? `Switch ${name} back to the colour active before the last switch${s.previous ? ` ('${s.previous}')` : ''}?` : `Ask ${name}'s router to roll back?`;
      const button = (action, label, cls, body, text, extra = {}) => h('button', { type: 'button', 'data-action': action, class: style(action, cls), ...extra,
        onclick: () => act(name, action, body, text) }, label);
      actions.replaceChildren(h('h2', null, 'Actions'), h('div', { class: 'actions' }, form,
        button('promote', 'Promote', 'primary', {}, promoteText),
        button('rollback', 'Roll back', 'danger', {}, rollbackText),
        kind === 'blue-green' ? names.filter((n) => n !== s.active).map((n) => button('switch', `Switch to ${n}`, 'primary', { to: n },
          `Switch all traffic of ${name} from '${s.active}' to '${n}'? The very next request goes to '${n}'.`, { 'data-to': n })) : null));
    }

    function renderStrategy(d) {
      const s = d.strategy;
      strategy.dataset.strategy = s ? s.strategy || 'custom' : 'none';
      const names = d.variants.map((v) => v.name);
      renderIf(strategy, [s, d.flag_routing, d.default_variant, names, d.variants.map((v) => [v.latency_p99_us, v.errors])], () => {
        if (!s) {
          return h('p', null, d.flag_routing
            ? `No router: the flag '${d.flag_routing.flag}' routes; otherwise the default variant '${d.default_variant}' answers.`
            : `No router: the default variant '${d.default_variant}' answers every request.`);
        }
        if (s.strategy === 'canary') return canaryBlock(s, d, names);
        if (s.strategy === 'weighted') return weightedBlock(s, names);
        if (s.strategy === 'blue-green') return blueGreenBlock(s, names);
        if (s.strategy === 'bandit') return banditBlock(s, names);
        return [h('p', { class: 'muted' }, 'A router this page does not know; its state as it reports it:'), h('pre', { class: 'json' }, JSON.stringify(s, null, 2))];
      });
    }

    /** A bar split in proportion to parts [{name, value}]. */
    function splitBar(parts, names) {
      const total = parts.reduce((a, p) => a + p.value, 0) || 1;
      return h('div', { class: 'split' }, parts.filter((p) => p.value > 0).map((p) => {
        const seg = h('span', { title: `${p.name}: ${(p.value / total * 100).toFixed(1)}%` }, `${p.name} ${(p.value / total * 100).toFixed(p.value / total < 0.1 ? 1 : 0)}%`);
        seg.style.width = (p.value / total * 100) + '%';
        seg.style.background = colourOf(names, p.name);
        return seg;
      }));
    }

    function canaryBlock(s, d, names) {
      const rolled = s.status === 'rolled-back';
      const steps = h('div', { class: 'steps' + (rolled ? ' rolled' : '') }, s.steps.map((pct, i) =>
        h('span', { class: s.status === 'promoted' || i < s.step - 1 ? 'done' : i === s.step - 1 ? 'now' : '' }, pct + '%')));
      const since = s.since_start || {};
      const variant = (n) => d.variants.find((v) => v.name === n) || {};
      const metrics = (s.analysis && s.analysis.metrics) || [];
      const bound = (m) => (m.metric === 'error_rate'
        ? [`error rate ≤ stable + ${fmt.pct(m.allowed, 2)}`, `canary ${fmt.pct(m.canary, 2)} vs stable ${fmt.pct(m.stable, 2)}`]
        : [`median latency ≤ stable + ${fmt.ms(m.allowed)} ms`, `canary ${fmt.ms(m.canary)} ms vs stable ${fmt.ms(m.stable)} ms`]);
      return [
        h('p', null, badge(s.status, rolled ? 'bad' : s.status === 'promoted' ? 'ok' : 'info'), ' ',
          s.status === 'progressing' ? `step ${s.step} of ${s.steps.length}: the canary '${s.canary}' gets ${s.share_percent}% of traffic` : `the canary '${s.canary}' gets ${s.share_percent}%`),
        steps,
        splitBar([{ name: s.stable, value: 100 - s.share_percent }, { name: s.canary, value: s.share_percent }], names),
        kv([['Why', s.reason],
          ['Since the start', `canary ${since.canary_requests ?? dash} requests, ${fmt.pct(since.canary_error_rate, 2)} errors · ` +
            `stable ${since.stable_requests ?? dash} requests, ${fmt.pct(since.stable_error_rate, 2)} errors`],
          ['p99 now', `canary ${fmt.ms(variant(s.canary).latency_p99_us)} ms · stable ${fmt.ms(variant(s.stable).latency_p99_us)} ms`],
          ['Failing analyses', `${s.failures} in a row (rollback at ${s.failure_limit}), confidence ${s.confidence}`],
          ['Last failed verdict', s.last_failed_verdict ? s.last_failed_verdict.metrics.filter((m) => m.failed).map((m) => bound(m)[1] + `, p = ${fmt.p(m.p_value)}`).join('; ') : null]]),
        h('h3', null, 'Analysis: bounds and measured values'),
        s.analysis && s.analysis.waiting ? h('p', { class: 'muted' }, 'Waiting for the minimum sample: ' + s.analysis.waiting + '. The bounds appear with the first analysis.')
          : h('div', { class: 'table-wrap' }, h('table', { class: 'data', id: 'canary-analysis' },
            h('thead', null, h('tr', null, ['Metric', 'Bound', 'Measured', 'p-value', 'Samples', 'Verdict'].map((t) => h('th', null, t)))),
            h('tbody', null, metrics.map((m) => h('tr', { 'data-metric': m.metric },
              h('td', null, m.metric.replace('_', ' ')), h('td', null, bound(m)[0]), h('td', null, bound(m)[1]), h('td', null, fmt.p(m.p_value)),
              h('td', null, m.samples.join(' / ')), h('td', null, badge(m.failed ? 'fails' : 'passes', m.failed ? 'bad' : 'ok'))))))),
      ];
    }

    function weightedBlock(s, names) {
      const parts = Object.entries(s.weights).map(([n, w]) => ({ name: n, value: w }));
      return [
        h('p', null, `Weighted split, weights from the ${s.weights_from}` + (s.shadows && s.shadows.length ? `; shadows: ${s.shadows.join(', ')}` : '') + '.'),
        splitBar(parts, names),
        h('div', { class: 'legend' }, parts.map((p) => swatch(colourOf(names, p.name), `${p.name}: weight ${p.value}`))),
      ];
    }

    function blueGreenBlock(s, names) {
      return [
        splitBar(names.map((n) => ({ name: n, value: n === s.active ? 100 : 0 })), names),
        h('div', { class: 'colours' }, [s.active, s.previous].filter(Boolean).concat(['blue', 'green'].filter((c) => c !== s.active && c !== s.previous)).slice(0, 2).map((c) =>
          h('div', { class: 'colour' + (c === s.active ? ' active' : ''), 'data-colour': c }, h('strong', null, c),
            h('div', { class: 'small muted' }, c === s.active ? 'active: all traffic' : 'idle' + (s.shadow_idle ? ', sees every request as a shadow' : ''))))),
        kv([['Active from', s.active_from], ['Previous', s.previous], ['Switched', s.switched_at_ms ? fmt.time(s.switched_at_ms) + ' (' + fmt.ago(s.switched_at_ms) + ')' : 'never']]),
      ];
    }

    function banditBlock(s, names) {
      const estimate = (a) => (a.posterior && a.posterior.beta ? a.posterior.beta.alpha / (a.posterior.beta.alpha + a.posterior.beta.beta) : a.mean_reward);
      const posterior = (p) => (!p ? dash : p.beta ? `Beta(${p.beta.alpha}, ${p.beta.beta})` : p.normal ? `Normal(${fmt.fixed(p.normal.mean, 3)}, sd ${fmt.fixed(p.normal.sd, 3)})` : JSON.stringify(p));
      return [
        h('p', null, `Multi-armed bandit, ${s.algorithm}` + (s.epsilon != null ? `, epsilon ${s.epsilon}` : '') + '. Traffic follows the estimated reward; the share over time is charted below.'),
        h('div', { class: 'table-wrap' }, h('table', { class: 'data', id: 'bandit-arms' },
          h('thead', null, h('tr', null, ['Arm', 'Pulls (rewards)', 'Mean reward', 'Posterior', 'Estimate'].map((t) => h('th', null, t)))),
          h('tbody', null, s.arms.map((a) => {
            const bar = h('i');
            bar.style.width = ((estimate(a) || 0) * 100).toFixed(1) + '%';
            bar.style.background = colourOf(names, a.variant);
            return h('tr', { 'data-variant': a.variant }, h('td', null, a.variant), h('td', { class: 'num' }, a.pulls), h('td', { class: 'num' }, fmt.fixed(a.mean_reward, 4)),
              h('td', null, posterior(a.posterior)), h('td', null, h('div', { class: 'meter' }, bar)));
          })))),
      ];
    }

    function renderArms(d, exp) {
      const byName = new Map(d.variants.map((v) => [v.name, v]));
      const perf = exp.performance || {};
      const modelOf = (v) => (v ? `${v.model}@${v.version ?? 'latest'}` : null);
      arms.update(exp.arms.map((a) => ({ ...a, model: modelOf(byName.get(a.variant)), accuracy: perf[a.variant] && perf[a.variant].accuracy })), (a) => a.variant);
      comparisons.update(exp.comparisons, (c) => c.treatment);
      // The interval drawn against zero: red when it excludes zero.
      for (const tr of comparisons.tbody.rows) {
        const c = exp.comparisons.find((x) => x.treatment === tr._key);
        const cell = tr.querySelector('[data-field="ci_bar"]');
        if (!c || !c.result) { cell.replaceChildren(); continue; }
        const [lo, hi] = c.result.ci95;
        const span = Math.max(Math.abs(lo), Math.abs(hi), 1e-9) * 1.1;
        const x = (v) => ((v + span) / (2 * span) * 100).toFixed(1) + '%';
        const bar = cell.firstChild || cell.appendChild(h('div', { class: 'ci' }, h('i'), h('b')));
        bar.className = 'ci' + (lo > 0 || hi < 0 ? ' sig' : '');
        bar.firstChild.style.left = x(lo);
        bar.firstChild.style.width = ((hi - lo) / (2 * span) * 100).toFixed(1) + '%';
        bar.lastChild.style.left = x(0);
      }
    }

    function renderShadows(d, exp) {
      const list = Object.entries(exp.shadows || d.shadows || {});
      shadowPanel.hidden = !list.length;
      // The primary: the busiest variant that is not itself a shadow.
      const primaries = d.variants.filter((v) => !(v.name in (exp.shadows || {}))).sort((a, b) => b.requests - a.requests);
      const primaryP50 = primaries.length ? primaries[0].latency_p50_us : null;
      shadows.update(list.map(([n, s]) => ({ ...s, name: n, primaryP50 })), (s) => s.name);
    }

    function flagsBlock(d) {
      const out = [];
      if (d.flag_routing) {
        const map = Object.entries(d.flag_routing.variants).map(([k, v]) => `${k} → ${v}`).join(', ');
        out.push(h('p', null, `Flag '${d.flag_routing.flag}' routes: ${map}; other values leave the choice to the router.`));
      }
      for (const def of d.flag_definitions || []) {
        const bound = (d.flags || []).find((f) => f.plugin === def.plugin) || {};
        out.push(h('h3', null, `From ${def.plugin}`, bound.failures ? h('span', { class: 'bad' }, ` · ${bound.failures} failures: ${bound.last_error || ''}`) : null));
        out.push(h('div', { class: 'table-wrap' }, h('table', { class: 'data' },
          h('thead', null, h('tr', null, ['Flag', 'State', 'Default', 'Variants', 'Owner', 'Expiry', 'Purpose'].map((t) => h('th', null, t)))),
          h('tbody', null, def.flags.map((f) => h('tr', { 'data-flag': f.key },
            h('td', null, f.key), h('td', null, badge(f.state, f.state === 'ENABLED' ? 'ok' : 'warn')), h('td', null, f.default_variant),
            h('td', null, f.variants.join(', ')), h('td', null, (f.metadata && f.metadata.owner) || dash),
            h('td', { class: f.expired ? 'bad' : '' }, ((f.metadata && f.metadata.expiry) || dash) + (f.expired ? ' (expired)' : '')),
            h('td', { class: 'wrap' }, (f.metadata && f.metadata.purpose) || dash)))))));
      }
      return out.length ? out : h('p', { class: 'muted' }, 'No flags on this endpoint.');
    }

    /** The three history charts. The server gives per-step counts (not cumulative), so a
     *  rate is a count over step_seconds and a share is a count over the step's total. */
    function renderHistory(hist, names) {
      const step = hist.step_seconds || 10;
      const vs = hist.variants.filter((v) => names.includes(v.name));
      const times = hist.times;
      setText(historyNote, times.length ? `One point per ${step} s, last ${Math.round((hist.span_seconds || 3600) / 60)} minutes.` : `No points yet: the first comes after ${step} s.`);
      const key = vs.map((v) => v.name).join('\0');
      const colour = (n) => colourOf(names, n);
      charts.traffic.set(key, timeOpts(vs.map((v) => ({ label: v.name, stroke: colour(v.name) })), (x) => fmt.fixed(x, 1)),
        [times, ...vs.map((v) => v.requests.map((n) => n / step))]);
      const latencySeries = vs.flatMap((v) => [{ label: v.name + ' p50', stroke: colour(v.name) }, { label: v.name + ' p99', stroke: colour(v.name), dash: [4, 3] }]);
      charts.latency.set(key, timeOpts(latencySeries, (x) => fmt.fixed(x, 2), { spanGaps: true }),
        [times, ...vs.flatMap((v) => [v.p50_ms, v.p99_ms])]);
      // Stacked share: series i is the sum of shares 0..i; bands fill between neighbours.
      const totals = times.map((_, i) => vs.reduce((s, v) => s + v.requests[i], 0));
      const shares = vs.map((v) => v.requests.map((n, i) => (totals[i] ? (n / totals[i]) * 100 : null)));
      const stacked = shares.map((_, k) => times.map((__, i) => (totals[i] ? shares.slice(0, k + 1).reduce((s, sh) => s + sh[i], 0) : null)));
      charts.share.set(key, timeOpts(vs.map((v) => ({ label: v.name, stroke: colour(v.name), fill: colour(v.name) + '55' })), (x) => x.toFixed(0),
        { range: [0, 100], bands: vs.slice(1).map((_, k) => ({ series: [k + 2, k + 1] })), value: (i, idx) => (idx == null || shares[i][idx] == null ? dash : shares[i][idx].toFixed(1) + '%') }),
      [times, ...stacked]);
    }

    return {
      root, refresh, interval: 2000,
      destroy() { for (const c of Object.values(charts)) c.destroy(); },
    };
  }

  // ---------------------------------------------------------------- models

  /** The version that answers when none is named: the highest loaded one. */
  const servingVersion = (m) => Math.max(-Infinity, ...m.versions.filter((v) => v.loaded).map((v) => v.version));

  function modelsPage() {
    const table = keyedTable('models', 'data-model', [
      { field: 'name', label: 'Model', get: (m) => ({ text: m.name, href: '#/model/' + enc(m.name) }) },
      { field: 'serving', label: 'Serving', get: (m) => ({ text: m.serving ? `serving v${servingVersion(m)}` : 'not serving', badge: m.serving ? 'ok' : 'bad' }) },
      { field: 'versions', label: 'Versions', wrap: true, get: (m) => m.versions.map((v) => `v${v.version} ${v.refused ? 'refused: ' + v.refused : v.loaded ? 'loaded' : 'not loaded'}`).join('; ') },
      { field: 'drifted', label: 'Drifted features', wrap: true, get: (m) => (m.drifted.length
        ? { text: m.drifted.map((d) => `v${d.version} ${d.feature}`).join(', '), cls: 'bad' } : { text: 'none', cls: 'good' }) },
      { field: 'config_refused', label: 'model.toml', wrap: true, get: (m) => (m.config_refused ? { text: 'refused: ' + m.config_refused, cls: 'bad' } : 'ok') },
      { field: 'endpoints', label: 'Endpoints', wrap: true, get: (m) => m.endpoints.join(', ') || dash },
    ]);
    async function refresh() {
      const [status, list] = await Promise.all([api('/admin/status'), api('/admin/endpoints')]);
      timed(() => table.update(status.models.map((m) => ({ ...m, endpoints: list.endpoints.filter((e) => variantsOf(e).some((v) => v.model === m.name)).map((e) => e.name) })), (m) => m.name));
    }
    return { root: panel('Models', table.el), refresh, interval: 2000 };
  }

  function modelPage(name) {
    const versions = keyedTable('versions', 'data-version', [
      { field: 'version', label: 'Version', get: (v) => 'v' + v.version },
      { field: 'state', label: 'State', get: (v) => (v.refused ? { text: 'refused', badge: 'bad' }
        : v.serving ? { text: 'serving (default)', badge: 'ok' } : v.loaded ? { text: 'loaded', badge: 'info' } : { text: 'not loaded', badge: '' }) },
      { field: 'refused', label: 'Refused because', wrap: true, get: (v) => ({ text: v.refused || '', cls: 'bad' }) },
      { field: 'evaluation', label: 'Evaluation (model card)', wrap: true, get: (v) => (v.evaluation ? Object.entries(v.evaluation).map(([k, x]) => `${k}: ${x}`).join(' · ') : dash) },
    ]);
    const card = h('div', { id: 'model-card' });
    const drift = h('div', { id: 'drift' });
    const segments = h('div', { id: 'segments' });
    const root = h('div', null, h('div', { class: 'page-head' }, h('h1', null, name), h('a', { href: '#/models' }, 'all models')),
      h('div', { class: 'grid2' }, panel('Versions', versions.el), panel('Model card', card)),
      panel('Drift per feature',
        h('div', { class: 'legend' }, swatch('#8a94a6', 'reference share per bin'), swatch('#e07b00', 'current share'), swatch('#c62828', 'current, drifted feature')),
        drift),
      panel('Accuracy by segment', segments));
    const driftCharts = new Map(); // "version/feature" -> Chart
    let ticks = 0;
    let cardData = null;
    let perf = [];

    async function refresh() {
      const slow = ticks++ % 5 === 0; // card and experiments change slowly: every fifth poll
      const [status, dr, cd, list] = await Promise.all([
        api('/admin/status'), api('/admin/drift/' + enc(name)),
        slow ? api(`/admin/models/${enc(name)}/card`) : null,
        slow ? api('/admin/endpoints') : null,
      ]);
      if (cd) cardData = cd;
      if (list) {
        const serving = list.endpoints.filter((e) => variantsOf(e).some((v) => v.model === name));
        const exps = await Promise.all(serving.map((e) => api('/admin/experiments/' + enc(e.name))));
        perf = serving.map((e, i) => ({ endpoint: e.name, variants: variantsOf(e).filter((v) => v.model === name), exp: exps[i] }));
      }
      const m = status.models.find((x) => x.name === name);
      if (!m) throw new ApiError(404, `no model '${name}' in /admin/status`);
      timed(() => {
        const top = servingVersion(m);
        const evaluation = (cardData && cardData.evaluation) || {};
        versions.update(m.versions.map((v) => ({ ...v, serving: v.version === top, evaluation: evaluation[v.version] })), (v) => String(v.version));
        if (cardData) renderIf(card, cardData, cardBlock);
        renderDrift(dr);
        renderIf(segments, perf.map((p) => [p.endpoint, p.exp.performance, p.exp.segment_by]), segmentsBlock);
      });
    }

    function cardBlock(c) {
      return [
        kv([['Description', c.description], ['Intended use', c.intended_use], ['Limitations', c.limitations], ['Owner', c.owner], ['Training data', c.training_data]]),
        h('h3', null, 'History'),
        h('ul', { class: 'small' }, (c.history || []).slice(0, 8).map((x) => h('li', null, `${fmt.time(x.at_ms)} ${x.kind} ${x.to || ''} `, h('span', { class: 'muted' }, x.detail || '')))),
      ];
    }

    function renderDrift(dr) {
      // Structure (one card per version and feature) is rebuilt only when the set changes.
      const shape = dr.versions.map((v) => [v.version, v.features.map((f) => f.feature)]);
      if (drift._shape !== JSON.stringify(shape)) {
        drift._shape = JSON.stringify(shape);
        for (const c of driftCharts.values()) c.destroy();
        driftCharts.clear();
        drift.replaceChildren(...dr.versions.map((v) => h('div', { 'data-drift-version': v.version },
          h('h3', null, `Version ${v.version}`, h('span', { class: 'muted small' },
            ` · window ${v.window}, at least ${v.min_samples ?? '?'} samples, KS threshold ${v.ks_threshold}, PSI threshold ${v.psi_threshold}`)),
          h('div', { class: 'cards' }, v.features.map((f) => {
            const box = h('div', { class: 'chart' });
            driftCharts.set(v.version + '/' + f.feature, new Chart(box, 130));
            return h('div', { class: 'card', 'data-feature': f.feature, 'data-version': v.version },
              h('div', null, h('strong', null, f.feature), ' ', h('span', { class: 'badge', 'data-field': 'drifted' })),
              h('div', { class: 'small muted', 'data-field': 'figures' }), box);
          })))));
        if (!dr.versions.length) drift.append(h('p', { class: 'muted' }, 'No loaded version of this model has a drift reference (reference.json).'));
      }
      for (const v of dr.versions) {
        for (const f of v.features) {
          const cardEl = drift.querySelector(`[data-version="${v.version}"][data-feature="${CSS.escape(f.feature)}"]`);
          const b = cardEl.querySelector('[data-field="drifted"]');
          const judged = f.ks != null;
          setText(b, f.drifted ? 'drifted' : judged ? 'ok' : 'too few samples');
          setClass(b, 'badge ' + (f.drifted ? 'bad' : judged ? 'ok' : ''));
          setText(cardEl.querySelector('[data-field="figures"]'), `KS ${fmt.fixed(f.ks, 3)} · PSI ${fmt.fixed(f.psi, 3)} · ${f.samples} samples`);
          drawBins(driftCharts.get(v.version + '/' + f.feature), f);
        }
      }
    }

    /** Reference and current share per bin, side by side; the current red when drifted. */
    function drawBins(chart, f) {
      const bins = f.bins || [];
      if (!bins.length) { if (!chart.box.textContent) chart.box.textContent = 'No distribution from this server.'; return; }
      const labels = bins.map((b, i) => (b.upper == null ? '>' + (i ? Number(bins[i - 1].upper.toPrecision(3)) : '') : '≤' + Number(b.upper.toPrecision(3))));
      const series = [{ label: 'reference', stroke: '#8a94a6' }, { label: 'current', stroke: f.drifted ? '#c62828' : '#e07b00' }];
      chart.set(labels.join() + f.drifted, barOpts(series, labels, (x) => (x * 100).toFixed(0) + '%', false),
        [bins.map((_, i) => i), bins.map((b) => b.reference), bins.map((b) => b.current)]);
    }

    /** Overall accuracy and reward per endpoint variant serving this model, then per
     *  segment for the endpoints that set segment_by: a column pair per variant. */
    function segmentsBlock() {
      if (!perf.length) return h('p', { class: 'muted' }, 'No endpoint serves this model.');
      const score = (x) => (x && x.count ? `${fmt.pct(x.mean)} (n ${x.count})` : dash);
      const gap = (g) => (g ? `${g.best} ${fmt.pct(g.best_mean)} vs ${g.worst} ${fmt.pct(g.worst_mean)}: ${fmt.pct(g.gap)}` : dash);
      const reportOf = (p, v) => (p.exp.performance || {})[v.name];
      const rows = perf.flatMap((p) => p.variants.filter((v) => reportOf(p, v)).map((v) => ({ p, v, r: reportOf(p, v) })));
      const heads = (names) => h('thead', null, h('tr', null, names.map((t) => h('th', null, t))));
      const out = [h('div', { class: 'table-wrap' }, h('table', { class: 'data', id: 'accuracy' },
        heads(['Endpoint', 'Variant', 'Accuracy', 'Reward', 'Accuracy gap (best vs worst segment)', 'Reward gap']),
        h('tbody', null, rows.map(({ p, v, r }) => h('tr', { 'data-endpoint': p.endpoint, 'data-variant': v.name },
          h('td', null, h('a', { href: '#/endpoint/' + enc(p.endpoint) }, p.endpoint)), h('td', null, `${v.name} (v${v.version ?? '?'})`),
          h('td', null, score(r.accuracy)), h('td', null, score(r.reward)),
          h('td', { class: r.accuracy_gap && r.accuracy_gap.gap > 0.1 ? 'bad' : '' }, gap(r.accuracy_gap)), h('td', null, gap(r.reward_gap)))))))];
      for (const p of perf.filter((x) => x.exp.segment_by)) {
        const vs = p.variants.filter((v) => reportOf(p, v));
        const keys = [...new Set(vs.flatMap((v) => Object.keys(reportOf(p, v).segments || {})))].sort();
        out.push(h('h3', null, `${p.endpoint} by ${p.exp.segment_by}`), h('div', { class: 'table-wrap' }, h('table', { class: 'data segments', 'data-endpoint': p.endpoint },
          heads(['Segment', ...vs.flatMap((v) => [`${v.name} accuracy`, `${v.name} reward`])]),
          h('tbody', null, keys.map((k) => h('tr', { 'data-segment': k }, h('td', null, k),
            vs.flatMap((v) => { const x = (reportOf(p, v).segments || {})[k] || {}; return [h('td', null, score(x.accuracy)), h('td', null, score(x.reward))]; })))))));
      }
      if (!perf.some((x) => x.exp.segment_by)) out.push(h('p', { class: 'muted small' }, 'Set segment_by on an endpoint to see accuracy per segment (e.g. per country).'));
      return out;
    }

    return { root, refresh, interval: 2000, destroy() { for (const c of driftCharts.values()) c.destroy(); } };
  }

  // ---------------------------------------------------------------- cost

  function costPage() {
    const cols = (first) => [...first,
      { field: 'cpu_seconds', label: 'CPU s', num: 1, get: (r) => fmt.fixed(r.cpu_seconds, 3) },
      { field: 'predictions', label: 'Predictions', num: 1, get: (r) => String(r.predictions) },
      { field: 'predictions_per_cpu_second', label: 'Predictions / CPU s', num: 1, get: (r) => fmt.fixed(r.predictions_per_cpu_second, 0) },
      { field: 'cost_per_million', label: 'Cost / million', num: 1, get: (r) => fmt.sig4(r.cost_per_million) }];
    const models = keyedTable('cost-models', (r) => ({ 'data-model': r.model, 'data-version': r.version }), cols([
      { field: 'model', label: 'Model', get: (r) => r.model }, { field: 'version', label: 'Version', get: (r) => 'v' + r.version }]));
    const variants = keyedTable('cost-variants', (r) => ({ 'data-endpoint': r.endpoint, 'data-variant': r.variant }), cols([
      { field: 'endpoint', label: 'Endpoint', get: (r) => ({ text: r.endpoint, href: '#/endpoint/' + enc(r.endpoint) }) },
      { field: 'variant', label: 'Variant', get: (r) => r.variant },
      { field: 'model', label: 'Model', get: (r) => `${r.model}@${r.version ?? 'latest'}` }]));
    const price = h('p', { id: 'cost-price' });
    const box = h('div', { id: 'chart-cost', class: 'chart' });
    const chartTitle = h('h2');
    const chart = new Chart(box, 200);
    const root = h('div', null, panel('Cost', price, h('p', { class: 'muted small' }, 'CPU time the models took and the predictions (rows) they made, since the server started.')),
      h('section', { class: 'panel' }, chartTitle, box),
      panel('Per model version', models.el), panel('Per endpoint variant', variants.el));

    async function refresh() {
      const c = await api('/admin/cost');
      timed(() => {
        if (c.core_hour_price == null) {
          price.replaceChildren('No price set, so no cost is computed. Set ', h('code', null, 'core_hour_price'), ' under ',
            h('code', null, '[monitoring]'), ' in modelyard.toml (what one CPU core costs an hour) to see it.');
          setClass(price, 'warn');
        } else {
          setText(price, `Price: ${c.core_hour_price} per core-hour (monitoring.core_hour_price).`);
          setClass(price, '');
        }
        models.update(c.models, (r) => r.model + '\0' + r.version);
        variants.update(c.variants, (r) => r.endpoint + '\0' + r.variant);
        // With a price: cost per million; without: CPU µs per prediction, which orders the same.
        const byCost = c.core_hour_price != null;
        setText(chartTitle, byCost ? 'Cost of a million predictions, per model version' : 'CPU µs per prediction, per model version');
        const labels = c.models.map((r) => `${r.model} v${r.version}`);
        const values = c.models.map((r) => (byCost ? r.cost_per_million : r.predictions_per_cpu_second ? 1e6 / r.predictions_per_cpu_second : null));
        chart.set(labels.join() + byCost, barOpts([{ label: byCost ? 'cost / million' : 'CPU µs / prediction', stroke: '#2557d6' }], labels, (x) => fmt.sig4(x)),
          [labels.map((_, i) => i), values]);
      });
    }
    return { root, refresh, interval: 2000, destroy: () => chart.destroy() };
  }

  // ---------------------------------------------------------------- plugins

  function pluginsPage() {
    const tbody = h('tbody');
    const heads = ['', 'Plugin', 'World', 'State', 'Hash', 'Loaded', 'Calls', 'Mean call µs', 'Failures', 'Last failure', 'Last error'];
    const FIELDS = ['name', 'world', 'state', 'hash', 'loaded_at', 'calls', 'call_mean_us', 'failures', 'last_failure', 'last_error'];
    const root = panel('Plugins', h('p', { class: 'muted small' }, 'Open a plugin for its load and swap history.'),
      h('div', { class: 'table-wrap' }, h('table', { id: 'plugins', class: 'data' }, h('thead', null, h('tr', null, heads.map((t, i) => h('th', { class: i >= 6 && i <= 8 ? 'num' : null }, t)))), tbody)));
    const open = new Map(); // plugin -> its history rows, or null while loading

    async function loadHistory(name) {
      open.set(name, null);
      schedule(0);
      try {
        const a = await api(`/admin/audit?subject=${enc(name)}&limit=20`);
        if (open.has(name)) open.set(name, a.changes.filter((c) => c.kind.startsWith('plugin.')));
      } catch (e) {
        open.delete(name);
        report(e.status === 404 ? new ApiError(404, 'No swap history: this server keeps no audit trail (monitoring.database = "").') : e, 'action');
      }
      schedule(0);
    }

    let last = [];
    async function refresh() {
      last = (await api('/admin/plugins')).plugins;
      timed(render);
    }

    function render() {
      const items = last.flatMap((p) => (open.has(p.name) ? [p, { detail: p.name }] : [p]));
      syncKeyed(tbody, items, (x) => (x.detail ? 'history\0' + x.detail : x.name), (x) => {
        if (x.detail) return h('tr', { class: 'detail', 'data-plugin-history': x.detail }, h('td', { colspan: heads.length }));
        const toggle = h('button', { type: 'button', class: 'link', 'aria-expanded': 'false', 'data-toggle': x.name, onclick: () => {
          if (open.has(x.name)) { open.delete(x.name); render(); } else loadHistory(x.name);
        } }, '▸');
        return h('tr', { 'data-plugin': x.name }, h('td', null, toggle), FIELDS.map((f) => h('td', { 'data-field': f })));
      }, (tr, x) => (x.detail ? fillHistory(tr.cells[0], open.get(x.detail)) : fillPlugin(tr, x)));
    }

    function fillPlugin(tr, p) {
      const c = tr.cells;
      const isOpen = open.has(p.name);
      setText(c[0].firstChild, isOpen ? '▾' : '▸');
      c[0].firstChild.setAttribute('aria-expanded', String(isOpen));
      fill(c[1], { text: p.name, cls: 'ep-name' });
      fill(c[2], p.world || dash);
      // "serving previous version; new file refused" serves, but needs a look.
      fill(c[3], { text: p.state, badge: p.state === 'serving' ? 'ok' : p.state.startsWith('serving') ? 'warn' : 'bad' });
      fill(c[4], { text: p.hash ? p.hash.slice(0, 12) : dash, title: p.hash || '', cls: 'mono' });
      fill(c[5], { text: p.loaded_at ? fmt.ago(p.loaded_at * 1000) : dash, title: p.loaded_at ? fmt.time(p.loaded_at * 1000) : '' });
      fill(c[6], p.calls == null ? dash : String(p.calls), 'num');
      fill(c[7], fmt.fixed(p.call_mean_us, 1), 'num');
      fill(c[8], { text: String(p.failures), cls: p.failures ? 'bad' : '' }, 'num');
      fill(c[9], { text: p.last_failure_at ? fmt.ago(p.last_failure_at * 1000) : dash, title: p.last_failure || '' });
      fill(c[10], { text: p.last_error || '', cls: 'bad' }, 'wrap');
    }

    function fillHistory(td, rows) {
      renderIf(td, rows, () => (rows == null ? h('span', { class: 'muted' }, 'Loading…')
        : !rows.length ? h('span', { class: 'muted' }, 'No plugin changes in the audit trail.')
          : h('table', { class: 'data' }, h('tbody', null, rows.map((r) => h('tr', { 'data-id': r.id },
            h('td', null, fmt.time(r.at_ms)), h('td', null, badge(r.kind.replace('plugin.', ''), r.kind === 'plugin.refused' ? 'bad' : r.kind === 'plugin.removed' ? 'warn' : 'ok')),
            h('td', null, r.actor), h('td', { class: 'wrap' }, [r.from, r.to].filter(Boolean).join(' → ')), h('td', { class: 'wrap' }, r.detail || '')))))));
    }

    return { root, refresh, interval: 2000 };
  }

  // ---------------------------------------------------------------- audit

  function auditPage(query) {
    const endpointIn = h('input', { type: 'text', id: 'audit-endpoint', list: 'audit-endpoints', placeholder: 'any', value: query.get('endpoint') || '' });
    const kindIn = h('input', { type: 'text', id: 'audit-kind', list: 'audit-kinds', placeholder: 'any (or endpoint, plugin…)', value: query.get('kind') || '' });
    const sinceIn = h('input', { type: 'datetime-local', id: 'audit-since', step: 1 });
    const kinds = ['plugin', 'plugin.loaded', 'plugin.swapped', 'plugin.refused', 'plugin.removed', 'model', 'model.loaded', 'model.refused', 'model.unloaded', 'model.config_refused',
      'model.reference', 'config.applied', 'config.refused', 'endpoint', 'endpoint.refused', 'endpoint.weights', 'endpoint.promote', 'endpoint.rollback', 'endpoint.state',
      'admin.refused', 'flag.changed', 'drift.detected', 'drift.cleared', 'reload.crashed'];
    const endpointList = h('datalist', { id: 'audit-endpoints' });
    const table = keyedTable('audit', 'data-id', [
      { field: 'at', label: 'At', get: (c) => ({ text: fmt.time(c.at_ms), title: c.at }) },
      { field: 'kind', label: 'Kind', get: (c) => ({ text: c.kind, badge: /refused|crashed|rollback|detected/.test(c.kind) ? 'bad' : '' }) },
      { field: 'actor', label: 'Actor', get: (c) => c.actor },
      { field: 'subject', label: 'Subject', get: (c) => c.subject || dash },
      { field: 'endpoint', label: 'Endpoint', get: (c) => c.endpoint || dash },
      { field: 'from', label: 'From', clip: 1, get: (c) => ({ text: c.from || '', title: c.from || '' }) },
      { field: 'to', label: 'To', clip: 1, get: (c) => ({ text: c.to || '', title: c.to || '' }) },
      { field: 'detail', label: 'Detail', wrap: true, get: (c) => c.detail || '' },
    ]);
    // A long from/to opens in place on click.
    table.tbody.addEventListener('click', (e) => { const td = e.target.closest('td.clip'); if (td) td.classList.toggle('open'); });
    const older = h('button', { type: 'button', id: 'audit-older', onclick: () => loadOlder() }, 'Older');
    const newest = h('button', { type: 'button', id: 'audit-newest', class: 'subtle', hidden: true,
      onclick: () => { rows = []; next = null; paged = false; schedule(0); } }, 'Back to the newest');
    const state = h('span', { class: 'muted small', id: 'audit-state' });
    const form = h('form', { class: 'filters', id: 'audit-form', onsubmit: (e) => { e.preventDefault(); filters = read(); rows = []; paged = false; schedule(0); } },
      h('label', { class: 'field' }, 'Endpoint', endpointIn), h('label', { class: 'field' }, 'Kind', kindIn),
      h('label', { class: 'field' }, 'Since (local time)', sinceIn), h('button', { type: 'submit', id: 'audit-apply', class: 'primary' }, 'Apply'),
      endpointList, h('datalist', { id: 'audit-kinds' }, kinds.map((k) => h('option', { value: k }))));
    const root = panel('Audit trail', form, table.el, h('div', { class: 'pager' }, older, newest, state));
    let rows = [];
    let next = null;
    let paged = false; // once the operator pages, automatic refreshing stops
    let recordsKept = null;
    const self = { root, interval: 5000 };

    /** The filters as the form has them; they apply from "Apply" on, not while typing. */
    function read() {
      const q = {};
      if (endpointIn.value.trim()) q.endpoint = endpointIn.value.trim();
      if (kindIn.value.trim()) q.kind = kindIn.value.trim();
      // datetime-local is the browser's local time; the API wants RFC 3339, sent in UTC.
      const t = sinceIn.value ? new Date(sinceIn.value) : null;
      if (t && !Number.isNaN(t.getTime())) q.since = t.toISOString();
      return q;
    }
    let filters = read();

    function url(before) {
      const q = new URLSearchParams({ limit: '50', ...filters });
      if (before != null) q.set('before', String(before));
      return '/admin/audit?' + q;
    }

    function render() {
      timed(() => table.update(rows, (c) => String(c.id)));
      older.disabled = next == null;
      newest.hidden = !paged;
      self.interval = paged ? null : 5000;
      setText(state, `${rows.length} entries` + (paged ? ' · paused while paging' : ' · refreshing every 5 s') + (next == null ? ' · no older ones' : ''));
    }

    self.refresh = async () => {
      if (paged) return;
      if (recordsKept === null) recordsKept = (await api('/admin/status')).records_kept;
      if (!recordsKept) {
        setText(state, 'This server keeps no audit trail (monitoring.database = "" in modelyard.toml): changes are only logged.');
        self.interval = null;
        return;
      }
      const [a, status] = await Promise.all([api(url()), endpointList.children.length ? null : api('/admin/status')]);
      if (paged) return; // the operator paged while this was on its way
      if (status) endpointList.replaceChildren(...status.endpoints.map((e) => h('option', { value: e.name })));
      rows = a.changes;
      next = a.next;
      render();
    };

    async function loadOlder() {
      if (next == null) return;
      paged = true;
      try {
        const a = await api(url(next));
        rows = rows.concat(a.changes);
        next = a.next;
      } catch (e) { report(e, 'action'); }
      render();
    }
    return self;
  }

  // ---------------------------------------------------------------- wiring

  function init() {
    $('#signin-form').addEventListener('submit', (e) => {
      e.preventDefault();
      const token = $('#token').value.trim();
      withoutToken = !token;
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
      start();
    });
    $('#sign-out').addEventListener('click', (e) => {
      e.preventDefault();
      sessionStorage.removeItem(TOKEN_KEY);
      withoutToken = false;
      showSignIn(null);
    });
    $('#message-close').addEventListener('click', () => clearMessage());
    window.addEventListener('hashchange', route);
    document.addEventListener('visibilitychange', () => { if (!document.hidden && page) schedule(0); });
    // Last line of defence: whatever slips through is shown, not left in the console.
    window.addEventListener('unhandledrejection', (e) => { e.preventDefault(); report(e.reason, 'action'); });
    if (typeof uPlot === 'undefined') { showMessage('The chart library did not load (/dashboard/uPlot.iife.min.js).'); return; }
    start();
  }

  init();
})();
