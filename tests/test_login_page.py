"""The reference login page (hsm_auth.service.login_page) in a real headless Chromium
against a real uvicorn service (hsm-auth serve), with a real authenticator: SoftHSM
for the offline code, the soft FIDO2 authenticator (user verification) for push and
QR-claim approvals. Push approvals go through a real ``hsm-auth agent`` (its long-poll
receives the challenge, ``hsm-auth approve ID`` / ``reject ID`` answer); the QR claim
through the authenticator's OnlineClient.

Screenshots of each step: $HSM_AUTH_SCREENSHOTS or tests/artifacts/screenshots/<test>/
(printed at the end of each browser test)."""

from __future__ import annotations

import base64
import contextlib
import html.parser
import json
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from _browser import browser  # noqa: F401

from hsm_auth import config as configmod
from hsm_auth import qr as hsm_qr
from hsm_auth.authenticator import Authenticator
from hsm_auth.challenges import ChallengeState, Decision
from hsm_auth.config import Config, MethodConfig, Paths
from hsm_auth.methods import Method
from hsm_auth.online_client import OnlineClient
from hsm_auth.testing.agent import RunningAgent, running_agent
from hsm_auth.testing.fido2 import authenticator_factory, write_soft_policy
from hsm_auth.testing.service import RunningService, running_service
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.uri import Pkcs11Uri
from hsm_auth.verifier import Verifier

pytestmark = [pytest.mark.softhsm, pytest.mark.fido2, pytest.mark.slow]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture
def fido2_device(tmp_path):
    return authenticator_factory(tmp_path)()


@pytest.fixture
def authenticator(softhsm_env, tmp_path, fido2_device):
    """alice's: device (SoftHSM) for the offline code, biometric (soft FIDO2, user
    verification on every assertion) for approvals."""
    token = init_token(unique_label("web"), so_pin="12345678", user_pin="device-secret")
    pin_file = tmp_path / "device.pin"
    pin_file.write_text(token.user_pin)
    pin_file.chmod(0o600)
    uri = Pkcs11Uri(token=token.label, module_path=token.module_path,
                    pin_source=f"file:{pin_file}")
    config = Config(methods={
        Method.DEVICE: MethodConfig("pkcs11", {"uri": str(uri)}),
        Method.BIOMETRIC: MethodConfig("fido2", {
            "device": f"soft:{fido2_device.path}", "state_dir": str(tmp_path / "fido2-state"),
            "prompts": False, "allow_software_authenticator": True,
        }),
    })
    with Authenticator(tmp_path / "auth", config) as a:
        yield a


@pytest.fixture
def verifier_dir(tmp_path, authenticator, fido2_device):
    directory = tmp_path / "verifier"
    write_soft_policy(directory, [fido2_device])
    with Verifier.init(directory, "Example Site") as v:
        offer = v.create_offer("alice", methods=[Method.DEVICE])
        v.accept_enrollment(authenticator.add_or_update(
            Method.DEVICE, offer.text, activation_code=offer.activation_code))
    return directory


@pytest.fixture
def running(verifier_dir):
    """A real ``hsm-auth serve`` (uvicorn in a subprocess) on the verifier."""
    with running_service(verifier_dir) as svc:
        yield svc


@pytest.fixture
def service(running):
    return running.url


@dataclass
class Site:
    url: str
    running: RunningService
    client: OnlineClient  # alice's authenticator, online


@pytest.fixture
def site(running, verifier_dir, authenticator):
    """The service with alice's biometric method enrolled online as well (the
    authenticator keeps the approval policy the enrollment result states)."""
    with contextlib.closing(Verifier.open(verifier_dir)) as v:
        offer = v.create_offer("alice", methods=[Method.BIOMETRIC])
    client = OnlineClient(authenticator, running.url)
    client.enroll(authenticator.add_or_update(
        Method.BIOMETRIC, offer.text, activation_code=offer.activation_code))
    yield Site(running.url, running, client)
    assert "Traceback" not in running.log()


# --- helpers ---------------------------------------------------------------------------


