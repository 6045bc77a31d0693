// Attachments on the page (contract §11): the uploads of the next message
// (AttachmentTray: a button, paste and drop add files; each uploads at once
// to POST /api/attachments with its progress, then shows as a preview with a
// remove button) and a sent message's attachments in the conversation
// (renderAttachments: images drawn, other files as chips that download).
// Plain ES module, no build step. Names and messages go in with textContent.

/** "1.2 MB", "340 KB", "12 B" */
export function formatSize(bytes) {
  const n = Number(bytes) || 0;
  if (n >= 1024 * 1024) return `${(n / (1024 * 1024)).toFixed(1).replace(/\.0$/, "")} MB`;
  if (n >= 1024) return `${Math.round(n / 1024)} KB`;
  return `${n} B`;
}

/** A short label for a file that is not drawn: "PDF", "CSV", "MD", "TXT" or "FILE". */
function fileLabel(type, name) {
  if (type === "application/pdf") return "PDF";
  const extension = /\.([A-Za-z0-9]{1,4})$/.exec(name || "");
  if (extension) return extension[1].toUpperCase();
  return type.startsWith("text/") ? "TXT" : "FILE";
}

const isImageType = (type) => /^image\/(png|jpeg|gif|webp)$/.test(type || "");

/** What a refused upload says: the kind of refusal, then the server's message. */
function describeUploadError(status, error, maxMb) {
  const message = (error && error.message) || "";
  if (status === 413) return `Too big: ${message || `over ${maxMb} MB`}`;
  if (status === 415) return `Not a supported type: ${message || "images (PNG, JPEG, GIF, WebP), PDF, or UTF-8 text, Markdown, CSV"}`;
  if (status === 400 && error && error.code === "invalid_attachment") return `Could not read this file: ${message}`;
  if (status === 0) return "Upload failed: the server cannot be reached.";
  if (status === 401) return "Upload refused: you are no longer logged in.";
  return `Upload failed: ${message || `HTTP ${status}`}`;
}

/**
 * POST one file to /api/attachments with XMLHttpRequest (for its upload
 * progress events). Resolves with the 201 answer; rejects with
 * {status, error: {code, message}}.
 */
export function uploadFile(file, { url, csrfToken = "", resourceId = null, onProgress = null, onXhr = null }) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    xhr.withCredentials = true;
    xhr.setRequestHeader("Accept", "application/json");
    if (csrfToken) xhr.setRequestHeader("X-CSRFToken", csrfToken);
    xhr.responseType = "text";
    if (onProgress) {
      xhr.upload.addEventListener("progress", (e) => {
        if (e.lengthComputable) onProgress(e.loaded, e.total);
      });
    }
    xhr.addEventListener("load", () => {
      let data = null;
      try {
        data = JSON.parse(xhr.responseText);
      } catch (err) {
        data = null;
      }
      if (xhr.status === 201 && data && typeof data.attachmentId === "string") resolve(data);
      else reject({ status: xhr.status, error: (data && data.error) || null });
    });
    xhr.addEventListener("error", () => reject({ status: 0, error: null }));
    xhr.addEventListener("abort", () => reject({ status: -1, error: null, aborted: true }));
    const form = new FormData();
    if (resourceId) form.append("resourceId", resourceId);
    form.append("file", file, file.name || "pasted");
    if (onXhr) onXhr(xhr);
    xhr.send(form);
  });
}

/** The URL of a stored attachment (GET /api/attachments/<id>), scoped to the page's resource. */
export function attachmentUrl(base, attachmentId, resourceId = null) {
  const url = `${base}/attachments/${encodeURIComponent(attachmentId)}`;
  return resourceId ? `${url}?${new URLSearchParams({ resourceId })}` : url;
}

let counter = 0;

/**
 * The next message's attachments, drawn into a <ul>. Each item: {key, file,
 * name, size, type, status: "uploading"|"ready"|"error", loaded, attachment
 * (the 201 answer), error, preview (an object URL for an image)}.
 * Dispatches "change" whenever the set or a status changes.
 */
