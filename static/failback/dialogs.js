// The session page's action dialogs and the scheduled switch's countdown. From this file only: the
// Content-Security-Policy allows no inline script, handler or eval.
//
// A button of #session-actions asks the server for its dialog (htmx GET into #action-dialog-body): what
// will happen, with this session's names and figures, a reason and the confirmation. Once it is there the
// <dialog> opens as a modal; the confirmation's answer replaces #session-actions (a refusal too) and closes it.
"use strict";

(() => {
  const dialog = () => document.getElementById("action-dialog");
  let opener = null;

  document.addEventListener("htmx:beforeRequest", (event) => {
    if (event.target.closest("#session-actions form.opener")) {
      opener = event.target.querySelector("button");
    }
  });

  // Opened once the swap has settled: htmx focuses new content's [autofocus] in its settle step (20 ms after the
  // swap), which would otherwise pull the focus back to the reason from wherever a quick keyboard user had moved it.
  document.addEventListener("htmx:afterSettle", (event) => {
    const box = dialog();
    if (box && event.detail.target && event.detail.target.id === "action-dialog-body" && !box.open) {
      box.showModal();
      const first = box.querySelector("[autofocus]");
      if (first) first.focus();
    }
  });

  // A refused or invalid confirmation (409, 400) still shows its message in #session-actions.
  document.addEventListener("htmx:beforeSwap", (event) => {
    const form = event.detail.requestConfig && event.detail.requestConfig.elt;
    if (form && form.closest && form.closest("#action-dialog") && [400, 409].includes(event.detail.xhr.status)) {
      event.detail.shouldSwap = true;
      event.detail.isError = false;
    }
  });

  // The live socket redraws the buttons when what they show changes (data-drawn: presenters.buttons_drawn).
  // When the buttons shown were already drawn for that (by an action's answer), they stay, with the refusal
  // or notice that came with them.
  document.addEventListener("htmx:oobBeforeSwap", (event) => {
    const shown = event.detail.target;
    if (!shown || shown.id !== "session-actions") return;
    const incoming = event.detail.fragment.querySelector
      ? event.detail.fragment.querySelector("#session-actions") || event.detail.fragment.firstElementChild
      : null;
    if (incoming && incoming.dataset && incoming.dataset.drawn === shown.dataset.drawn) {
      event.detail.shouldSwap = false;
    }
  });

  document.addEventListener("htmx:afterRequest", (event) => {
    const box = dialog();
    if (box && box.open && event.target.closest("#action-dialog form.confirm")) {
      box.close();
    }
  });

  document.addEventListener("click", (event) => {
    if (event.target.closest("[data-dialog-close]")) {
      const box = event.target.closest("dialog");
      if (box) box.close();
    }
  });

  document.addEventListener(
    "close",
    (event) => {
      if (event.target.id !== "action-dialog") return;
      document.getElementById("action-dialog-body").replaceChildren();
      const back = opener && opener.isConnected ? opener : document.querySelector("#session-actions button");
      if (back) back.focus();
      opener = null;
    },
    true,
  );

  // <strong data-countdown="ISO time" data-countdown-now="the server's time when it drew it">: counts down each
  // second, measured against the server's clock (the browser's may be off).
  const pad = (n) => String(n).padStart(2, "0");
  const left = (ms) => {
    const s = Math.max(0, Math.round(ms / 1000));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (h >= 24) return `${Math.floor(h / 24)} d ${h % 24} h ${pad(m)} min`;
    if (h) return `${h} h ${pad(m)} min ${pad(sec)} s`;
    if (m) return `${m} min ${pad(sec)} s`;
    return `${sec} s`;
  };
  const tick = () => {
    for (const el of document.querySelectorAll("[data-countdown]")) {
      if (el.dataset.skew === undefined) {
        const drawn = Date.parse(el.dataset.countdownNow || "");
        el.dataset.skew = Number.isNaN(drawn) ? 0 : drawn - Date.now();
      }
      const due = Date.parse(el.dataset.countdown) - (Date.now() + Number(el.dataset.skew));
      el.textContent = due > 0 ? `in ${left(due)}` : el.dataset.countdownLate;
    }
  };
  document.addEventListener("DOMContentLoaded", tick);
  document.addEventListener("htmx:afterSettle", tick);
  document.addEventListener("htmx:oobAfterSwap", tick); // the live fragments redraw the server's own wording
  setInterval(tick, 1000);
})();