def _wait(driver, predicate, timeout: float = 20.0):
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        TimeoutException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException)
    try:
        return WebDriverWait(driver, timeout, ignored_exceptions=ignored).until(predicate)
    except TimeoutException:
        raise AssertionError(f"the page did not get there: {driver.page_source[:3000]}") from None


def _by(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def _start(browser, service: str, flow: str, user: str = "alice") -> None:
    d = browser.driver
    d.get(service + "/login")
    _by(d, "#user").send_keys(user)
    browser.shot("user-name")
    _by(d, f"#{flow}").click()


def _otp_for(authenticator: Authenticator, text: str) -> str:
    request = authenticator.start_offline_authentication(text)
    return authenticator.finish_offline_authentication(request, Method.DEVICE).otp


def _page(driver) -> str | None:
    """Which page the browser shows (one script call: no element can go stale
    between finding it and reading it while a form navigates)."""
    return driver.execute_script(
        "const m = document.getElementById('page'); return m ? m.dataset.page : null")


# --- (a) the offline flow --------------------------------------------------------------


def test_offline_login_then_replay_refused(browser, service, authenticator):
    d = browser.driver
    _start(browser, service, "offline")
    _wait(d, lambda d: _page(d) == "offline")
    text = _by(d, "#verification-data").get_attribute("textContent").strip()
    qr = _by(d, "#qr-image")
    assert qr.get_attribute("src").startswith("data:image/svg+xml;base64,")
    assert d.execute_script("return arguments[0].naturalWidth", qr) > 0  # the image decoded
    src = qr.get_attribute("src").split(",", 1)[1]
    assert base64.b64decode(src) == hsm_qr.image(text, "svg")  # the QR code of that text
    assert "Web login as alice from 127.0.0.1" in _by(d, "#context").text
    browser.shot("offline-qr")
    otp = _otp_for(authenticator, text)
    _by(d, "#otp").send_keys(otp)
    browser.shot("otp-typed")
    _by(d, "#verify").click()
    _wait(d, lambda d: _page(d) == "done")
    assert _by(d, "#result").text == "Logged in as alice."
    browser.shot("logged-in")
    # the same OTP on a new page (a new session) is refused
    d.delete_all_cookies()
    _start(browser, service, "offline")
    _wait(d, lambda d: _page(d) == "offline")
    _by(d, "#otp").send_keys(otp)
    _by(d, "#verify").click()
    _wait(d, lambda d: _page(d) == "refused")
    assert _by(d, "#result").get_attribute("data-reason") == "otp-refused"
    browser.shot("replay-refused")


def test_the_page_runs_under_its_csp_without_violations(browser, service):
    d = browser.driver
    d.get(service + "/login")
    _by(d, "#user").send_keys("alice")
    _by(d, "#offline").click()
    _wait(d, lambda d: _page(d) == "offline")
    browser.shot("offline-under-csp")
    # the style sheet applied (a CSP refusal would leave the default white background)
    bg = d.execute_script("return getComputedStyle(document.documentElement).backgroundColor")
    assert bg == "rgb(243, 245, 248)"
    assert d.execute_script("return document.querySelectorAll('script:not([src])').length") == 0
    errors = [e for e in d.get_log("browser") if "Content Security Policy" in e["message"]]
    assert errors == []
    # an inline script the page did not send is refused by the browser (the policy bites)
    d.execute_script(
        "const s = document.createElement('script'); s.textContent = 'window.ran = 1';"
        "document.body.append(s);")
    assert d.execute_script("return window.ran === undefined")
    assert any("Content Security Policy" in e["message"] for e in d.get_log("browser"))


# --- HTTP-level: CSRF, headers, the HTML itself ------------------------------------------


class _Html(html.parser.HTMLParser):
    """Every start tag with its attributes, and the text inside each <script>/<style>."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("script", "style"):
            self._in = tag

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in and data.strip():
            self.inline.append(data)


def _parse(text: str) -> _Html:
    p = _Html()
    p.feed(text)
    return p


def _csrf(text: str) -> str:
    tokens = {a["value"] for t, a in _parse(text).tags if t == "input" and a.get("name") == "csrf"}
    assert len(tokens) == 1, tokens
    return tokens.pop()


def _pre(text: str, element_id: str) -> str:
    start = text.index(f'id="{element_id}"')
    return html.unescape(text[text.index(">", start) + 1 : text.index("</pre>", start)])


def _post(client: httpx.Client, path: str, **fields: str) -> httpx.Response:
    return client.post(path, content=urllib.parse.urlencode(fields),
                       headers={"Content-Type": "application/x-www-form-urlencoded"})


def site_url(client: httpx.Client) -> str:
    return str(client.base_url).rstrip("/")


def _audit_count(verifier_dir: Path, event: str) -> int:
    with Verifier.open(verifier_dir) as v:
        return sum(1 for r in v.show("alice", recent=1000).recent if r.event.value == event)


def _check_html(response: httpx.Response) -> None:
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "same-origin"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    page = _parse(response.text)
    assert page.inline == []  # no inline script or style
    for tag, attrs in page.tags:
        assert not any(a.startswith("on") for a in attrs), (tag, attrs)  # no handlers
        assert "style" not in attrs, (tag, attrs)
        if tag == "script":
            assert attrs["src"].startswith("/login/static/"), attrs
        if tag == "a":
            assert attrs["href"].startswith("/"), attrs  # nothing third-party
        if tag == "form":
            assert attrs["action"].startswith("/login/") and attrs["method"] == "post"
    assert [t for t, _ in page.tags].count("script") == 1


def test_every_page_has_the_headers_and_no_inline_script(service, running, authenticator):
    with httpx.Client(base_url=service) as c:
        first = c.get("/login")
        _check_html(first)
        cookie = first.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/login" in cookie
        assert "Secure" not in cookie  # plain HTTP here; https sets it
        key = running.verifier_dir / "login-page.key"
        assert key.stat().st_mode & 0o777 == 0o600 and key.stat().st_size == 32
        qr = _post(c, "/login/start", csrf=_csrf(first.text), user="alice", flow="offline")
        _check_html(qr)
        wrong = _post(c, "/login/offline", csrf=_csrf(qr.text), otp="00000000")
        assert wrong.status_code == 403
        _check_html(wrong)
        otp = _otp_for(authenticator, _pre(qr.text, "verification-data"))
        ok = _post(c, "/login/offline", csrf=_csrf(qr.text), otp=otp)
        assert ok.status_code == 200, ok.text
        _check_html(ok)
        assert "Logged in as <strong>alice</strong>" in ok.text
        assert _csrf(ok.text) != _csrf(qr.text)  # rotated at login
        for name, kind in (("login.js", "text/javascript"), ("login.css", "text/css")):
            r = c.get(f"/login/static/{name}")
            assert r.headers["content-type"].startswith(kind)
            assert r.headers["x-content-type-options"] == "nosniff"
        assert c.get("/login/static/../app.py").status_code == 404
        assert c.get("/login/static/base.html").status_code == 404


def test_csrf_token_missing_or_wrong_is_403_and_nothing_changed(service, verifier_dir,
                                                                authenticator):
    with httpx.Client(base_url=service) as c:
        page = c.get("/login")
        token = _csrf(page.text)
        sessions = _audit_count(verifier_dir, "session")
        for fields in ({}, {"csrf": ""}, {"csrf": token[:-1] + ("A" if token[-1] != "A" else "B")}):
            r = _post(c, "/login/start", user="alice", flow="offline", **fields)
            assert r.status_code == 403, r.text
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["type"].endswith("/csrf-refused")
        assert _audit_count(verifier_dir, "session") == sessions  # no session was started
        qr = _post(c, "/login/start", csrf=token, user="alice", flow="offline")
        assert qr.status_code == 200
        otp = _otp_for(authenticator, _pre(qr.text, "verification-data"))
        # a wrong token with the right OTP: refused before the OTP is looked at
        r = _post(c, "/login/offline", csrf="x" * len(token), otp=otp)
        assert r.status_code == 403 and r.json()["type"].endswith("/csrf-refused")
        # another site's form, even with the token (Origin / Sec-Fetch-Site)
        for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                        {"Origin": "null"}):
            body = urllib.parse.urlencode({"csrf": token, "otp": otp})
            r = c.post("/login/offline", content=body,
                       headers={"Content-Type": "application/x-www-form-urlencoded", **headers})
            assert r.status_code == 403, headers
        # a forged cookie (the MAC does not match) or none at all
        good = c.cookies["hsm_auth_login"]
        body, mac = good.split(".")
        for forged in (body + "." + mac[::-1], body[:-2] + "." + mac, ""):
            with httpx.Client(base_url=service, cookies={"hsm_auth_login": forged}) as other:
                r = _post(other, "/login/offline", csrf=token, otp=otp)
                assert r.status_code == 403
        # a cookie edited to say "logged in" (the MAC no longer matches) is no login

        payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        payload["logged_in"] = "alice"
        edited = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
        with httpx.Client(base_url=site_url(c), cookies={"hsm_auth_login": f"{edited}.{mac}"}) \
                as other:
            page = other.get("/login")
            assert 'data-page="start"' in page.text and "Logged in" not in page.text
        # nothing was used up: the same OTP still logs in with the right token
        r = _post(c, "/login/offline", csrf=token, otp=otp)
        assert r.status_code == 200 and "Logged in as" in r.text


def test_a_replayed_otp_with_the_old_cookie_is_refused(service, authenticator):
    with httpx.Client(base_url=service) as c:
        token = _csrf(c.get("/login").text)
        qr = _post(c, "/login/start", csrf=token, user="alice", flow="offline")
        pending = dict(c.cookies)
        otp = _otp_for(authenticator, _pre(qr.text, "verification-data"))
        assert _post(c, "/login/offline", csrf=token, otp=otp).status_code == 200
    with httpx.Client(base_url=service, cookies=pending) as replay:
        r = _post(replay, "/login/offline", csrf=token, otp=otp)
        assert r.status_code == 403 and 'data-reason="otp-refused"' in r.text
        assert "Logged in" not in r.text


def test_bad_form_input_is_refused(service):
    with httpx.Client(base_url=service) as c:
        token = _csrf(c.get("/login").text)
        for user in ("", "a" * 65, "al\u202eice", "al\x00ice"):
            r = _post(c, "/login/start", csrf=token, user=user, flow="offline")
            assert r.status_code == 400, user
        r = _post(c, "/login/start", csrf=token, user="nobody", flow="offline")
        assert r.status_code == 404 and 'data-reason="no-method"' in r.text
        r = _post(c, "/login/start", csrf=token, user="<b>x</b>", flow="offline")
        assert r.status_code == 404 and "&lt;b&gt;x&lt;/b&gt;" in r.text and "<b>" not in r.text
        r = _post(c, "/login/start", csrf=token, user="alice", flow="telepathy")
        assert r.status_code == 400
        r = c.post("/login/start", json={"csrf": token, "user": "alice"})
        assert r.status_code == 400
        r = _post(c, "/login/offline", csrf=token, otp="123456")
        assert r.status_code == 409  # no session started in this cookie
        r = c.post("/login/start", content=f"csrf={token}&csrf={token}&user=alice&flow=offline",
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 400


def test_the_wheel_would_carry_every_web_file():
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "hsm_auth.service" in project["packages"]
    globs = project["package-data"]["hsm_auth.service"]
    web = root / "hsm_auth" / "service"
    files = [p.relative_to(web).as_posix() for p in (web / "web").rglob("*") if p.is_file()]
    assert files
    for name in files:
        assert any(fnmatch.fnmatch(name, g) for g in globs), name


def test_the_per_user_rate_limit_applies(verifier_dir):
    with running_service(verifier_dir, args=["--rate-user", "0.01/3"]) as svc, \
            httpx.Client(base_url=svc.url) as c:
        token = _csrf(c.get("/login").text)
        for _ in range(3):
            assert _post(c, "/login/start", csrf=token, user="alice", flow="offline") \
                .status_code == 200
        sessions = _audit_count(verifier_dir, "session")
        r = _post(c, "/login/start", csrf=token, user="alice", flow="offline")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["type"].endswith("/rate-limited")
        assert _audit_count(verifier_dir, "session") == sessions  # refused before the verifier
        # the OTP check counts against the user too; another user is not affected
        r = _post(c, "/login/offline", csrf=token, otp="12345678")
        assert r.status_code == 429
        r = _post(c, "/login/start", csrf=token, user="bob", flow="offline")
        assert r.status_code == 404


# --- (b) push: the page waits and updates live ------------------------------------------


def _live(driver) -> str | None:
    return driver.execute_script(
        "const l = document.getElementById('live'); return l ? l.dataset.state : null")


@dataclass
class AgentSite:
    url: str
    running: RunningService
    agent: RunningAgent


def _toml(value: str) -> str:
    return json.dumps(value)  # a TOML basic string reads as JSON


@pytest.fixture
def agent_site(tmp_path, fido2_device):
    """alice's authenticator home (biometric: the soft FIDO2 authenticator, UV on every
    assertion) enrolled online, and a real ``hsm-auth agent`` long-polling the service."""
    verifier_dir = tmp_path / "agent-verifier"
    write_soft_policy(verifier_dir, [fido2_device])
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    with contextlib.ExitStack() as stack:
        verifier = stack.enter_context(Verifier.init(verifier_dir, "Example Site"))
        svc = stack.enter_context(running_service(verifier_dir))
        config = home / "config.toml"
        config.write_text(
            f"[online]\nurl = {_toml(svc.url)}\n"
            "[methods.biometric]\nbackend = \"fido2\"\n"
            f"device = {_toml('soft:' + str(fido2_device.path))}\n"
            f"state_dir = {_toml(str(tmp_path / 'agent-fido2-state'))}\n"
            "prompts = false\nallow_software_authenticator = true\n"
        )
        config.chmod(0o600)
        paths = Paths(home)
        with Authenticator(paths.authenticator_dir, configmod.load(paths)) as authenticator:
            offer = verifier.create_offer("alice", methods=[Method.BIOMETRIC])
            OnlineClient(authenticator, svc.url).enroll(authenticator.add_or_update(
                Method.BIOMETRIC, offer.text, activation_code=offer.activation_code))
        agent = stack.enter_context(running_agent(
            home, tmp_path / "run" / "agent.sock", log_path=tmp_path / "agent.log"))
        yield AgentSite(svc.url, svc, agent)
        assert "Traceback" not in agent.log() and "Traceback" not in svc.log()


def _received(agent: RunningAgent, user_agent: str, timeout: float = 30.0) -> dict:
    """The challenge the agent's long-poll brought for the page whose browser this is."""
    deadline = time.monotonic() + timeout
    while True:
        found = [c for c in agent.challenges().values()
                 if c["context"].get("user_agent") == user_agent]
        if found:
            assert len(found) == 1, found
            return found[0]
        assert time.monotonic() < deadline, f"the agent never got it:\n{agent.log()}"
        time.sleep(0.1)