export class AttachmentTray extends EventTarget {
  constructor(list, { apiBase, csrfToken, resourceId, max = 20, maxMb = 20, onUnauthenticated = null,
    fallbackFocus = null }) {
    super();
    this.list = list;
    this.apiBase = apiBase;
    this.csrfToken = csrfToken;
    this.resourceId = resourceId; // () => resource id or null
    this.max = max;
    this.maxMb = maxMb;
    this.onUnauthenticated = onUnauthenticated;
    this.fallbackFocus = fallbackFocus; // focused when the last remove button goes
    this.items = [];
  }

  get uploading() {
    return this.items.some((item) => item.status === "uploading");
  }

  /** The uploaded attachments, in the order they were added. */
  get ready() {
    return this.items.filter((item) => item.status === "ready").map((item) => item.attachment);
  }

  changed() {
    this.draw();
    this.dispatchEvent(new CustomEvent("change"));
  }

  /** Add files (from the picker, a paste or a drop): each starts uploading at once. */
  add(files) {
    for (const file of files) {
      const item = {
        key: `a${++counter}`, file, name: file.name || "pasted file", size: file.size,
        type: file.type || "", status: "uploading", loaded: 0, attachment: null, error: null,
        preview: null, xhr: null,
      };
      if (isImageType(item.type)) item.preview = URL.createObjectURL(file);
      this.items.push(item);
      if (this.items.filter((i) => i.status !== "error").length > this.max) {
        item.status = "error";
        item.error = `Not attached: at most ${this.max} files in a message.`;
        continue;
      }
      this.upload(item);
    }
    this.changed();
  }

  async upload(item) {
    try {
      const data = await uploadFile(item.file, {
        url: `${this.apiBase}/attachments`, csrfToken: this.csrfToken, resourceId: this.resourceId(),
        onXhr: (xhr) => { item.xhr = xhr; },
        onProgress: (loaded, total) => {
          item.loaded = loaded;
          item.size = total || item.size;
          this.drawProgress(item);
        },
      });
      if (!this.items.includes(item)) return; // removed meanwhile
      Object.assign(item, { status: "ready", attachment: data, name: data.name || item.name, xhr: null });
    } catch (failure) {
      if (failure.aborted || !this.items.includes(item)) return;
      if (failure.status === 401 && this.onUnauthenticated) this.onUnauthenticated();
      // A server that refuses a body over its limit may close the connection
      // before it is sent whole: the browser then reports no answer at all.
      const status = failure.status === 0 && item.size > this.maxMb * 1024 * 1024 ? 413 : failure.status;
      Object.assign(item, { status: "error", xhr: null,
        error: describeUploadError(status, failure.error, this.maxMb) });
    }
    this.changed();
  }

  remove(key) {
    const index = this.items.findIndex((item) => item.key === key);
    if (index < 0) return;
    const [item] = this.items.splice(index, 1);
    if (item.xhr) item.xhr.abort();
    if (item.preview) URL.revokeObjectURL(item.preview);
    this.changed();
  }

  /** Empty the tray (the message was sent). */
  clear() {
    for (const item of this.items) {
      if (item.xhr) item.xhr.abort();
      if (item.preview) URL.revokeObjectURL(item.preview);
    }
    this.items = [];
    this.changed();
  }

  drawProgress(item) {
    const bar = this.list.querySelector(`[data-key="${item.key}"] progress`);
    if (bar) {
      bar.max = item.size || 1;
      bar.value = item.loaded;
    }
  }

  draw() {
    // Keep the focus on the tray when the removed item's button had it.
    const focusedKey = this.list.contains(document.activeElement)
      ? document.activeElement.closest("[data-key]")?.dataset.key : null;
    const nodes = this.items.map((item) => this.drawItem(item));
    this.list.replaceChildren(...nodes);
    this.list.hidden = nodes.length === 0;
    if (focusedKey !== null && focusedKey !== undefined) {
      const same = this.list.querySelector(`[data-key="${focusedKey}"] .attachment-remove`);
      const next = same || this.list.querySelector(".attachment-remove");
      if (next) next.focus();
      else if (this.fallbackFocus) this.fallbackFocus.focus();
    }
  }

