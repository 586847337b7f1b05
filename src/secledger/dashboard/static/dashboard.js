// Draws the charts the server computed (JSON in #chart-data) with the bundled plotly.js.
"use strict";
(function () {
  function draw() {
    var holder = document.getElementById("chart-data");
    if (!holder || !window.Plotly) { return; }
    var charts = JSON.parse(holder.textContent);
    Object.keys(charts).forEach(function (id) {
      var el = document.getElementById(id);
      var fig = charts[id];
      if (!el) { return; }
      if (!fig.data.length) {
        el.textContent = "No data in this selection.";
        el.classList.add("note");
        return;
      }
      window.Plotly.newPlot(el, fig.data, fig.layout, {
        displaylogo: false, responsive: true, displayModeBar: false
      }).then(function () { el.setAttribute("data-rendered", "true"); });
    });
  }
  // A4 landscape, two columns: each chart gets about 470 CSS pixels. Drawing at that
  // width when printing starts keeps wide screens from clipping charts on paper.
  var PRINT_WIDTH = 470;
  function plots() { return document.querySelectorAll(".js-plotly-plot"); }
  function forPrint() {
    plots().forEach(function (el) { window.Plotly.relayout(el, { width: PRINT_WIDTH }); });
  }
  function forScreen() {
    plots().forEach(function (el) {
      window.Plotly.relayout(el, { width: null, autosize: true });
    });
  }
  window.addEventListener("beforeprint", forPrint);
  window.addEventListener("afterprint", forScreen);
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", draw);
  } else { draw(); }
})();
