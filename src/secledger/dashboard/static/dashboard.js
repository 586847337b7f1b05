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
  function resize() {
    document.querySelectorAll(".js-plotly-plot").forEach(function (el) {
      window.Plotly.Plots.resize(el);
    });
  }
  window.addEventListener("beforeprint", resize);
  window.addEventListener("afterprint", resize);
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", draw);
  } else { draw(); }
})();
