// tsubame's admin page: recent delivery events with search, a per-message view and a
// CSV download, over the same /api/… endpoints that scripts use. No framework and no
// build step; every value from the server is shown with textContent, never as HTML.
"use strict";

const PAGE_SIZE = 100;
const COUNTS_REFRESH_MS = 10000;
const TOKEN_KEY = "tsubame-admin-token";

let nextOffset = 0;
// Each search is numbered; an answer to an older one (a slow first load) is dropped.
let searchNumber = 0;

function $(id) {
  return document.getElementById(id);
}

function headers() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
}

function say(text, isError) {
  const line = $("status-line");
  line.textContent = text;
  line.classList.toggle("error", Boolean(isError));
}

// Fetches PATH; on 401 asks for the token and throws.
async function api(path) {
  const response = await fetch(path, { headers: headers() });
  if (response.status === 401) {
    $("token-form").hidden = false;
    throw new Error("this server needs its admin token");
  }
  return response;
}

async function apiJson(path) {
  const response = await api(path);
  const body = await response.json();
  if (!response.ok) {
    throw new Error(body.error || response.statusText);
  }
  return body;
}

function filters() {
  const params = new URLSearchParams();
  for (const name of ["address", "status", "category"]) {
    const value = $(name).value.trim();
    if (value) {
      params.set(name, value);
    }
  }
  return params;
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  if (className) {
    td.className = className;
  }
  row.appendChild(td);
  return td;
}

function shortTime(time) {
  return time ? time.replace("T", " ").replace("Z", "") : "";
}

async function search(append) {
  if (!append) {
    nextOffset = 0;
  }
  const params = filters();
  params.set("offset", String(nextOffset));
  params.set("limit", String(PAGE_SIZE));
  const number = ++searchNumber;
  say("Searching…");
  let page;
  try {
    page = await apiJson("api/log?" + params.toString());
  } catch (error) {
    if (number === searchNumber) {
      say(error.message, true);
    }
    return;
  }
  if (number !== searchNumber) {
    return;
  }
  const body = $("results").querySelector("tbody");
  if (!append) {
    body.replaceChildren();
  }
  for (const record of page.records) {
    const row = document.createElement("tr");
    row.dataset.id = record.id;
    cell(row, shortTime(record.time));
    cell(row, record.event, "event-" + record.event);
    cell(row, record.sender || "<>");
    cell(row, record.recipient);
    cell(row, record.upstream);
    cell(row, record.reply, "reply");
    cell(row, record.category);
    row.addEventListener("click", () => showMessage(record.id));
    body.appendChild(row);
  }
  nextOffset += page.records.length;
  $("more").hidden = nextOffset >= page.total;
  say(page.total === 1 ? "1 event" : page.total + " events, newest first");
}

async function showMessage(id) {
  $("detail").hidden = false;
  $("detail").dataset.id = id;
  $("detail-actions").hidden = true;
  $("detail-id").textContent = id;
  const body = $("detail-events").querySelector("tbody");
  body.replaceChildren();
  $("detail-queue").textContent = "";
  try {
    const params = new URLSearchParams({ id: id, order: "asc", limit: "1000" });
    const page = await apiJson("api/log?" + params.toString());
    for (const record of page.records) {
      const row = document.createElement("tr");
      cell(row, shortTime(record.time));
      cell(row, record.event, "event-" + record.event);
      cell(row, record.recipient);
      cell(row, record.upstream);
      cell(row, record.remote);
      cell(row, record.attempt || "");
      cell(row, record.tls);
      cell(row, record.reply, "reply");
      body.appendChild(row);
    }
    const queued = await api("api/queue/" + encodeURIComponent(id));
    if (queued.status === 404) {
      $("detail-queue").textContent = "Not in the queue: every recipient is finished.";
    } else if (!queued.ok) {
      $("detail-queue").textContent = (await queued.json()).error || queued.statusText;
    } else {
      const message = (await queued.json()).message;
      const states = message.recipients.map((r) => r.address + ": " + r.state).join(", ");
      $("detail-queue").textContent =
        "In the queue" + (message.held ? " (held)" : "") + ": " + states;
      $("detail-actions").hidden = false;
    }
  } catch (error) {
    $("detail-queue").textContent = error.message;
  }
  $("detail").scrollIntoView();
}

// Flush, hold, release or delete the message shown, then show it again.
async function queueAction(action) {
  const id = $("detail").dataset.id;
  if (action === "delete" && !confirm("Delete message " + id + " without delivering it?")) {
    return;
  }
  try {
    const response = await fetch("api/queue/" + encodeURIComponent(id) + "/" + action, {
      method: "POST",
      headers: headers(),
    });
    const body = await response.json();
    say(response.ok ? "Message " + id + " " + body.result + "." : body.error, !response.ok);
  } catch (error) {
    say(error.message, true);
  }
  refreshCounts();
  showMessage(id);
}

async function downloadCsv() {
  say("Preparing CSV…");
  try {
    const response = await api("api/log.csv?" + filters().toString());
    if (!response.ok) {
      throw new Error((await response.json()).error || response.statusText);
    }
    const blob = await response.blob();
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "tsubame-delivery-log.csv";
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 60000);
    say("CSV downloaded.");
  } catch (error) {
    say(error.message, true);
  }
}

async function refreshCounts() {
  try {
    const queue = await apiJson("api/summary");
    $("count-messages").textContent = queue.counts.messages;
    $("count-deferred").textContent = queue.counts.deferred;
    $("count-in-flight").textContent = queue.counts.in_flight;
    $("count-held").textContent = queue.counts.held_messages;
  } catch (error) {
    // The search line says what is wrong; the counts keep their last values.
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    search(false);
  });
  $("more").addEventListener("click", () => search(true));
  $("csv").addEventListener("click", downloadCsv);
  for (const button of $("detail-actions").querySelectorAll("button")) {
    button.addEventListener("click", () => queueAction(button.dataset.action));
  }
  $("detail-close").addEventListener("click", () => {
    $("detail").hidden = true;
  });
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    $("token-form").hidden = true;
    refreshCounts();
    search(false);
  });
  refreshCounts();
  setInterval(refreshCounts, COUNTS_REFRESH_MS);
  search(false);
});
