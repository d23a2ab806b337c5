/* A small line chart on <canvas>: no library, no build step.
 * SxChart.draw(canvas, series) with series = [{name, points: [[t_ms, value], ...]}].
 * Only finite numbers are plotted; canvas.dataset.points says how many were drawn. */
(function () {
  'use strict';
  var COLOURS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf'];

  function pad2(n) { return (n < 10 ? '0' : '') + n; }
  function clock(t) { var d = new Date(t); return pad2(d.getHours()) + ':' + pad2(d.getMinutes()) + ':' + pad2(d.getSeconds()); }
  function label(v) { var a = Math.abs(v); return (a !== 0 && (a >= 1e5 || a < 1e-2)) ? v.toExponential(2) : String(Math.round(v * 100) / 100); }

  function draw(canvas, series) {
    var ratio = window.devicePixelRatio || 1;
    var width = canvas.clientWidth || canvas.width, height = canvas.clientHeight || canvas.height;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    var g = canvas.getContext('2d');
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    var left = 56, right = 12, top = 12, bottom = 28;
    var plotW = width - left - right, plotH = height - top - bottom;
    var tMin = Infinity, tMax = -Infinity, vMin = Infinity, vMax = -Infinity, count = 0;
    series.forEach(function (s) {
      s.points.forEach(function (p) {
        if (typeof p[1] !== 'number' || !isFinite(p[1])) { return; }
        tMin = Math.min(tMin, p[0]); tMax = Math.max(tMax, p[0]);
        vMin = Math.min(vMin, p[1]); vMax = Math.max(vMax, p[1]);
        count += 1;
      });
    });
    canvas.dataset.points = String(count);
    g.strokeStyle = '#d9dee7'; g.lineWidth = 1; g.fillStyle = '#667085'; g.font = '11px system-ui, sans-serif';
    g.strokeRect(left, top, plotW, plotH);
    if (count === 0) {
      g.fillText('No numeric telemetry yet', left + 12, top + 20);
      return 0;
    }
    if (tMax === tMin) { tMin -= 1000; tMax += 1000; }
    if (vMax === vMin) { vMin -= 1; vMax += 1; }
    var vPad = (vMax - vMin) * 0.08; vMin -= vPad; vMax += vPad;
    function x(t) { return left + (t - tMin) / (tMax - tMin) * plotW; }
    function y(v) { return top + (1 - (v - vMin) / (vMax - vMin)) * plotH; }
    for (var i = 0; i <= 4; i += 1) {
      var v = vMin + (vMax - vMin) * i / 4, yy = y(v);
      g.beginPath(); g.moveTo(left, yy); g.lineTo(left + plotW, yy); g.stroke();
      g.fillText(label(v), 4, yy + 4);
      var t = tMin + (tMax - tMin) * i / 4;
      g.fillText(clock(t), Math.min(x(t) - 20, width - 52), height - 8);
    }
    series.forEach(function (s, index) {
      var pts = s.points.filter(function (p) { return typeof p[1] === 'number' && isFinite(p[1]); })
        .sort(function (a, b) { return a[0] - b[0]; });
      if (!pts.length) { return; }
      g.strokeStyle = COLOURS[index % COLOURS.length]; g.fillStyle = g.strokeStyle; g.lineWidth = 2;
      g.beginPath();
      pts.forEach(function (p, k) { if (k === 0) { g.moveTo(x(p[0]), y(p[1])); } else { g.lineTo(x(p[0]), y(p[1])); } });
      g.stroke();
      pts.forEach(function (p) { g.beginPath(); g.arc(x(p[0]), y(p[1]), 2.5, 0, 2 * Math.PI); g.fill(); });
    });
    return count;
  }

  window.SxChart = { draw: draw, colours: COLOURS };
}());
