// Corral dashboard: live log follow and state updates on a job's page, reload of a what-if run when it ends.
// Pages work without it (logs have a plain-text link); this only saves reloading by hand.
"use strict";

async function followLogs(box) {
  const log = document.getElementById("log");
  const note = document.getElementById("log-note");
  const stateEl = document.getElementById("job-state");
  const pick = document.getElementById("log-stream");
  let attempt = 0, offset = 0, stream = pick.value, finished = box.dataset.finished === "true";
  pick.addEventListener("change", () => { stream = pick.value; offset = 0; log.textContent = ""; });
  const decoder = new TextDecoder();
  for (;;) {
    const st = await fetch(box.dataset.statusUrl, { credentials: "same-origin" }).then((r) => r.json()).catch(() => null);
    if (st && st.state !== box.dataset.state) {
      // The facts, events, reason and cancel button change with the state: the server renders them again.
      stateEl.textContent = st.state;
      window.location.reload();
      return;
    }
    if (st) {
      if (st.attempt !== attempt) {  // a new attempt (a restart after preemption) has its own log
        if (attempt) log.textContent += `\n--- attempt ${st.attempt} ---\n`;
        attempt = st.attempt; offset = 0;
      }
      finished = st.finished;
    }
    if (attempt > 0) {
      const want = stream;
      const url = `${box.dataset.logsUrl}?stream=${want}&attempt=${attempt}&offset=${offset}&follow=${!finished}`;
      try {
        const r = await fetch(url, { credentials: "same-origin" });
        if (r.ok && r.body) {
          note.textContent = finished ? "" : "Following the log live.";
          const reader = r.body.getReader();
          for (;;) {
            const { value, done } = await reader.read();
            if (done || want !== stream) break;
            offset += value.length;
            log.textContent += decoder.decode(value, { stream: true });
            log.scrollTop = log.scrollHeight;
          }
        }
      } catch (e) { /* the connection dropped: the loop asks again below */ }
    }
    if (finished) { note.textContent = "The job has ended."; return; }
    await new Promise((ok) => setTimeout(ok, 1000));
  }
}

async function waitForRun(el) {
  for (;;) {
    await new Promise((ok) => setTimeout(ok, 1500));
    const st = await fetch(el.dataset.statusUrl, { credentials: "same-origin" }).then((r) => r.json()).catch(() => null);
    if (st && st.state !== el.dataset.state) { window.location.reload(); return; }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const job = document.getElementById("job");
  if (job && document.getElementById("log")) followLogs(job);
  const run = document.getElementById("run");
  if (run && (run.dataset.state === "queued" || run.dataset.state === "running")) waitForRun(run);
});
