/* SmartX HUB dashboard pages. Every value from the hub goes in through textContent (never
 * innerHTML), and every call carries the session's CSRF token (docs/api.md, "Dashboard"). */
(function () {
  'use strict';
  var csrf = document.querySelector('meta[name="csrf-token"]').getAttribute('content');
  var page = document.body.getAttribute('data-page');

  function api(method, path, body) {
    var options = { method: method, credentials: 'same-origin', cache: 'no-cache',
      headers: { 'X-CSRF-Token': csrf, 'Accept': 'application/json' } };
    if (body !== undefined) {
      options.headers['Content-Type'] = 'application/json';
      options.body = JSON.stringify(body);
    }
    return fetch(path, options).then(function (response) {
      if (response.status === 401) {
        window.location.assign('/login');
        throw new Error('session ended');
      }
      if (response.status === 204) { return null; }
      return response.json().then(function (data) {
        if (!response.ok) { throw new Error(data && data.detail ? data.detail : 'HTTP ' + response.status); }
        return data;
      });
    });
  }

  function el(tag, text, attrs) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }
  function when(ms) { return ms ? new Date(ms).toLocaleString() : '—'; }
  function showError(error) {
    var box = document.getElementById('page-error');
    box.textContent = error ? String(error.message || error) : '';
    box.classList.toggle('hidden', !error);
  }
  function row(cells) {
    var tr = document.createElement('tr');
    cells.forEach(function (c) { var td = document.createElement('td'); if (c instanceof Node) { td.appendChild(c); } else { td.textContent = c; } tr.appendChild(td); });
    return tr;
  }
  function badge(text, kind) { return el('span', text, { 'class': 'badge ' + kind }); }
  function every(ms, fn) { fn(); return window.setInterval(fn, ms); }

  // -- devices ----------------------------------------------------------------------------
  function devicesPage() {
    var body = document.querySelector('#devices-table tbody');
    every(5000, function () {
      api('GET', '/api/v1/devices').then(function (data) {
        body.replaceChildren();
        data.items.forEach(function (d) {
          var link = el('a', d.name, { href: '/devices/' + encodeURIComponent(d.id) });
          body.appendChild(row([link, el('code', d.id), d.auth,
            d.enabled ? badge('enabled', 'on') : badge('disabled', 'bad'),
            d.online ? badge('online', 'on') : badge('offline', 'off'), when(d.last_seen_ms)]));
        });
        document.getElementById('devices-empty').classList.toggle('hidden', data.items.length > 0);
        showError(null);
      }).catch(showError);
    });
  }

  // -- one device -------------------------------------------------------------------------
  function devicePage() {
    var id = document.body.getAttribute('data-device-id');
    var base = '/api/v1/devices/' + encodeURIComponent(id);
    var toggle = document.getElementById('device-toggle');
    var current = null;

    function showDevice(d) {
      current = d;
      document.getElementById('device-title').textContent = d.name;
      var facts = document.getElementById('device-facts');
      facts.replaceChildren();
      [['Id', d.id], ['Auth', d.auth], ['Status', d.enabled ? 'enabled' : 'disabled'],
       ['Online', d.online ? 'yes' : 'no'], ['Last seen', when(d.last_seen_ms)],
       ['Enrolled', when(d.created_ms)]].forEach(function (f) {
        facts.appendChild(el('dt', f[0])); facts.appendChild(el('dd', f[1]));
      });
      toggle.textContent = d.enabled ? 'Disable device' : 'Enable device';
      toggle.className = d.enabled ? 'danger' : '';
    }
    toggle.addEventListener('click', function () {
      if (!current) { return; }
      var action = current.enabled ? 'disable' : 'enable';
      if (action === 'disable' && !window.confirm('Disable this device? Its live session ends now.')) { return; }
      api('POST', base + '/' + action).then(showDevice).catch(showError);
    });

    function drawTelemetry(data) {
      var streams = {};
      data.items.forEach(function (r) {
        (streams[r.stream] = streams[r.stream] || []).push([r.ts_ms, r.value]);
      });
      var series = Object.keys(streams).sort().map(function (name) { return { name: name, points: streams[name] }; });
      var drawn = window.SxChart.draw(document.getElementById('chart'), series);
      var legend = document.getElementById('chart-legend');
      legend.replaceChildren();
      series.forEach(function (s, i) {
        var item = el('span', s.name);
        var swatch = el('i'); swatch.style.background = window.SxChart.colours[i % window.SxChart.colours.length];
        item.insertBefore(swatch, item.firstChild);
        legend.appendChild(item);
      });
      document.getElementById('chart-status').textContent = drawn + ' points, updated ' + new Date().toLocaleTimeString();
      var tbody = document.querySelector('#readings-table tbody');
      tbody.replaceChildren();
      data.items.slice(0, 20).forEach(function (r) {
        tbody.appendChild(row([when(r.ts_ms), r.stream, JSON.stringify(r.value)]));
      });
    }

    api('GET', base).then(function (d) {
      toggle.classList.remove('hidden');
      showDevice(d);
      every(3000, function () {
        api('GET', base + '/telemetry?limit=500').then(drawTelemetry).then(function () { showError(null); }).catch(showError);
      });
      window.setInterval(function () { api('GET', base).then(showDevice).catch(showError); }, 10000);
    }).catch(showError);
  }

  // -- tokens -----------------------------------------------------------------------------
  function tokensPage() {
    var form = document.getElementById('token-form');
    var limit = document.getElementById('token-limit-devices');
    var select = document.getElementById('token-devices');
    var tbody = document.querySelector('#tokens-table tbody');

    limit.addEventListener('change', function () { select.disabled = !limit.checked; });
    api('GET', '/api/v1/devices').then(function (data) {
      data.items.forEach(function (d) { select.appendChild(el('option', d.name + ' (' + d.id + ')', { value: d.id })); });
    }).catch(showError);

    function revoke(token) {
      if (!window.confirm('Revoke token "' + (token.name || token.hint) + '"? Scripts using it stop working at once.')) { return; }
      api('DELETE', '/api/v1/tokens/' + encodeURIComponent(token.id)).then(load).catch(showError);
    }
    function load() {
      return api('GET', '/api/v1/tokens').then(function (data) {
        tbody.replaceChildren();
        data.items.forEach(function (t) {
          var button = '';
          if (t.status === 'active') {
            button = el('button', 'Revoke', { type: 'button', 'class': 'danger revoke' });
            button.addEventListener('click', function () { revoke(t); });
          }
          var tr = row([t.name || '—', el('code', '…' + t.hint), t.scopes.join(' '),
            t.devices ? t.devices.join(' ') : 'all', when(t.created_ms), when(t.last_used_ms),
            when(t.expires_ms), badge(t.status, t.status === 'active' ? 'on' : 'bad'), button]);
          tr.setAttribute('data-token-id', t.id);
          tr.setAttribute('data-status', t.status);
          tbody.appendChild(tr);
        });
        showError(null);
      }).catch(showError);
    }

    form.addEventListener('submit', function (event) {
      event.preventDefault();
      var scopes = Array.prototype.map.call(form.querySelectorAll('input[name=scope]:checked'), function (c) { return c.value; });
      if (!scopes.length) { showError('Pick at least one scope.'); return; }
      var request = { name: document.getElementById('token-name').value, scopes: scopes,
        expires_in_s: parseInt(document.getElementById('token-expiry').value, 10) };
      if (limit.checked) {
        request.devices = Array.prototype.map.call(select.selectedOptions, function (o) { return o.value; });
        if (!request.devices.length) { showError('Pick at least one device, or untick the device limit.'); return; }
      }
      api('POST', '/api/v1/tokens', request).then(function (created) {
        document.getElementById('new-token-value').value = created.token;
        document.getElementById('new-token-copied').textContent = '';
        document.getElementById('new-token').hidden = false;
        form.reset(); select.disabled = true;
        load();
      }).catch(showError);
    });
    document.getElementById('new-token-copy').addEventListener('click', function () {
      var input = document.getElementById('new-token-value');
      var done = function () { document.getElementById('new-token-copied').textContent = 'Copied.'; };
      if (navigator.clipboard && navigator.clipboard.writeText) {
        navigator.clipboard.writeText(input.value).then(done, function () { input.select(); document.execCommand('copy'); done(); });
      } else { input.select(); document.execCommand('copy'); done(); }
    });
    document.getElementById('new-token-done').addEventListener('click', function () {
      // Forget it in the page too: it is never shown again.
      document.getElementById('new-token-value').value = '';
      document.getElementById('new-token').hidden = true;
    });
    document.getElementById('tokens-revoke-all').addEventListener('click', function () {
      if (!window.confirm('Revoke every token of your account?')) { return; }
      api('POST', '/api/v1/tokens/revoke-all').then(load).catch(showError);
    });
    load();
  }

  // -- audit ------------------------------------------------------------------------------
  function auditPage() {
    var tbody = document.querySelector('#audit-table tbody');
    var more = document.getElementById('audit-more');
    var cursor = null;
    function load() {
      api('GET', '/api/v1/audit?limit=100' + (cursor ? '&cursor=' + encodeURIComponent(cursor) : '')).then(function (data) {
        data.items.forEach(function (e) {
          tbody.appendChild(row([when(e.ts_ms), e.action, e.actor, e.source, JSON.stringify(e.detail)]));
        });
        cursor = data.next_cursor;
        more.classList.toggle('hidden', !cursor);
      }).catch(showError);
    }
    more.addEventListener('click', load);
    load();
  }

  var pages = { devices: devicesPage, device: devicePage, tokens: tokensPage, audit: auditPage };
  if (pages[page]) { pages[page](); }
}());