def test_push_login_approved_updates_the_page_without_a_reload(browser, agent_site):
    d = browser.driver
    _start(browser, agent_site.url, "push")
    _wait(d, lambda d: _page(d) == "push")
    d.execute_script("window.hsmAuthTestMarker = 'the same document'")
    assert _live(d) == "pending" and "Waiting for your device" in _by(d, "#status").text
    browser.shot("push-waiting")
    navigator = d.execute_script("return navigator.userAgent")
    held = _received(agent_site.agent, navigator)  # the agent's long-poll brought it
    assert (held["user"], held["message"]) == ("alice", "Log in to Example Site as alice")
    assert held["context"]["ip"] == "127.0.0.1"
    r = agent_site.agent.cli("approve", held["challenge_id"])  # UV on the soft FIDO2
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"approved: {held['challenge_id']}"
    _wait(d, lambda d: _page(d) == "done")  # login.js rewrote the page in place
    assert d.execute_script("return window.hsmAuthTestMarker") == "the same document"
    assert _by(d, "#result").text == "Logged in as alice."
    browser.shot("push-approved")
    d.get(agent_site.url + "/login")  # the answer set the logged-in cookie
    assert _page(d) == "done" and _by(d, "#result").get_attribute("data-user") == "alice"
    _by(d, "#logout").click()
    _wait(d, lambda d: _page(d) == "start")


