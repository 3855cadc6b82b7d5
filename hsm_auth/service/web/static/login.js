// hsm-auth reference login page: the only script. While a push or QR-claim login waits,
// it long-polls the same-origin /login/status and updates the page in place (no reload).
// Served from 'self' (CSP script-src 'self'); it builds DOM with textContent only.
"use strict";

(function () {
  // The browser's time zone goes with a push or QR request: the authenticator shows it.
  let zone = "";
  try {
    zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "";
  } catch (e) {
    zone = "";
  }
  for (const input of document.querySelectorAll("input.time-zone")) {
    input.value = zone;
  }

  const live = document.getElementById("live");
  if (!live) {
    return;
  }
  const status = document.getElementById("status");
  const url = live.dataset.status;
  const words = {
    pending: "Waiting for your device\u2026",
    claimed: "Your authenticator has the request: approve it there.",
    rejected: "The login was rejected on your device.",
    expired: "The request expired before it was answered.",
    error: "The login could not be completed."
  };

  function sleep(ms) {
    return new Promise(function (resolve) { setTimeout(resolve, ms); });
  }

  function show(state, text) {
    live.dataset.state = state;
    status.textContent = text || words[state] || state;
  }

  function loggedIn(user, csrf) {
    const main = document.getElementById("page");
    const heading = main.querySelector("h1");
    heading.textContent = "Logged in";
    document.title = "Logged in";
    for (const node of Array.from(main.children)) {
      if (node !== heading) {
        node.remove();
      }
    }
    const p = document.createElement("p");
    p.id = "result";
    p.className = "ok";
    p.dataset.user = user;
    p.append("Logged in as ");
    const strong = document.createElement("strong");
    strong.textContent = user;
    p.append(strong, ".");
    const form = document.createElement("form");
    form.method = "post";
    form.action = "/login/logout";
    form.id = "logout-form";
    const token = document.createElement("input");
    token.type = "hidden";
    token.name = "csrf";
    token.value = csrf;
    const button = document.createElement("button");
    button.type = "submit";
    button.id = "logout";
    button.className = "secondary";
    button.textContent = "Log out";
    form.append(token, button);
    main.append(p, form);
    main.dataset.page = "done";
  }

  async function poll() {
    let failures = 0;
    for (;;) {
      let response;
      let answer;
      const asked = Date.now();
      try {
        response = await fetch(url + "?wait=20", {
          credentials: "same-origin",
          cache: "no-store",
          headers: { "Accept": "application/json" }
        });
        answer = await response.json();
      } catch (e) {
        failures += 1;
        if (failures > 5) {
          show("error");
          return;
        }
        await sleep(1000 * failures);
        continue;
      }
      failures = 0;
      if (response.status === 429) {
        const after = parseInt(response.headers.get("Retry-After") || "1", 10);
        await sleep(1000 * Math.min(Math.max(after, 1), 30));
        continue;
      }
      if (!response.ok) {
        show("error", answer && answer.title ? answer.title : words.error);
        return;
      }
      if (answer.state === "approved") {
        loggedIn(answer.user, answer.csrf);
        return;
      }
      show(answer.state);
      if (answer.state !== "pending" && answer.state !== "claimed") {
        return;
      }
      if (Date.now() - asked < 1000) {
        await sleep(1000); // a long-poll that came back at once: never a tight loop
      }
    }
  }

  poll();
})();
