/* neuroidx report: image check, sortable and filterable neuron table. No dependencies. */
(function () {
  "use strict";

  // For automated checks: how many of the page's images loaded.
  function countImages() {
    var images = document.images, loaded = 0;
    for (var i = 0; i < images.length; i++) {
      if (images[i].complete && images[i].naturalWidth > 0) loaded++;
    }
    document.body.setAttribute("data-images-loaded", String(loaded));
    document.body.setAttribute("data-images-total", String(images.length));
  }

  // A cell's sort key: its data-sort, else its text; "" (missing) for an empty cell or a dash.
  function key(cell) {
    if (!cell) return "";
    var s = cell.getAttribute("data-sort");
    if (s === null) s = cell.textContent.trim();
    return s === "\u2013" ? "" : s;
  }

  function sortTable(table, col, descending) {
    var headers = table.tHead.rows[0].cells;
    var numeric = headers[col].getAttribute("data-type") === "num";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.forEach(function (row, i) { row.__order = i; });
    rows.sort(function (a, b) {
      var x = key(a.cells[col]), y = key(b.cells[col]), r;
      // Missing values go last whatever the direction.
      if (x === "" || y === "") {
        r = (x === "" ? 1 : 0) - (y === "" ? 1 : 0);
      } else if (numeric) {
        r = parseFloat(x) - parseFloat(y);
        if (descending) r = -r;
      } else {
        r = x.localeCompare(y);
        if (descending) r = -r;
      }
      return r || a.__order - b.__order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    for (var i = 0; i < headers.length; i++) headers[i].removeAttribute("aria-sort");
    headers[col].setAttribute("aria-sort", descending ? "descending" : "ascending");
  }

  function applyFilters(box) {
    var table = document.getElementById(box.getAttribute("data-table"));
    if (!table) return;
    var text = box.querySelector(".f-text").value.trim().toLowerCase();
    var live = box.querySelector(".f-live");
    var hideDead = live ? live.checked : false;
    var mins = [];
    Array.prototype.forEach.call(box.querySelectorAll(".f-min"), function (input) {
      var v = parseFloat(input.value);
      if (!isNaN(v)) mins.push({ col: parseInt(input.getAttribute("data-col"), 10), min: v });
    });
    var rows = table.tBodies[0].rows, shown = 0, visible = {};
    for (var i = 0; i < rows.length; i++) {
      var row = rows[i], ok = true;
      if (hideDead && row.getAttribute("data-dead") === "1") ok = false;
      if (ok && text && row.textContent.toLowerCase().indexOf(text) < 0) ok = false;
      for (var m = 0; ok && m < mins.length; m++) {
        var value = parseFloat(key(row.cells[mins[m].col]));
        if (!(value >= mins[m].min)) ok = false;  // a missing value fails any minimum
      }
      row.hidden = !ok;
      visible[row.getAttribute("data-unit")] = ok;
      if (ok) shown++;
    }
    // The NF cards follow the table (a card whose unit has no row stays).
    Array.prototype.forEach.call(document.querySelectorAll("[data-card-unit]"), function (card) {
      var ok = visible[card.getAttribute("data-card-unit")];
      card.hidden = ok === false;
    });
    var count = box.querySelector(".f-count");
    if (count) count.textContent = shown + " of " + rows.length + " units shown";
  }

  // A deep link's percent-encoded text; the text as written where it is not valid encoding (a lone "%"),
  // which decodeURIComponent refuses with a URIError.
  function decode(text) {
    try {
      return decodeURIComponent(text);
    } catch (e) {
      return text;
    }
  }

  // Deep links: #sort=<column>&desc=1&filter=<text>&min.<column>=<value>&hidedead=1
  function fromHash(box, table) {
    var hash = window.location.hash.replace(/^#/, "");
    if (!hash) return;
    var params = {};
    hash.split("&").forEach(function (part) {
      var eq = part.indexOf("=");
      if (eq > 0) params[decode(part.slice(0, eq))] = decode(part.slice(eq + 1));
    });
    if (box) {
      if (params.filter !== undefined) box.querySelector(".f-text").value = params.filter;
      var live = box.querySelector(".f-live");
      if (live && params.hidedead === "1") live.checked = true;
      Array.prototype.forEach.call(box.querySelectorAll(".f-min"), function (input) {
        var v = params["min." + input.getAttribute("data-name")];
        if (v !== undefined) input.value = v;
      });
      applyFilters(box);
    }
    if (table && params.sort !== undefined) {
      var headers = table.tHead.rows[0].cells;
      for (var i = 0; i < headers.length; i++) {
        if (headers[i].getAttribute("data-name") === params.sort) sortTable(table, i, params.desc === "1");
      }
    }
  }

  function setup() {
    Array.prototype.forEach.call(document.querySelectorAll("table.neurons"), function (table) {
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
        th.addEventListener("click", function () {
          sortTable(table, col, th.getAttribute("aria-sort") === "ascending");
        });
      });
    });
    Array.prototype.forEach.call(document.querySelectorAll(".filters"), function (box) {
      var update = function () { applyFilters(box); };
      Array.prototype.forEach.call(box.querySelectorAll("input"), function (input) {
        input.addEventListener("input", update);
        input.addEventListener("change", update);
      });
    });
    fromHash(document.querySelector(".filters"), document.querySelector("table.neurons"));
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", setup);
  else setup();
  window.addEventListener("load", countImages);
})();