def test_push_login_rejected_shows_rejected(browser, agent_site):
    d = browser.driver
    _start(browser, agent_site.url, "push")
    _wait(d, lambda d: _page(d) == "push")
    d.execute_script("window.hsmAuthTestMarker = 'the same document'")
    held = _received(agent_site.agent, d.execute_script("return navigator.userAgent"))
    r = agent_site.agent.cli("reject", held["challenge_id"])
    assert r.returncode == 0, r.stderr
    _wait(d, lambda d: _live(d) == "rejected")
    assert d.execute_script("return window.hsmAuthTestMarker") == "the same document"
    assert _by(d, "#status").text == "The login was rejected on your device."
    browser.shot("push-rejected")
    d.get(agent_site.url + "/login")
    assert _page(d) == "start"  # not logged in


# --- (c) QR claim: the claim carries the page's request context ---------------------------


def test_qr_claim_login_shows_the_desktops_context_and_logs_in(browser, site):
    d = browser.driver
    d.get(site.url + "/login")
    browser.shot("start")
    _by(d, "#qr").click()
    _wait(d, lambda d: _page(d) == "qr")
    d.execute_script("window.hsmAuthTestMarker = 'the same document'")
    claim = _by(d, "#claim-data").get_attribute("textContent").strip()
    assert claim.startswith("hsm-auth:claim:v1:")
    assert _by(d, "#qr-image").get_attribute("src").startswith("data:image/svg+xml;base64,")
    browser.shot("qr-claim")
    claimed = site.client.claim(claim, Method.BIOMETRIC)
    assert claimed.user == "alice" and claimed.state is ChallengeState.CLAIMED
    context = claimed.context
    assert context.ip == "127.0.0.1"
    assert context.user_agent == d.execute_script("return navigator.userAgent")
    zone = d.execute_script("return Intl.DateTimeFormat().resolvedOptions().timeZone")
    assert zone and context.location == f"browser time zone {zone}"
    assert context.custom["page"] == "/login"
    assert context.custom["language"].startswith("en-US")  # Chromium's --lang
    _wait(d, lambda d: _live(d) == "claimed")
    browser.shot("qr-claimed")
    site.client.answer(claimed, Decision.APPROVE, Method.BIOMETRIC)
    _wait(d, lambda d: _page(d) == "done")  # login.js rewrote the page in place
    assert d.execute_script("return window.hsmAuthTestMarker") == "the same document"
    assert _by(d, "#result").text == "Logged in as alice."
    browser.shot("qr-approved")


