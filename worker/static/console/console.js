// The console's only script: confirmations for actions, and the live counts on the jobs page.
(function () {
  "use strict";
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  function refreshCounts(list) {
    var url = list.getAttribute("data-counts-url");
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (data) {
        if (!data) { return; }
        list.querySelectorAll("[data-count-state]").forEach(function (cell) {
          var n = data.counts[cell.getAttribute("data-count-state")];
          cell.textContent = String(n === undefined ? 0 : n);
        });
        var total = list.querySelector("[data-count-total]");
        if (total) { total.textContent = String(data.total); }
        list.setAttribute("data-refreshed", String(Date.now()));
      })
      .catch(function () { /* the next tick tries again */ });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var list = document.querySelector("[data-counts-url]");
    if (list) {
      refreshCounts(list);
      window.setInterval(function () { refreshCounts(list); }, 5000);
    }
  });
})();
