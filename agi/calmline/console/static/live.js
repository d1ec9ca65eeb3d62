"use strict";
// The live page: rows from /live/stream (server-sent events), built with textContent only.
(function () {
  var WINDOW_MS = 30 * 60 * 1000;
  var body = document.querySelector("#live tbody");
  var quiet = document.getElementById("quiet");
  var status = document.getElementById("status");
  var rows = {};

  function cell(tr, text, className) {
    var td = document.createElement("td");
    if (className) td.className = className;
    td.textContent = text;
    tr.appendChild(td);
    return td;
  }

  function render(item, fresh) {
    var tr = document.createElement("tr");
    tr.dataset.session = item.session;
    tr.dataset.kind = item.kind;
    tr.dataset.ts = item.ts;
    if (fresh) tr.className = "fresh";
    var when = cell(tr, "", "mono");
    var link = document.createElement("a");
    link.href = item.href;
    link.textContent = item.at;
    when.appendChild(link);
    var kind = cell(tr, "");
    var chip = document.createElement("span");
    chip.className = "chip k-" + item.kind;
    chip.textContent = item.kind_label;
    kind.appendChild(chip);
    cell(tr, item.agent, "mono");
    var caller = cell(tr, "");
    var bdi = document.createElement("bdi");
    bdi.textContent = item.caller_number + (item.caller_name ? " " + item.caller_name : "");
    caller.appendChild(bdi);
    cell(tr, item.outcome || "in progress");
    var old = rows[item.session];
    if (old) {
      body.replaceChild(tr, old);
    } else {
      body.insertBefore(tr, body.firstChild);
    }
    rows[item.session] = tr;
  }

  function prune() {
    var cut = Date.now() - WINDOW_MS;
    Object.keys(rows).forEach(function (session) {
      if (Date.parse(rows[session].dataset.ts) < cut) {
        body.removeChild(rows[session]);
        delete rows[session];
      }
    });
    quiet.hidden = Object.keys(rows).length > 0;
  }

  function take(fresh) {
    return function (message) {
      JSON.parse(message.data).forEach(function (item) { render(item, fresh); });
      prune();
    };
  }

  var source = new EventSource("/live/stream");
  source.addEventListener("snapshot", take(false));
  source.addEventListener("update", take(true));
  source.onopen = function () { status.textContent = "connected"; };
  source.onerror = function () { status.textContent = "reconnecting…"; };
  setInterval(prune, 30000);
})();