def test_push_and_qr_forms_need_the_csrf_token_and_status_needs_the_cookie(site):
    with httpx.Client(base_url=site.url) as c:
        token = _csrf(c.get("/login").text)
        assert _post(c, "/login/start", user="alice", flow="push").status_code == 403
        assert _post(c, "/login/qr", csrf="nope").status_code == 403
        assert site.client.pending(Method.DEVICE) == []  # no challenge was started
        assert c.get("/login/status").status_code == 409  # no push or QR login here
        r = _post(c, "/login/qr", csrf=token, tz="Europe/Berlin")
        assert r.status_code == 200
        _check_html(r)
        claim = _pre(r.text, "claim-data")
        assert c.get("/login/status").json() == {"state": "pending"}
        # another browser (no cookie, or a forged one) learns nothing and logs in nobody
        with httpx.Client(base_url=site.url) as other:
            assert other.get("/login/status").status_code == 409
        claimed = site.client.claim(claim, Method.BIOMETRIC)
        assert claimed.context.location == "browser time zone Europe/Berlin"
        assert claimed.context.user_agent.startswith("python-httpx/")
        assert c.get("/login/status?wait=1").json() == {"state": "claimed"}
        site.client.answer(claimed, Decision.APPROVE, Method.BIOMETRIC)
        answer = c.get("/login/status").json()
        assert (answer["state"], answer["user"]) == ("approved", "alice")
        assert answer["csrf"] != token
        page = c.get("/login")
        assert "Logged in as <strong>alice</strong>" in page.text
        assert _csrf(page.text) == answer["csrf"]


