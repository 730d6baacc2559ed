// The pages' few behaviours, from this file: the Content-Security-Policy allows no inline script or handler.
"use strict";

// <form data-confirm="question">: submitted only once the user confirms (htmx forms use hx-confirm instead).
document.addEventListener("submit", (event) => {
  const form = event.target.closest("form[data-confirm]");
  if (form && !window.confirm(form.dataset.confirm)) {
    event.preventDefault();
  }
});

// <button data-print>: the browser's print dialog (the session report).
document.addEventListener("click", (event) => {
  if (event.target.closest("[data-print]")) {
    window.print();
  }
});

// <input data-select-on-focus>: selected whole when focused (a new API token, to copy once).
document.addEventListener("focusin", (event) => {
  if (event.target.matches("[data-select-on-focus]")) {
    event.target.select();
  }
});

// The session page: once the live fragment says the session has ended, the notes at the top that were
// about its start ("Failback #N started.") are stale; they go. Errors stay until the next page.
document.addEventListener("htmx:wsAfterMessage", () => {
  if (document.querySelector("#session-progress[data-ended]")) {
    document.querySelectorAll("main > .messages > .msg:not(.error)").forEach((note) => note.remove());
  }
});
