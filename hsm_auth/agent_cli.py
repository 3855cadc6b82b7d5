"""The agent's commands: ``hsm-auth agent``, ``challenges``, ``approve``, ``reject``,
``claim``. Thin: each is a request to the agent (:mod:`hsm_auth.agent_client`),
printed; ``hsm_auth.cli`` parses their arguments and calls these when they run
(so that parsing the command line imports none of it).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidInput, PinRequired, StateError

if TYPE_CHECKING:
    from .cli import Context

UNIT_NAME = "hsm-auth-agent.service"


def socket_path(ctx: Context) -> Path:
    from .agent_client import default_socket

    given = getattr(ctx.args, "socket", None)
    return Path(given) if given else default_socket()


def _call(ctx: Context, op: str, **args: Any) -> dict[str, Any]:
    from .agent_client import AgentClient

    with AgentClient(socket_path(ctx)) as client:
        return client.call(op, **args)


def _call_with_pin(ctx: Context, op: str, **args: Any) -> dict[str, Any]:
    """A request that may need the token's PIN: the one from --pin-file / --pin-fd if
    given, else none (the agent's cache), and when the agent says one is needed, the
    PIN typed at the terminal, once."""
    from . import cli
    from .agent_client import AgentClient

    given = getattr(ctx.args, "pin_file", None) or getattr(ctx.args, "pin_fd", None) is not None
    with AgentClient(socket_path(ctx)) as client:
        if given:
            return client.call(op, **args, pin=cli.read_pin(ctx.args, ctx.err, "PIN: "))
        try:
            return client.call(op, **args)
        except PinRequired:
            pin = cli.read_pin(ctx.args, ctx.err, "PIN for this approval: ")
            return client.call(op, **args, pin=pin)


def _in(seconds: float) -> str:
    return f"expires in {max(0, int(seconds))} s" if seconds >= 0 else "expired"


def challenge_lines(ch: dict[str, Any], *, now: float | None = None) -> list[str]:
    """What a user reads before answering: verifier, user, message and the context."""
    now = time.time() if now is None else now
    ctx = ch.get("context") or {}
    lines = [
        f"challenge {ch.get('challenge_id')} ({ch.get('kind')}, "
        f"{_in(float(ch.get('expires', 0)) - now)})",
        f"  verifier: {ch.get('verifier', '')}",
        f"  user:     {ch.get('user') or ''}",
        f"  message:  {ch.get('message', '')}",
    ]
    for key, label in (("ip", "from IP"), ("user_agent", "browser"), ("location", "location")):
        if ctx.get(key):
            lines.append(f"  {label + ':':9} {ctx[key]}")
    for key, value in sorted((ctx.get("custom") or {}).items()):
        lines.append(f"  {key}: {value}")
    return lines


def cmd_challenges(ctx: Context) -> int:
    reply = _call(ctx, "list")
    items = reply.get("challenges", [])
    human = "\n".join(line for ch in items for line in challenge_lines(ch))
    ctx.emit(human or "no pending challenges", {"challenges": items})
    return 0


def _answer(ctx: Context, approve: bool, challenge_id: str) -> int:
    args: dict[str, Any] = {"id": challenge_id.strip().lower()}
    if ctx.args.method:
        args["method"] = ctx.args.method
    reply = _call_with_pin(ctx, "approve" if approve else "reject", **args)
    ctx.emit(f"{reply['state']}: {challenge_id}", {"state": reply["state"],
                                                    "challenge": reply.get("challenge")})
    return 0


def cmd_approve(ctx: Context) -> int:
    return _answer(ctx, True, ctx.args.id)


def cmd_reject(ctx: Context) -> int:
    return _answer(ctx, False, ctx.args.id)


def _ask(err: Any) -> bool:
    """Approve? on the terminal (never stdin, which may carry the claim)."""
    try:
        tty = open("/dev/tty", "r+")  # noqa: SIM115 - closed below
    except OSError:
        raise InvalidInput(
            "no terminal to ask approve or reject: give --approve or --reject "
            "(the challenge stays claimed: hsm-auth approve|reject ID)"
        ) from None
    with tty:
        tty.write("Approve this sign-in? [y/N] ")
        tty.flush()
        answer = tty.readline(64).strip().lower()
    return answer in ("y", "yes")


def cmd_claim(ctx: Context) -> int:
    from . import cli

    text = cli.read_text_arg(ctx.args.claim, sys.stdin)
    args: dict[str, Any] = {"claim": text}
    if ctx.args.method:
        args["method"] = ctx.args.method
    reply = _call_with_pin(ctx, "claim", **args)
    challenge = reply["challenge"]
    if not ctx.args.json:
        print("\n".join(challenge_lines(challenge)), file=ctx.out, flush=True)
    decided = ctx.args.approve or ctx.args.reject
    approve = bool(ctx.args.approve) if decided else _ask(ctx.err)
    answer_args: dict[str, Any] = {"id": challenge["challenge_id"],
                                   "method": challenge.get("method")}
    answered = _call_with_pin(ctx, "approve" if approve else "reject", **answer_args)
    ctx.emit(f"{answered['state']}: {challenge['challenge_id']}",
             {"state": answered["state"], "challenge": challenge})
    return 0


def _status_lines(reply: dict[str, Any]) -> str:
    lines = [f"agent pid {reply.get('pid')} on {reply.get('socket')}"]
    for s in reply.get("sources", []):
        lines.append(f"  {s['verifier']} ({s['user']}, {s['method']}) {s['url']}: {s['state']}")
    if not reply.get("sources"):
        lines.append("  no online verifier to poll (enroll online first)")
    lines.append(f"  pending challenges: {reply.get('pending', 0)}")
    for c in reply.get("cache", []):
        lines.append(f"  PIN cached for credential {c['credential']}: {c['seconds_left']} s left")
    for c in reply.get("unlocked", []):
        lines.append(f"  token held unlocked for credential {c['credential']}: "
                     f"{c['seconds_left']} s left")
    return "\n".join(lines)


def install_unit(ctx: Context) -> int:
    """Write the systemd user unit with ``ExecStart`` naming this installation's
    console script (and --home / --socket when given)."""
    from importlib import resources

    from .files import atomic_write

    template = (resources.files("hsm_auth") / "data" / UNIT_NAME).read_text(encoding="utf-8")
    exe = shutil.which("hsm-auth") or os.path.abspath(sys.argv[0])
    words = [exe, "agent"]
    if ctx.args.home:
        words += ["--home", os.path.abspath(ctx.args.home)]
    if getattr(ctx.args, "socket", None):
        words += ["--socket", os.path.abspath(ctx.args.socket)]
    for word in words:
        if any(c.isspace() or c in "\"'\\%$;" for c in word) or not word.isprintable():
            raise InvalidInput(f"cannot put {word[:80]!r} into a systemd unit; install it by hand")
    lines = [
        f"ExecStart={' '.join(words)}" if line.startswith("ExecStart=") else line
        for line in template.splitlines()
    ]
    directory = Path(ctx.args.unit_dir) if ctx.args.unit_dir else Path(
        os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    ) / "systemd" / "user"
    target = directory / UNIT_NAME
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    atomic_write(target, ("\n".join(lines) + "\n").encode(), mode=0o644)
    ctx.emit(
        f"wrote {target}\nnow: systemctl --user daemon-reload && "
        f"systemctl --user enable --now {UNIT_NAME}",
        {"unit": str(target), "exec_start": " ".join(words)},
    )
    return 0


def cmd_agent(ctx: Context) -> int:
    if ctx.args.install_unit:
        return install_unit(ctx)
    if ctx.args.status:
        reply = _call(ctx, "status")
        reply["socket"] = str(socket_path(ctx))
        reply.pop("ok", None)
        ctx.emit(_status_lines(reply), reply)
        return 0
    if ctx.args.lock:
        reply = _call(ctx, "lock")
        ctx.emit(f"PIN cache wiped ({reply['wiped']} cached)", {"wiped": reply["wiped"]})
        return 0
    return run_agent(ctx)


def run_agent(ctx: Context) -> int:
    from . import agent, agent_online, notify, session_watch
    from .authenticator import PROMPTS

    path = socket_path(ctx)
    notifier = notify.Notifier(ctx.err)
    held: list[str] | None = []  # what is said before the socket is ours: after it

    def report(line: str) -> None:
        if held is None:
            notifier.line(line)
        else:
            held.append(line)

    config = ctx.config()
    sources = agent_online.sources(ctx.paths, config, report=report)
    said: set[str] = set()

    def once(line: str) -> None:
        if line not in said:
            said.add(line)
            report(line)

    offline = agent_online.SerializedAuthenticator(ctx.paths.authenticator_dir, config, warn=once)
    the_agent = agent.Agent(sources, notify=notifier, prompts=PROMPTS, offline=offline)

    def on_event(event: str) -> None:
        the_agent.wipe("screen locked" if event == session_watch.LOCK else "going to sleep")

    watch = session_watch.SessionWatch(on_event, report=report)

    def ready(p: Path) -> None:
        nonlocal held
        names = ", ".join(f"{s.name} ({s.url})" for s in sources) or "none (enroll online first)"
        lines, held = held or [], None
        notifier.line(f"listening on {p}; polling: {names}")
        for line in lines:
            notifier.line(line)

    try:
        return agent.run(the_agent, path, ready=ready, watch=watch)
    except OSError as e:
        raise StateError(f"the agent failed: {e.strerror or e}") from None
    finally:
        offline.close()


def finish_via_agent(
    ctx: Context, text: str, method_name: str, *, data: str | None = None,
    prompt: str | None = None,
) -> dict[str, Any] | None:
    """``hsm-auth finish`` through a running agent, when the method's policy caches its
    PIN (``pin_cache > 0``, :mod:`hsm_auth.unlocked`): the agent's reply (``otp``,
    ``atc``, ``held``), or ``None`` when no agent answers or the policy asks at every
    use (then the caller computes the OTP itself, asking for the PIN as always).

    The first request carries no PIN: what the agent holds answers it. When it holds
    nothing, the PIN is read (``--pin-file``, ``--pin-fd`` or the terminal, once) and
    sent; it reaches the token there."""
    from . import cli
    from .agent_client import AgentClient, AgentNotRunning

    try:
        client = AgentClient(socket_path(ctx), timeout=120.0)
    except (AgentNotRunning, StateError):
        return None
    args: dict[str, Any] = {"request": text, "method": method_name}
    if data is not None:  # what the user entered (docs/PROTOCOL.md §17)
        args["data"] = data
    if prompt is not None:
        args["prompt"] = prompt
    with client:
        try:
            try:
                reply = client.call("otp", **args)
            except PinRequired:
                pin = cli.read_pin(ctx.args, ctx.err)
                reply = client.call("otp", **args, pin=pin)
        except AgentNotRunning:  # it closed without answering (not ours, stopping)
            return None
    if reply.get("every_use") or not isinstance(reply.get("otp"), str):
        return None
    return reply

