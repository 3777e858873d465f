// callgate agent widget. A client of the /v1 API: bearer token from sessionStorage only, the live
// stream read with fetch (the browser's built-in SSE client cannot send the Authorization header), every change rendered
// with textContent. A personal number goes only into a POST body; nothing here logs.
"use strict";

(() => {
  const TOKEN_KEY = "callgate.token";
  const STEPS = ["order_created", "awaiting_app", "confirming_call", "identifying"];
  const IDENTITY_FIELDS = ["name", "number_masked", "number", "pseudonym", "ref"];
  const HIDDEN_FIELDS = ["status", "reason", "method", "at"];

  const TEXT = {
    en: {
      title: "Caller verification",
      signout: "Forget token",
      token_label: "Agent token",
      connect: "Connect",
      token_hint: "The token is kept for this browser tab only.",
      calls: "Your calls",
      no_calls: "No calls right now.",
      verify: "Verify caller",
      cancel: "Cancel check",
      keypad: "Collect on keypad",
      typed: "I'll type the number",
      number_label: "Personal number",
      send: "Start check",
      order_created: "Order created",
      awaiting_app: "Waiting for the app",
      confirming_call: "Confirming the call",
      identifying: "Identifying",
      word_pair: "Read out to the caller:",
      live: "Live",
      connecting: "Connecting…",
      retrying: "Reconnecting…",
      unknown_token: "This token was not accepted.",
      no_answer: "callgate did not answer. Try again.",
      queue: "Queue",
      state_gate: "in the gate",
      state_waiting_for_agent: "waiting for an agent",
      state_talking: "talking",
      state_ended: "ended",
      since: "since",
      starting: "Starting the check…",
      keypad_wait: "The caller is typing their number on the keypad…",
      started: "Check started.",
      cancelling: "Cancelling…",
      verified: "Verified",
      not_verified: "Not verified",
      fraud: "Possible fraud: the person says they are NOT on a call with us. Someone may be calling in their name. Do not proceed.",
      field_name: "Name",
      field_number_masked: "Number",
      field_number: "Personal number",
      field_pseudonym: "Pseudonym",
      field_ref: "Reference",
      error_invalid_number: "That is not a valid personal number.",
      error_not_with_agent: "The call is not with you yet.",
      error_keypad_unavailable: "The keypad cannot be used on this call: type the number the caller tells you.",
      error_nothing_to_cancel: "There is no check to cancel.",
      error_call_ended: "The call has ended.",
      error_forbidden: "This call is not yours.",
      error_unavailable: "callgate cannot start checks right now.",
      error_call_unavailable: "The call did not answer. Try again.",
      error_instance_unavailable: "The callgate that handles this call cannot be reached right now. Try again shortly.",
      reason_user_cancelled: "cancelled in the app",
      reason_declined_call: "the person says they are not on a call with us",
      reason_expired: "the app was not opened in time",
      reason_timeout: "took too long",
      reason_invalid_number: "invalid number",
      reason_no_input: "no number typed",
      reason_too_many_attempts: "too many attempts",
      reason_agent_cancelled: "cancelled by the agent",
      reason_superseded: "replaced by a newer check",
      reason_caller_hung_up: "the caller hung up",
      reason_provider_unavailable: "BankID is unavailable",
      reason_identity_mismatch: "another person approved",
      reason_rate_limited: "too many checks, try again later",
      reason_provider_busy: "BankID is busy",
      limit_per_number: "for this number",
      limit_per_line: "from this phone line",
      limit_per_agent: "by you this hour",
      limit_per_queue: "in this queue right now",
      limit_cool_down: "the person recently said it was not them",
      limit_per_idp: "orders in flight at BankID",
      limit_concurrent: "orders in flight",
    },
    sv: {
      title: "Legitimering av uppringare",
      signout: "Glöm token",
      token_label: "Agenttoken",
      connect: "Anslut",
      token_hint: "Token sparas bara för den här fliken.",
      calls: "Dina samtal",
      no_calls: "Inga samtal just nu.",
      verify: "Legitimera uppringaren",
      cancel: "Avbryt kontrollen",
      keypad: "Knappa in på telefonen",
      typed: "Jag skriver numret",
      number_label: "Personnummer",
      send: "Starta kontrollen",
      order_created: "Order skapad",
      awaiting_app: "Väntar på appen",
      confirming_call: "Bekräftar samtalet",
      identifying: "Legitimerar",
      word_pair: "Läs upp för uppringaren:",
      live: "Ansluten",
      connecting: "Ansluter…",
      retrying: "Ansluter igen…",
      unknown_token: "Den här token godtogs inte.",
      no_answer: "callgate svarade inte. Försök igen.",
      queue: "Kö",
      state_gate: "i kontrollen",
      state_waiting_for_agent: "väntar på handläggare",
      state_talking: "i samtal",
      state_ended: "avslutat",
      since: "sedan",
      starting: "Startar kontrollen…",
      keypad_wait: "Uppringaren knappar in sitt nummer…",
      started: "Kontrollen har startat.",
      cancelling: "Avbryter…",
      verified: "Legitimerad",
      not_verified: "Inte legitimerad",
      fraud: "Möjligt bedrägeri: personen säger att hen INTE är i samtal med oss. Någon kan ringa i hens namn. Gå inte vidare.",
      field_name: "Namn",
      field_number_masked: "Nummer",
      field_number: "Personnummer",
      field_pseudonym: "Pseudonym",
      field_ref: "Referens",
      error_invalid_number: "Det är inte ett giltigt personnummer.",
      error_not_with_agent: "Samtalet är inte kopplat till dig än.",
      error_keypad_unavailable: "Knappsatsen kan inte användas i det här samtalet: skriv in numret som den som ringer säger.",
      error_nothing_to_cancel: "Det finns ingen kontroll att avbryta.",
      error_call_ended: "Samtalet har avslutats.",
      error_forbidden: "Det här samtalet är inte ditt.",
      error_unavailable: "callgate kan inte starta kontroller just nu.",
      error_call_unavailable: "Samtalet svarade inte. Försök igen.",
      error_instance_unavailable: "Den callgate som hanterar samtalet kan inte nås just nu. Försök igen om en stund.",
      reason_user_cancelled: "avbruten i appen",
      reason_declined_call: "personen säger att hen inte är i samtal med oss",
      reason_expired: "appen öppnades inte i tid",
      reason_timeout: "tog för lång tid",
      reason_invalid_number: "ogiltigt nummer",
      reason_no_input: "inget nummer inknappat",
      reason_too_many_attempts: "för många försök",
      reason_agent_cancelled: "avbruten av handläggaren",
      reason_superseded: "ersatt av en nyare kontroll",
      reason_caller_hung_up: "uppringaren lade på",
      reason_provider_unavailable: "BankID är inte tillgängligt",
      reason_identity_mismatch: "en annan person godkände",
      reason_rate_limited: "för många kontroller, försök igen senare",
      reason_provider_busy: "BankID är upptaget",
      limit_per_number: "för det här numret",
      limit_per_line: "från den här telefonlinjen",
      limit_per_agent: "av dig den här timmen",
      limit_per_queue: "i den här kön just nu",
      limit_cool_down: "personen sa nyss att det inte var hen",
      limit_per_idp: "pågående beställningar hos BankID",
      limit_concurrent: "pågående beställningar",
    },
  };

  // The browser's first language decides: sv, sv-SE, sv-FI → Swedish; anything else → English.
  const preferred = (navigator.languages && navigator.languages[0]) || navigator.language || "en";
  const lang = /^sv(-|$)/i.test(preferred) ? "sv" : "en";
  const t = (key) => TEXT[lang][key] ?? TEXT.en[key] ?? key;

  const $ = (id) => document.getElementById(id);
  const api = (path) => new URL(path, document.baseURI).toString();

  const calls = new Map(); // call id → call (as the API renders it)
  const cards = new Map(); // call id → card element
  let pending = null; // snapshots being collected, replacing `calls` on snapshot_complete
  let stream = null; // AbortController of the open stream
  let backoff = 1000;

  function translate(root) {
    for (const el of root.querySelectorAll("[data-i18n]")) {
      el.textContent = t(el.dataset.i18n);
    }
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function headers(extra) {
    return Object.assign({ Authorization: "Bearer " + token() }, extra || {});
  }

  function connection(state) {
    const el = $("connection");
    el.dataset.state = state;
    el.textContent = state === "off" ? "" : t(state);
  }

  // ---- token ----

  function showLogin(message) {
    if (stream) stream.abort();
    stream = null;
    calls.clear();
    render();
    connection("off");
    $("calls").hidden = true;
    $("signout").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("token").focus();
  }

  function showCalls() {
    $("login").hidden = true;
    $("login-error").textContent = "";
    $("calls").hidden = false;
    $("signout").hidden = false;
  }

  async function login(event) {
    event.preventDefault();
    const field = $("token");
    const value = field.value.trim();
    field.value = "";
    if (!value) return;
    let response;
    try {
      response = await fetch(api("v1/calls"), { headers: { Authorization: "Bearer " + value }, cache: "no-store" });
    } catch (_) {
      showLogin(t("no_answer"));
      return;
    }
    if (response.status === 401 || response.status === 403) {
      showLogin(t("unknown_token"));
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, value);
    showCalls();
    listen();
  }

  function signOut() {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("");
  }

  // ---- the live stream ----

  async function listen() {
    if (stream) stream.abort();
    const controller = new AbortController();
    stream = controller;
    connection("connecting");
    let response;
    try {
      response = await fetch(api("v1/events"), {
        headers: headers({ Accept: "text/event-stream" }),
        cache: "no-store",
        signal: controller.signal,
      });
    } catch (_) {
      retry(controller);
      return;
    }
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(t("unknown_token"));
      return;
    }
    if (!response.ok || !response.body) {
      retry(controller);
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          dispatch(block);
        }
      }
    } catch (_) {
      // Aborted or cut: retried below unless we stopped it.
    }
    retry(controller);
  }

  function retry(controller) {
    if (stream !== controller || controller.signal.aborted) return;
    connection("retrying");
    const wait = backoff;
    backoff = Math.min(backoff * 2, 15000);
    setTimeout(() => {
      if (stream === controller && token()) listen();
    }, wait);
  }

  // One SSE block: `event:` and `data:` lines; comments (`:`) are keep-alives.
  function dispatch(block) {
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length) return;
    let body;
    try {
      body = JSON.parse(data.join("\n"));
    } catch (_) {
      return;
    }
    handle(name, body);
  }

  function handle(name, body) {
    switch (name) {
      case "snapshot":
        if (!pending) pending = new Map();
        pending.set(body.call_id, body);
        return;
      case "snapshot_complete":
        calls.clear();
        for (const [id, call] of pending || []) calls.set(id, call);
        pending = null;
        backoff = 1000;
        connection("live");
        break;
      case "call_ended":
        calls.delete(body.call_id);
        break;
      default:
        if (body && body.call_id) calls.set(body.call_id, body);
    }
    render();
  }

  // ---- rendering ----

  function render() {
    const list = $("list");
    for (const [id, card] of cards) {
      if (!calls.has(id)) {
        card.remove();
        cards.delete(id);
      }
    }
    for (const [id, call] of calls) {
      let card = cards.get(id);
      if (!card) {
        card = newCard(id);
        cards.set(id, card);
        list.appendChild(card);
      }
      update(card, call);
    }
    $("no-calls").hidden = calls.size > 0;
  }

  function part(card, name) {
    return card.querySelector('[data-test="' + name + '"]');
  }

  function newCard(id) {
    const card = $("call-template").content.firstElementChild.cloneNode(true);
    translate(card);
    card.dataset.callId = id;
    const choices = part(card, "choices");
    const form = part(card, "typed-form");
    const verify = part(card, "verify");
    verify.addEventListener("click", () => {
      const open = choices.hidden;
      choices.hidden = !open;
      form.hidden = true;
      verify.setAttribute("aria-expanded", String(open));
      if (open) {
        const keypad = part(card, "verify-keypad");
        (keypad.hidden ? part(card, "verify-typed") : keypad).focus();
      }
    });
    part(card, "verify-keypad").addEventListener("click", () => {
      closeChoices(card);
      start(card, { collect: "keypad" });
    });
    part(card, "verify-typed").addEventListener("click", () => {
      form.hidden = false;
      part(card, "number").focus();
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const field = part(card, "number");
      const number = field.value.trim();
      field.value = "";
      if (!number) return;
      closeChoices(card);
      start(card, { number });
    });
    card.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && !choices.hidden) {
        closeChoices(card);
        verify.focus();
      }
    });
    part(card, "cancel").addEventListener("click", () => cancel(card));
    return card;
  }

  function closeChoices(card) {
    part(card, "choices").hidden = true;
    const form = part(card, "typed-form");
    form.hidden = true;
    part(card, "number").value = "";
    part(card, "verify").setAttribute("aria-expanded", "false");
  }

  function time(iso) {
    const d = new Date(iso);
    return isNaN(d) ? "" : d.toLocaleTimeString(lang === "sv" ? "sv-SE" : "en-GB", { hour: "2-digit", minute: "2-digit" });
  }

  function update(card, call) {
    const title = [t("queue") + " " + call.queue, t("state_" + call.state)];
    const since = time(call.started_at);
    if (since) title.push(t("since") + " " + since);
    part(card, "call-title").textContent = title.join(" · ");
    card.dataset.state = call.state;
    part(card, "verify").disabled = !call.can_verify;
    // A hosted switchboard's call: callgate does not hear its keypad, the agent types the number.
    part(card, "verify-keypad").hidden = call.keypad === false;

    const v = call.verification;
    const inProgress = !!v && v.status === "in_progress";
    card.dataset.verification = v ? v.verification_id : "";
    card.dataset.status = v ? v.status : "";
    part(card, "cancel").hidden = !inProgress;

    // The steps: every step up to the furthest one reached is lit.
    const reached = v ? Math.max(-1, ...(v.stages || []).map((s) => STEPS.indexOf(s.stage))) : -1;
    for (const li of part(card, "steps").children) {
      const i = STEPS.indexOf(li.dataset.step);
      li.dataset.state = i < reached || (i === reached && !inProgress) ? "done" : i === reached ? "active" : "pending";
      if (li.dataset.state === "active") li.setAttribute("aria-current", "step");
      else li.removeAttribute("aria-current");
    }

    let heading = "";
    if (v && !inProgress) {
      heading = v.status === "verified" ? t("verified") : t("not_verified");
      if (v.status !== "verified" && v.reason) heading += ": " + reasonText(v.reason);
      if (v.limit) heading += " (" + (TEXT[lang]["limit_" + v.limit] || v.limit.replace(/_/g, " ")) + ")";
    }
    let line = heading;
    if (inProgress) {
      if (reached >= 0) line = t(STEPS[reached]) + "…";
      else line = v.method === "keypad" ? t("keypad_wait") : t("starting");
    }
    const status = part(card, "status-line");
    if (status.textContent !== line) status.textContent = line;
    // Once the outcome box shows the result, the line only speaks it (screen readers).
    status.classList.toggle("visually-hidden", !!v && !inProgress);

    // A word pair to read out, when the provider gives one.
    const pair = part(card, "word-pair");
    const words = v && typeof v.word_pair === "string" ? v.word_pair : "";
    pair.hidden = !words;
    pair.querySelector("strong").textContent = words;

    // The fraud warning.
    const fraud = part(card, "fraud");
    const isFraud = !!v && v.fraud === true;
    if (isFraud && fraud.hidden) fraud.textContent = t("fraud");
    fraud.hidden = !isFraud;

    // The outcome, with the disclosed fields only.
    const outcome = part(card, "outcome");
    if (!v || inProgress) {
      outcome.hidden = true;
      outcome.removeAttribute("data-status");
      return;
    }
    const key = v.verification_id + ":" + v.status;
    if (outcome.dataset.key === key && !outcome.hidden) return;
    outcome.dataset.key = key;
    outcome.dataset.status = v.status;
    outcome.querySelector(".outcome-title").textContent = heading;
    const dl = outcome.querySelector("dl");
    dl.replaceChildren();
    const fields = v.fields || {};
    const keys = IDENTITY_FIELDS.filter((k) => k in fields).concat(
      Object.keys(fields).filter((k) => !IDENTITY_FIELDS.includes(k) && !HIDDEN_FIELDS.includes(k)),
    );
    for (const k of keys) {
      if (!fields[k]) continue;
      const dt = document.createElement("dt");
      dt.textContent = TEXT[lang]["field_" + k] || k;
      const dd = document.createElement("dd");
      dd.dataset.field = k;
      dd.textContent = fields[k];
      dl.append(dt, dd);
    }
    outcome.hidden = false;
  }

  function reasonText(reason) {
    return TEXT[lang]["reason_" + reason] || TEXT.en["reason_" + reason] || reason.replace(/_/g, " ");
  }

  // ---- actions ----

  async function problem(response) {
    try {
      const body = await response.json();
      const own = TEXT[lang]["error_" + body.error];
      return own || body.reason || String(response.status);
    } catch (_) {
      return String(response.status);
    }
  }

  async function start(card, body) {
    const id = card.dataset.callId;
    const error = part(card, "error");
    error.textContent = "";
    part(card, "status-line").textContent = t("starting");
    let response;
    try {
      response = await fetch(api("v1/calls/" + encodeURIComponent(id) + "/verifications"), {
        method: "POST",
        headers: headers({ "Content-Type": "application/json" }),
        body: JSON.stringify(body),
        cache: "no-store",
      });
    } catch (_) {
      error.textContent = t("no_answer");
      return;
    }
    if (response.status === 401) return showLogin(t("unknown_token"));
    if (!response.ok) error.textContent = await problem(response);
    part(card, "verify").focus();
  }

  async function cancel(card) {
    const id = card.dataset.callId;
    const error = part(card, "error");
    error.textContent = "";
    part(card, "status-line").textContent = t("cancelling");
    let response;
    try {
      response = await fetch(api("v1/calls/" + encodeURIComponent(id) + "/verification"), {
        method: "DELETE",
        headers: headers(),
        cache: "no-store",
      });
    } catch (_) {
      error.textContent = t("no_answer");
      return;
    }
    if (response.status === 401) return showLogin(t("unknown_token"));
    if (!response.ok) error.textContent = await problem(response);
    part(card, "verify").focus();
  }

  // ---- start ----

  document.addEventListener("DOMContentLoaded", () => {
    document.documentElement.lang = lang;
    translate(document);
    document.title = t("title");
    $("login").addEventListener("submit", login);
    $("signout").addEventListener("click", signOut);
    if (token()) {
      showCalls();
      listen();
    } else {
      showLogin("");
    }
  });
})();
