// The corpus page: drag-and-drop or picked files are uploaded one request each (with a
// progress bar), then the documents table is refreshed every second while any document
// is still being ingested. Deleting asks for confirmation first.
(function () {
  "use strict";
  const cfg = window.RAG;
  const csrf = (document.cookie.match(/(?:^|; )csrftoken=([^;]+)/) || [])[1] || "";
  const tbody = document.querySelector("#documents tbody");
  const pending = new Set(["queued", "extracting", "embedding"]);
  let polling = null;

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function row(doc) {
    const tr = el("tr", { "data-id": doc.id, "data-status": doc.status });
    tr.appendChild(el("td", { class: "name" }, doc.name));
    const status = el("td", { class: "status" }, doc.status);
    if (doc.error) status.appendChild(el("div", { class: "error" }, doc.error));
    tr.appendChild(status);
    const cell = el("td");
    const bar = el("progress", { max: "100", value: String(doc.progress) }, doc.progress + "%");
    cell.appendChild(bar);
    tr.appendChild(cell);
    tr.appendChild(el("td", { class: "chunks" }, doc.chunks_embedded + " / " + doc.chunk_count));
    tr.appendChild(el("td", {}, (doc.size / 1024).toFixed(1) + " KB"));
    if (cfg.canEdit) {
      const td = el("td");
      const form = el("form", { method: "post", class: "delete", action: cfg.deleteUrlTemplate.replace("FILE_ID", doc.id) });
      form.appendChild(el("input", { type: "hidden", name: "csrfmiddlewaretoken", value: csrf }));
      form.appendChild(el("button", { type: "submit", "aria-label": "Delete " + doc.name }, "Delete"));
      td.appendChild(form);
      tr.appendChild(td);
    }
    return tr;
  }

  async function refresh() {
    const resp = await fetch(cfg.documentsUrl, { headers: { Accept: "application/json" } });
    if (!resp.ok) return;
    const docs = (await resp.json()).data;
    tbody.replaceChildren(...(docs.length ? docs.map(row) : [emptyRow()]));
    if (docs.some((d) => pending.has(d.status))) schedule();
  }

  function emptyRow() {
    const tr = el("tr", { class: "empty" });
    tr.appendChild(el("td", { colspan: "6" }, "No documents yet."));
    return tr;
  }

  function schedule() {
    clearTimeout(polling);
    polling = setTimeout(refresh, 1000);
  }

  function upload(file) {
    const item = el("li");
    const label = el("span", {}, file.name + " ");
    const bar = el("progress", { max: "100", value: "0", "aria-label": "Uploading " + file.name });
    const note = el("span", { class: "note" });
    item.append(label, bar, note);
    document.getElementById("uploads").appendChild(item);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", cfg.uploadUrl);
    xhr.setRequestHeader("X-CSRFToken", csrf);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = Math.round((100 * e.loaded) / e.total); };
    xhr.onload = () => {
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) {
        bar.value = 100;
        note.textContent = body.created ? " uploaded" : " already in this corpus";
        refresh();
      } else {
        note.textContent = " " + (body.error || "upload failed (" + xhr.status + ")");
        note.className = "note error";
        note.setAttribute("role", "alert");
      }
    };
    xhr.onerror = () => { note.textContent = " upload failed"; note.className = "note error"; };
    const data = new FormData();
    data.append("file", file);
    xhr.send(data);
  }

  if (cfg.canEdit) {
    const zone = document.getElementById("dropzone");
    const input = document.getElementById("file-input");
    ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => { e.preventDefault(); zone.classList.add("over"); }));
    ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, () => zone.classList.remove("over")));
    zone.addEventListener("drop", (e) => { e.preventDefault(); Array.from(e.dataTransfer.files).forEach(upload); });
    zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
    input.addEventListener("change", () => { Array.from(input.files).forEach(upload); input.value = ""; });
    document.addEventListener("submit", (e) => {
      const form = e.target;
      if (!form.classList.contains("delete")) return;
      const name = form.closest("tr").querySelector(".name").textContent;
      if (!window.confirm("Delete " + name + " and its chunks?")) e.preventDefault();
    });
  }
  if (Array.from(tbody.querySelectorAll("tr[data-status]")).some((r) => pending.has(r.dataset.status))) schedule();
})();
