/*
 * Corral's sandbox in JupyterLab: shows Corral's idle-GPU warning as a JupyterLab notification (and keeps its
 * countdown current) before the sandbox is stopped. Hand-written, no build step: a module-federation container
 * (the shape JupyterLab loads prebuilt extensions from: window._JUPYTERLAB[name] with init() and get(module))
 * whose "./extension" module is one plugin. It uses no shared module, only the application's commands
 * (apputils:notify, apputils:update-notification), and asks the notebook server's own /corral/idle (sandbox/lab.py),
 * which asks Corral with the server's token.
 */
(function () {
  "use strict";
  var POLL_MS = 5000;

  function baseUrl() {
    try {
      var data = JSON.parse(document.getElementById("jupyter-config-data").textContent);
      return (data.baseUrl || "/").replace(/\/?$/, "/");
    } catch (e) {
      return "/";
    }
  }

  var plugin = {
    id: "corral-sandbox:idle-warning",
    description: "Warns before Corral stops this sandbox for idle GPUs.",
    autoStart: true,
    activate: function (app) {
      var url = baseUrl() + "corral/idle";
      var shown = null; // {key, id, message}: the notification of the current idle stretch

      function notify(idle) {
        var key = String(Math.round(idle.idle_since));
        if (shown && shown.key === key) {
          if (shown.message !== idle.warning && shown.id) {
            shown.message = idle.warning;
            app.commands.execute("apputils:update-notification",
              { id: shown.id, message: idle.warning, type: "warning", autoClose: false });
          }
          return;
        }
        if (shown && shown.id) {
          app.commands.execute("apputils:dismiss-notification", { id: shown.id });
        }
        shown = { key: key, id: null, message: idle.warning };
        var mine = shown;
        Promise.resolve(app.commands.execute("apputils:notify",
          { message: idle.warning, type: "warning", options: { autoClose: false } }))
          .then(function (id) { mine.id = id; })
          .catch(function (e) { console.warn("corral: cannot show the idle warning", e); });
      }

      function look() {
        // As JupyterLab's own requests: the _xsrf cookie as X-XSRFToken (JupyterHub refuses a cookie-authenticated
        // API request without it, GET included), and the server's token when the page has one.
        var headers = { Accept: "application/json" };
        var xsrf = document.cookie.match("\\b_xsrf=([^;]*)\\b");
        if (xsrf) {
          headers["X-XSRFToken"] = decodeURIComponent(xsrf[1]);
        }
        var settings = app.serviceManager && app.serviceManager.serverSettings;
        if (settings && settings.token) {
          headers.Authorization = "token " + settings.token;
        }
        fetch(url, { credentials: "same-origin", headers: headers })
          .then(function (r) { return r.ok ? r.json() : null; })
          .then(function (body) {
            var idle = body && body.idle;
            if (idle && idle.warning) {
              notify(idle);
            } else if (shown) { // it works again: the warning no longer holds
              if (shown.id) {
                app.commands.execute("apputils:dismiss-notification", { id: shown.id });
              }
              shown = null;
            }
          })
          .catch(function () { /* the server is going away, or Corral does not answer: look again later */ });
      }

      app.restored.then(function () {
        look();
        window.setInterval(look, POLL_MS);
      });
    }
  };

  var modules = {
    "./extension": function () { return { __esModule: true, default: [plugin] }; }
  };
  window._JUPYTERLAB = window._JUPYTERLAB || {};
  window._JUPYTERLAB["corral-sandbox"] = {
    get: function (module) {
      return modules[module] ? Promise.resolve(modules[module]) : Promise.reject(new Error("no module " + module));
    },
    init: function () { return Promise.resolve(); }
  };
})();