def _self_signed(directory: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def test_over_tls_the_cookie_is_secure(tmp_path, verifier_dir, authenticator):
    import ssl

    cert, key = _self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))
    with running_service(verifier_dir, args=["--tls-cert", str(cert), "--tls-key", str(key)],
                         ready_context=trust) as svc, \
            httpx.Client(base_url=svc.url, verify=trust) as c:
        assert svc.url.startswith("https://")
        first = c.get("/login")
        cookie = first.headers["set-cookie"]
        assert "; Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        qr = _post(c, "/login/start", csrf=_csrf(first.text), user="alice", flow="offline")
        otp = _otp_for(authenticator, _pre(qr.text, "verification-data"))
        ok = _post(c, "/login/offline", csrf=_csrf(qr.text), otp=otp)
        assert ok.status_code == 200 and "; Secure" in ok.headers["set-cookie"]


@pytest.mark.postgres
def test_two_services_on_one_postgresql_verifier_share_the_login(
    tmp_path, postgres_dsn, authenticator, fido2_device
):
    """Two service processes on one verifier (as two workers would be): a cookie made by
    one is good at the other (one key, made once under a lock); a push started at one
    and answered through the other wakes a long-poll at the first (the store is polled)."""
    import concurrent.futures

    directory = tmp_path / "pg-verifier"
    write_soft_policy(directory, [fido2_device])
    with Verifier.init(directory, "Example Site", database=postgres_dsn) as v:
        offers = {m: v.create_offer("alice", methods=[m])
                  for m in (Method.DEVICE, Method.BIOMETRIC)}
    with running_service(directory, database=postgres_dsn) as a, \
            running_service(directory, database=postgres_dsn) as b, \
            httpx.Client(base_url=a.url, timeout=30) as at_a, \
            httpx.Client(base_url=b.url, timeout=30) as at_b:
        client = OnlineClient(authenticator, b.url)
        for method, offer in offers.items():
            client.enroll(authenticator.add_or_update(
                method, offer.text, activation_code=offer.activation_code))
        token = _csrf(at_a.get("/login").text)
        at_b.cookies = at_a.cookies  # one browser: cookies are per host, not per port
        qr = _post(at_b, "/login/start", csrf=token, user="alice", flow="offline")
        assert qr.status_code == 200, qr.text
        at_a.cookies = at_b.cookies
        otp = _otp_for(authenticator, _pre(qr.text, "verification-data"))
        ok = _post(at_a, "/login/offline", csrf=token, otp=otp)
        assert ok.status_code == 200 and "Logged in as <strong>alice</strong>" in ok.text
        at_b.cookies = at_a.cookies
        assert "Logged in" in at_b.get("/login").text
        # push started at b, waited for at a, answered through b
        token = _csrf(_post(at_b, "/login/logout", csrf=_csrf(ok.text)).text)
        at_a.cookies = at_b.cookies
        assert _post(at_b, "/login/start", csrf=token, user="alice", flow="push") \
            .status_code == 200
        at_a.cookies = at_b.cookies
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(at_a.get, "/login/status", params={"wait": 20})
            [challenge] = client.pending(Method.DEVICE, wait=10)
            assert not waiting.done()
            client.answer(challenge, Decision.APPROVE, Method.BIOMETRIC)
            answer = waiting.result(timeout=25).json()
        assert (answer["state"], answer["user"]) == ("approved", "alice")
        assert (a.verifier_dir / "login-page.key").stat().st_size == 32