  drawItem(item) {
    const li = document.createElement("li");
    li.className = "attachment-item";
    li.dataset.key = item.key;
    li.dataset.status = item.status;
    if (item.attachment) li.dataset.attachmentId = item.attachment.attachmentId;
    if (item.preview) {
      const img = document.createElement("img");
      img.className = "attachment-thumb";
      img.src = item.preview;
      img.alt = "";
      li.append(img);
    } else {
      const icon = document.createElement("span");
      icon.className = "attachment-icon";
      icon.setAttribute("aria-hidden", "true");
      icon.textContent = fileLabel(item.type, item.name);
      li.append(icon);
    }
    const info = document.createElement("span");
    info.className = "attachment-info";
    const name = document.createElement("span");
    name.className = "attachment-name";
    name.textContent = item.name;
    name.title = item.name;
    const meta = document.createElement("span");
    meta.className = "attachment-meta";
    meta.textContent = item.status === "ready"
      ? [item.attachment.mediaType, formatSize(item.attachment.size)].join(", ")
      : formatSize(item.size);
    info.append(name, meta);
    if (item.status === "uploading") {
      const bar = document.createElement("progress");
      bar.className = "attachment-progress";
      bar.max = item.size || 1;
      bar.value = item.loaded;
      bar.setAttribute("aria-label", `Uploading ${item.name}`);
      info.append(bar);
    } else if (item.status === "error") {
      const error = document.createElement("span");
      error.className = "attachment-error";
      error.setAttribute("role", "alert");
      error.textContent = item.error;
      info.append(error);
    }
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "attachment-remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove ${item.name}`);
    remove.title = `Remove ${item.name}`;
    remove.addEventListener("click", () => this.remove(item.key));
    li.append(info, remove);
    return li;
  }
}

/**
 * A sent message's attachments ([{attachmentId, name, mediaType, size}]) as
 * a block of DOM nodes: each image drawn (a click opens it full size, via
 * `openImage(url, name)`), each other file a named chip that downloads.
 */
export function renderAttachments(attachments, { apiBase, resourceId = null, openImage = null }) {
  const box = document.createElement("div");
  box.className = "message-attachments";
  for (const att of attachments) {
    if (!att || typeof att !== "object") continue;
    if (typeof att.attachmentId !== "string") {
      // An upload deleted since: the message still names what it carried.
      const gone = document.createElement("span");
      gone.className = "message-file gone";
      const label = document.createElement("span");
      label.className = "attachment-name";
      label.textContent = String(att.name || "attachment");
      const meta = document.createElement("span");
      meta.className = "attachment-meta";
      meta.textContent = [att.mediaType, formatSize(att.size), "no longer stored"].filter(Boolean).join(", ");
      gone.append(label, meta);
      box.append(gone);
      continue;
    }
    const url = attachmentUrl(apiBase, att.attachmentId, resourceId);
    const name = String(att.name || att.attachmentId);
    const link = document.createElement("a");
    link.href = url;
    link.dataset.attachmentId = att.attachmentId;
    if (isImageType(att.mediaType)) {
      link.className = "message-image";
      link.target = "_blank";
      link.rel = "noopener";
      link.title = `${name} (open full size)`;
      link.setAttribute("aria-label", `Open the image ${name} full size`);
      const img = document.createElement("img");
      img.src = url;
      img.alt = name;
      img.loading = "lazy";
      link.append(img);
      if (openImage) {
        link.addEventListener("click", (e) => {
          if (e.button !== 0 || e.ctrlKey || e.metaKey || e.shiftKey || e.altKey) return; // a new tab
          e.preventDefault();
          openImage(url, name);
        });
      }
    } else {
      link.className = "message-file";
      link.download = name;
      link.title = `Download ${name}`;
      const label = document.createElement("span");
      label.className = "attachment-name";
      label.textContent = name;
      const meta = document.createElement("span");
      meta.className = "attachment-meta";
      meta.textContent = [att.mediaType, formatSize(att.size)].filter(Boolean).join(", ");
      link.append(label, meta);
    }
    box.append(link);
  }
  return box;
}
