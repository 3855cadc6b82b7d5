"""``hsm-auth``: a thin command line over the library.

Prompts and progress go to stderr, results to stdout (``--json`` for
machines). PINs come from a prompt, ``--pin-file`` or ``--pin-fd``, never from
argv. Without ``--debug`` no traceback is shown: every error is one line and
an exit code (listed in ``hsm-auth --help``).
"""

from __future__ import annotations

# Start-up time is part of the interface (``bench/startup.py``): at module level
# only what parsing the command line needs. Each command imports what it uses
# (the verifier, QR codes, backends, config, json, logging): ``--help`` stays cheap.
import argparse
import contextlib
import math
import os
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, cast

from . import display, errors, textcode
from .errors import HsmAuthError, InvalidInput, PinRequired
from .methods import Method

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Sequence

    from . import config as configmod
    from .authenticator import Authenticator, OfflineRequest
    from .config import Paths
    from .keystore import UserInteraction
    from .verifier import Acceptance, Verifier

EXIT_CODES = """\
exit codes:
  0   success                          30  authorization failed
  1   other error                      31  PIN required
  2   invalid input                    32  wrong PIN
  3   undecodable data                 33  PIN locked
  4   unsupported message version      34  user verification failed
  5   expired offer/verification data  35  cancelled / timed out
  6   bad or unknown signature         36  login (sync) required
  7   unknown or disallowed method     37  locked out (TPM lockout)
  8   configuration error              38  credential expired (hsm-auth renew)
  9   method enrolled already          40  OTP refused (InvalidToken)
 10   local state missing or unsafe   130  interrupted
 20   token/backend error
 21   backend unavailable
 22   token not found
 23   key not found
 24   mechanism not supported
 25   counter error
"""


def terminal_interaction(err: TextIO) -> UserInteraction:
    """The CLI's side of the library's prompts: one line on stderr when a token waits.

    Defined on first use: the keystore module imports cryptography, which
    parsing the command line (``--help``) does not need."""
    from .keystore import UserInteraction

    class TerminalInteraction(UserInteraction):
        def prompt_up(self, prompt: str) -> None:
            print(f"{prompt}: touch / verify on your authenticator", file=err, flush=True)

    return TerminalInteraction()


DESCRIPTION = """\
Hardware-backed offline authentication: OTPs and signatures made inside PKCS#11
tokens, TPM 2.0 chips and FIDO2 authenticators.

Try it without hardware: `hsm-auth demo` runs the whole offline flow on a
SoftHSM token, a swtpm TPM 2.0 and the software FIDO2 authenticator."""

DEMO_HELP = (
    "run the whole offline flow on throw-away tokens: SoftHSM (pin), swtpm (device; "
    "SoftHSM without swtpm) and the software FIDO2 authenticator (biometric, face)"
)

METHOD_HELP = "device, pin, biometric or face"
USER_HELP = "the user's name at the verifier"
TENANT_HELP = "the user's tenant (default: none)"
CREDENTIAL_HELP = (
    "one of the user's credentials: its label or credential id (a prefix of 8+ hex digits)"
)
EMULATOR_INIT_HELP = """\
Create a SoftHSM token or start a swtpm for a method, and write the method's
[methods.X] table into the config file (every other table, key and comment
is kept; atomic).

These are the emulators of hsm_auth.testing, as CI uses them: their keys are
files on disk. For trying hsm-auth out, never for protecting anything.

  --softhsm LABEL  a token under the data dir (DIR/softhsm with --home), with
                   its own softhsm2.conf ([environment] SOFTHSM2_CONF). The SO
                   PIN is random and discarded. device: the user PIN is random,
                   in a 0600 file that the uri's pin-source names. pin: the
                   user PIN is the offline PIN you give (prompt, --pin-file,
                   --pin-fd). No PIN is put on any command line.
  --swtpm DIR      a TPM 2.0 on the UNIX socket DIR/tpm.sock, state in DIR,
                   left running until 'hsm-auth token stop --swtpm DIR'.
"""
SESSION_HELP = "the session id (hex) that `verifier session` printed, or @FILE (--id-file)"


class _VersionAction(argparse.Action):
    """``--version``: read from the installed package's metadata only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.update(nargs=0, default=argparse.SUPPRESS)
        super().__init__(option_strings, argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("hsm-auth")
        except PackageNotFoundError:
            text = "unknown (not installed)"
        print(f"hsm-auth {text}", file=sys.stdout)
        parser.exit()


@dataclass
class Context:
    args: argparse.Namespace
    out: TextIO
    err: TextIO

    @property
    def paths(self) -> Paths:
        from .config import Paths

        return Paths.from_env(self.args.home)

    def config(self) -> configmod.Config:
        from . import config as configmod

        cfg = configmod.load(self.paths)
        cfg.apply_environment()
        return cfg

    def authenticator(self) -> Authenticator:
        from .authenticator import Authenticator

        return Authenticator(
            self.paths.authenticator_dir,
            self.config(),
            warn=lambda m: print(m, file=self.err),
            interaction=self.interaction,
        )

    @property
    def interaction(self) -> UserInteraction:
        return terminal_interaction(self.err)

    def _verifier_setting(self, option: str, key: str) -> str | None:
        """``--db`` / ``--hsm``, else ``HSM_AUTH_VERIFIER_<KEY>``, else ``[verifier] key``."""
        value = getattr(self.args, option, None) or os.environ.get(
            f"HSM_AUTH_VERIFIER_{key.upper()}"
        )
        if value:
            return str(value)
        section = self.config().raw.get("verifier", {})
        if not isinstance(section, dict):
            raise errors.ConfigError("[verifier] must be a table")
        configured = section.get(key)
        if configured is not None and not isinstance(configured, str):
            raise errors.ConfigError(f"[verifier] {key} must be a string")
        return configured

    def verifier_database(self) -> str | None:
        dsn = self._verifier_setting("db", "database")
        if dsn is not None and ("://" in dsn or "=" in dsn):  # a DSN is text, unlike a path
            try:
                dsn.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidInput("the database DSN is not valid UTF-8") from None
        return dsn

    def verifier_hsm(self) -> str | None:
        return self._verifier_setting("hsm", "hsm")

    def verifier(self) -> Verifier:
        from .verifier import Verifier

        return Verifier.open(
            self.paths.verifier_dir, database=self.verifier_database(), hsm=self.verifier_hsm()
        )

    def emit(self, human: str, machine: dict[str, Any]) -> None:
        if self.args.json:
            import json

            print(json.dumps(machine, sort_keys=True), file=self.out)
        elif human:
            print(human, file=self.out)


# --- input helpers ----------------------------------------------------------


#: The most text a message argument, file or stdin may hold: protocol messages are
#: at most 4 KiB (6.6 KiB as text), so anything much larger is not one of ours.
MAX_TEXT = 64 * 1024


def _read_bounded(read: Callable[[int], bytes | str], what: str) -> str:
    try:
        data = read(MAX_TEXT + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInput(f"cannot read {what}: {getattr(e, 'strerror', None) or e}") from None
    if len(data) > MAX_TEXT:
        raise InvalidInput(f"{what} holds more than {MAX_TEXT} bytes: not hsm-auth data")
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{what} is not UTF-8 text") from None


def _read_text_file(path: str) -> str:
    """A small regular file (never a FIFO, device or directory: no hang, bounded memory)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except (OSError, ValueError) as e:  # ValueError: an embedded NUL
        reason = getattr(e, "strerror", None) or e
        raise InvalidInput(f"cannot read {path[:200]}: {reason}") from None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = False
    if not regular:
        os.close(fd)
        raise InvalidInput(f"{path[:200]} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        return _read_bounded(f.read, path[:200])


def _is_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):  # too long, a NUL, absent: not a file, so data
        return False


def read_text_arg(value: str | None, stdin: TextIO) -> str:
    """A message given inline (``HA1:…``), as ``-`` (stdin), or in a file (``FILE``, ``@FILE``).

    At most :data:`MAX_TEXT` is read from a file or stdin; ``@FILE`` must be a
    regular file. A plain argument names a file only when one exists there."""
    if value is None or value == "-":
        if stdin.isatty():
            raise InvalidInput("no data given (pass it as an argument, a FILE, or on stdin)")
        binary = getattr(stdin, "buffer", None)
        return _read_bounded(binary.read if binary is not None else stdin.read, "stdin").strip()
    if value.startswith("@"):
        return _read_text_file(value[1:]).strip()
    if not value.strip().upper().startswith(textcode.PREFIX) and _is_file(value):
        return _read_text_file(value).strip()
    if len(value) > MAX_TEXT:
        raise InvalidInput(f"the argument holds more than {MAX_TEXT} characters: not hsm-auth data")
    return value.strip()


def text_arg(value: str) -> str:
    """An argument that is text, not a path: valid UTF-8 (argv that is not decodes to
    lone surrogates, which no text field can store) and not absurdly long."""
    if len(value) > MAX_TEXT:
        raise argparse.ArgumentTypeError(f"longer than {MAX_TEXT} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("not valid UTF-8") from None
    return value


def count_arg(most: int) -> Callable[[str], int]:
    """An argument type: a whole number from 0 to ``most``."""

    def count(text: str) -> int:
        try:
            n = int(text)
        except ValueError:  # also more than 4300 digits
            n = -1
        if not 0 <= n <= most:
            raise argparse.ArgumentTypeError(f"expected a whole number from 0 to {most}")
        return n

    return count


def read_pin(args: argparse.Namespace, err: TextIO, prompt: str = "Offline PIN: ") -> str:
    """The PIN from ``--pin-file`` (refused if others can read or write it), ``--pin-fd``
    (one line) or the terminal; a clear error for binary, oversized or empty input."""
    from . import files

    if getattr(args, "pin_file", None):
        pin = files.decode_pin(files.read_secret_file(args.pin_file), "the PIN file")
    elif getattr(args, "pin_fd", None) is not None:
        pin = files.decode_pin(_read_pin_fd(args.pin_fd), f"fd {args.pin_fd}")
    else:
        try:
            with open("/dev/tty") as _tty:
                pass
        except OSError:
            raise PinRequired(
                "no terminal to ask for the PIN; use --pin-file or --pin-fd"
            ) from None
        import getpass

        try:
            typed = getpass.getpass(prompt, stream=err)
        except EOFError:
            raise PinRequired("no PIN given") from None
        except UnicodeDecodeError:
            raise InvalidInput("the PIN typed is not UTF-8 text") from None
        pin = files.decode_pin(typed.encode("utf-8", "surrogateescape"), "the terminal")
    if not pin:
        raise PinRequired("the PIN is empty")
    return pin


def _read_pin_fd(fd: int) -> bytes:
    """One line (at most a PIN's length and its line end) from descriptor ``fd``."""
    from . import files

    if not 0 <= fd < 2**31:
        raise InvalidInput(f"--pin-fd {fd} is not a file descriptor number")
    data = b""
    while len(data) <= files.MAX_PIN_BYTES + 2 and not data.endswith(b"\n"):
        try:
            chunk = os.read(fd, 1)  # byte by byte: nothing after the line is consumed
        except OSError as e:
            raise InvalidInput(f"cannot read the PIN from fd {fd}: {e.strerror}") from None
        if not chunk:
            break
        data += chunk
    return data


MAX_OTP_LINE = 256


def read_otp(ctx: Context) -> str:
    """The OTP from ``--otp``, else from stdin (a pipe) or typed at the terminal
    (kept out of argv, where other users could see it in the process list)."""
    if ctx.args.otp != "-":
        return str(ctx.args.otp)
    if sys.stdin.isatty():
        print("OTP: ", end="", file=ctx.err, flush=True)
    try:
        line = sys.stdin.readline(MAX_OTP_LINE).strip()  # bounded: stdin may be /dev/zero
    except (OSError, UnicodeDecodeError):
        raise InvalidInput("cannot read the OTP from stdin") from None
    if not line:
        raise InvalidInput("no OTP given (--otp, or one line on stdin)")
    return line


def parse_methods(text: str | None) -> list[Method] | None:
    if not text:
        return None
    return [Method.parse(m) for m in text.split(",") if m.strip()]


def parse_session_id(text: str) -> bytes:
    if text.startswith("@"):  # the file `verifier session --id-file` wrote
        text = read_text_arg(text, sys.stdin)
    try:
        sid = bytes.fromhex(text.strip())
    except ValueError:
        raise InvalidInput("a session id is hex") from None
    if not 8 <= len(sid) <= 32:
        raise InvalidInput("a session id is 16 to 64 hex digits")
    return sid


# --- commands ---------------------------------------------------------------


def cmd_backends(ctx: Context) -> int:
    from . import registry

    cfg = ctx.config()
    statuses = []
    for name in registry.backend_names():
        settings: dict[str, Any] = {}
        configured: Method | None = None
        for method in Method:
            mc = cfg.method(method)
            if mc.backend == name:
                settings, configured = dict(mc.settings), method
                break
        statuses.append(registry.probe_backend(name, settings, configured))
    lines = []
    for s in statuses:
        state = "available" if s.available else f"unavailable: {s.reason}"
        details = ", ".join(f"{k}={v}" for k, v in s.details.items())
        lines.append(f"{s.name:8} {state}" + (f" ({details})" if details else ""))
    ctx.emit(
        "\n".join(lines),
        {"backends": [s.__dict__ for s in statuses]},
    )
    return 0


def cmd_verifier_init(ctx: Context) -> int:
    from .verifier import Verifier

    v = Verifier.init(
        ctx.paths.verifier_dir,
        ctx.args.name,
        database=ctx.verifier_database(),
        hsm=ctx.verifier_hsm(),
    )
    engine, keys = v.store.engine, v.keys.kind
    v.close()
    ctx.emit(
        f"verifier {v.identity.name!r} created in {ctx.paths.verifier_dir} "
        f"(database: {engine}, keys: {keys})",
        {
            "verifier_id": v.identity.verifier_id.hex(),
            "name": v.identity.name,
            "database": engine,
            "keys": keys,
        },
    )
    return 0


def cmd_verifier_offer(ctx: Context) -> int:
    from . import files

    code_file = ctx.args.activation_code_file
    if not code_file and not ctx.args.json and not ctx.err.isatty():
        raise InvalidInput(
            "give --activation-code-file PATH (or --json): the offer's activation code is "
            "shown on a terminal only"
        )
    v = ctx.verifier()
    try:
        methods = parse_methods(ctx.args.methods) or list(Method)
        issued = v.create_offer(
            ctx.args.user, methods=methods, replace=ctx.args.replace, tenant=ctx.args.tenant,
            label=ctx.args.label,
        )
    finally:
        v.close()
    offer = issued.offer
    machine: dict[str, Any] = {"offer": issued.text, "expires": offer.expires, "user": offer.user}
    if code_file:
        try:
            files.atomic_write(Path(code_file), f"{issued.activation_code}\n".encode("ascii"))
        except (OSError, ValueError) as e:  # the offer is useless without it: it expires
            raise InvalidInput(
                f"cannot write the activation code to {code_file!r}: "
                f"{getattr(e, 'strerror', None) or e}"
            ) from None
    elif ctx.args.json:
        machine["activation_code"] = issued.activation_code
    else:
        print(
            f"activation code for {offer.user}: {issued.activation_code}\n"
            "hand it to the user over your own authenticated channel (after an online "
            "login, or in person), never together with the offer",
            file=ctx.err,
        )
    ctx.emit(issued.text, machine)
    return 0


def cmd_verifier_enroll(ctx: Context) -> int:
    v = ctx.verifier()
    try:
        cred = v.accept_enrollment(read_text_arg(ctx.args.response, sys.stdin))
        result = v.enrollment_result(cred)
    finally:
        v.close()
    print(
        f"enrolled {cred.method.value} for {cred.user} (backend {cred.backend}, ATC {cred.atc}); "
        "give this result to the authenticator (hsm-auth certificate):",
        file=ctx.err,
    )
    ctx.emit(
        result,
        {"user": cred.user, "method": cred.method.value, "backend": cred.backend, "atc": cred.atc,
         "result": result},
    )
    return 0


def cmd_verifier_tpm_challenge(ctx: Context) -> int:
    v = ctx.verifier()
    try:
        text = v.tpm_challenge(read_text_arg(ctx.args.request, sys.stdin))
    finally:
        v.close()
    print("give this challenge to the authenticator (hsm-auth tpm activate):", file=ctx.err)
    ctx.emit(text, {"challenge": text})
    return 0


def cmd_verifier_result(ctx: Context) -> int:
    v = ctx.verifier()
    try:
        result = v.enrollment_result(_one_credential(ctx, v))
    finally:
        v.close()
    ctx.emit(result, {"result": result})
    return 0


def cmd_verifier_ca_cert(ctx: Context) -> int:
    from cryptography.hazmat.primitives import serialization

    v = ctx.verifier()
    try:
        pem = v.ca_certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
    finally:
        v.close()
    ctx.emit(pem.rstrip("\n"), {"certificate": pem})
    return 0


def cmd_verifier_session(ctx: Context) -> int:
    target = ctx.args.qr
    if target:
        from . import qr
    if target and target != "terminal":
        qr.image_target(target)  # a bad target fails before a session is made
    v = ctx.verifier()
    try:
        from . import transaction

        session = v.start_session(
            ctx.args.user,
            ctx.args.context,
            methods=parse_methods(ctx.args.methods),
            tenant=ctx.args.tenant,
            transaction=[transaction.parse_item(t) for t in ctx.args.transaction] or None,
            user_data=ctx.args.user_data,
        )
    finally:
        v.close()
    if target == "terminal":
        print(qr.terminal(session.text), file=ctx.err)
    elif target:
        path = qr.write_image(session.text, target)
        print(f"QR code written to {path}", file=ctx.err)
    human = f"session {session.session_id.hex()}\n{session.text}"
    if ctx.args.id_file:
        from .files import atomic_write

        try:
            atomic_write(Path(ctx.args.id_file), f"{session.session_id.hex()}\n".encode())
        except (OSError, ValueError) as e:
            raise InvalidInput(
                f"cannot write the session id to {ctx.args.id_file!r}: "
                f"{getattr(e, 'strerror', None) or e}"
            ) from None
        human = session.text  # stdout: only what goes to the authenticator
    ctx.emit(
        human,
        {
            "session": session.session_id.hex(),
            "data": session.text,
            "expires": session.data.expires,
            "methods": [m.value for m in session.data.methods],
            **({"transaction": [list(p) for p in session.data.transaction]}
               if session.data.transaction else {}),
            **({"user_data": session.data.user_data} if session.data.user_data else {}),
            **({"tenant": session.data.tenant} if session.data.tenant else {}),
        },
    )
    return 0


def cmd_verifier_verify(ctx: Context) -> int:
    v = ctx.verifier()
    try:
        ok = v.verify(
            parse_session_id(ctx.args.session), read_otp(ctx), data=_user_data_arg(ctx.args.data)
        )
    finally:
        v.close()
    return _emit_acceptance(ctx, "accepted", ok)


def cmd_verifier_resync(ctx: Context) -> int:
    v = ctx.verifier()
    try:
        ok = v.resync(parse_session_id(ctx.args.session), ctx.args.otp, ctx.args.next_otp)
    finally:
        v.close()
    return _emit_acceptance(ctx, "resynchronized", ok)


def _emit_acceptance(ctx: Context, verb: str, ok: Acceptance) -> int:
    named = f" {ok.label!r}" if ok.label and ok.label != ok.method.value else ""
    ctx.emit(
        f"{verb}: {ok.user} with {ok.method.value}{named} (ATC {ok.atc})",
        {"accepted": True, "user": ok.user, "method": ok.method.value, "atc": ok.atc,
         "label": ok.label, "credential_id": ok.credential_id.hex()},
    )
    return 0


def _one_credential(ctx: Context, v: Verifier) -> Any:
    """The credential that --user, --tenant, --method and --credential name."""
    method = Method.parse(ctx.args.method) if ctx.args.method else None
    if method is None and ctx.args.credential is None:
        raise InvalidInput("name the credential: --method METHOD and/or --credential ID|LABEL")
    return v.credential(
        ctx.args.user, method, tenant=ctx.args.tenant, credential=ctx.args.credential
    )


def cmd_verifier_sync(ctx: Context) -> int:
    v = ctx.verifier()
    try:
        text = v.sync_message(
            ctx.args.user, Method.parse(ctx.args.method), tenant=ctx.args.tenant,
            credential=ctx.args.credential,
        )
    finally:
        v.close()
    ctx.emit(text, {"sync": text})
    return 0


def cmd_verifier_sync_report(ctx: Context) -> int:
    v = ctx.verifier()
    try:
        ok = v.apply_sync(read_text_arg(ctx.args.report, sys.stdin))
    finally:
        v.close()
    print(
        f"synced: {ok.user} with {ok.method.value} (ATC {ok.atc}); give this acknowledgement "
        "to the authenticator (hsm-auth sync):",
        file=ctx.err,
    )
    ctx.emit(
        ok.ack,
        {"accepted": True, "user": ok.user, "method": ok.method.value, "atc": ok.atc,
         "ack": ok.ack},
    )
    return 0


def cmd_verifier_purge(ctx: Context) -> int:
    v = ctx.verifier()
    try:
        count = v.purge(grace=ctx.args.grace)
    finally:
        v.close()
    ctx.emit(
        f"purged {count} expired sessions and offers and agreement keys of used or expired offers",
        {"purged": count},
    )
    return 0


def cmd_verifier_unlock(ctx: Context) -> int:
    v = ctx.verifier()
    try:
        cred = v.unlock(ctx.args.user, **_credential_args(ctx))
    finally:
        v.close()
    ctx.emit(
        f"unlocked {cred.method.value} {cred.label!r} for {cred.user}",
        {"unlocked": True, **_credential_rows([cred])[0]},
    )
    return 0


def _credential_args(ctx: Context) -> dict[str, Any]:
    """unlock / revoke: the credential that --method and/or --credential name."""
    if ctx.args.method is None and ctx.args.credential is None:
        raise InvalidInput("name the credential: --method METHOD and/or --credential ID|LABEL")
    return {
        "method": Method.parse(ctx.args.method) if ctx.args.method else None,
        "tenant": ctx.args.tenant,
        "credential": ctx.args.credential,
    }


def _attestation_text(stored: str | None) -> str:
    """What the verifier established at enrollment (not the client's backend claim)."""
    if stored is None:
        return "unknown (enrolled before attestation was recorded)"
    from .attestation import AttestationResult

    return AttestationResult.from_json(stored).summary


def _credential_rows(creds: Sequence[Any]) -> list[dict[str, Any]]:
    from . import transcript

    return [
        {
            "user": c.user,
            "tenant": c.tenant or None,
            "method": c.method.value,
            "label": c.label,
            "credential_id": transcript.credential_id(c.signing_key).hex(),
            "backend": c.backend,
            "attestation": _attestation_text(c.attestation),
            "atc": c.atc,
            "failures": c.failures,
            "locked": c.locked,
            "created": c.created,
            "last_used": c.last_used,
            "certificate_sha256": _sha256_hex(c.certificate),
            "expires": c.expires,  # offline use (hsm_auth.expiry): 0 = never
        }
        for c in creds
    ]


def _sha256_hex(data: bytes | None) -> str | None:
    import hashlib

    return None if data is None else hashlib.sha256(data).hexdigest()


def _credential_lines(rows: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{(r['tenant'] + '/' if r['tenant'] else '') + r['user']:16} {r['method']:10} "
        f"{r['label']:16} {r['credential_id'][:16]} {r['attestation']:12} atc={r['atc']} "
        f"failures={r['failures']} (claimed backend {r['backend']})"
        + (" LOCKED" if r["locked"] else "")
        + _expires_note(r["expires"])
        for r in rows
    )


def _expires_note(expires: int) -> str:
    from . import expiry

    if not expires:
        return ""
    if expiry.expired(expires, time.time()):
        return f" EXPIRED {_utc_text(expires)}"
    return f" expires {_utc_text(expires)}"


def cmd_verifier_credentials(ctx: Context) -> int:
    user = ctx.args.user or ctx.args.user_name
    if ctx.args.user and ctx.args.user_name and ctx.args.user != ctx.args.user_name:
        raise InvalidInput("give the user once (USER or --user)")
    v = ctx.verifier()
    try:
        if user:
            creds = v.credentials(user, tenant=ctx.args.tenant)
        else:
            creds = v.store.all_credentials()
            if ctx.args.tenant is not None:
                creds = [c for c in creds if c.tenant == ctx.args.tenant]
    finally:
        v.close()
    rows = _credential_rows(creds)
    ctx.emit(_credential_lines(rows) or "no credentials", {"credentials": rows})
    return 0


def cmd_verifier_revoke(ctx: Context) -> int:
    v = ctx.verifier()
    try:
        cred = v.revoke(ctx.args.user, **_credential_args(ctx))
    finally:
        v.close()
    ctx.emit(
        f"revoked {cred.method.value} {cred.label!r} for {cred.user}",
        {"revoked": True, **_credential_rows([cred])[0]},
    )
    return 0


def cmd_verifier_show(ctx: Context) -> int:
    v = ctx.verifier()
    try:
        state = v.show(ctx.args.user, recent=ctx.args.recent)
        threshold = v.identity.lockout_threshold
    finally:
        v.close()
    rows = _credential_rows(state.credentials)
    for row in rows:
        row["failures_until_lockout"] = 0 if row["locked"] else threshold - row["failures"]
    events = [r.to_dict() for r in state.recent]
    human = _credential_lines(rows)
    if events:
        human += "\nrecent events:\n" + "\n".join(r.to_json() for r in state.recent)
    ctx.emit(human, {"user": state.user, "credentials": rows, "recent": events})
    return 0


def cmd_verifier_audit(ctx: Context) -> int:
    if ctx.args.offline:
        return _verifier_audit_offline(ctx)
    v = ctx.verifier()
    try:
        records = v.store.audit_records(ctx.args.user, ctx.args.limit)
    finally:
        v.close()
    for record in records:  # JSON lines, with or without --json
        print(record.to_json(), file=ctx.out)
    return 0


# --- the offline log (hsm_auth.offline_log / offline_audit, docs/PROTOCOL.md §19) ---


def _verifier_audit_offline(ctx: Context) -> int:
    """``verifier audit --offline [--user U]``: each credential's offline log, reconciled."""
    from .offline_audit import OfflineAudit

    v = ctx.verifier()
    try:
        audit = OfflineAudit(v.store, v.identity.verifier_id)
        creds = v.store.credentials(ctx.args.user) if ctx.args.user else v.store.all_credentials()
        reports = [audit.report(c) for c in creds]
    finally:
        v.close()
    lines = []
    for r in reports:
        lines.append(
            f"{r.user} {r.method} credential {r.credential_id.hex()}: {r.entries} offline uses "
            f"logged, {len(r.submitted)} submitted, {len(r.not_submitted)} generated, not "
            "submitted" + (f" (ATC {', '.join(map(str, r.not_submitted[:20]))}"
                           f"{' ...' if len(r.not_submitted) > 20 else ''})"
                           if r.not_submitted else "")
        )
        lines += [f"  ALERT {a.code}: {a.text}" for a in r.alerts]
    ctx.emit("\n".join(lines) or "no credentials", {"offline": [r.to_json() for r in reports]})
    return 0


def cmd_log_show(ctx: Context) -> int:
    """``hsm-auth log show``: this authenticator's offline logs."""
    from .offline_log import OfflineLog

    with ctx.authenticator() as a:
        log = OfflineLog(a.directory)
        by_id = {bytes.fromhex(m.credential_id): m for m in a.enrolled if m.credential_id}
        wanted = Method.parse(ctx.args.method) if ctx.args.method else None
        rows: list[dict[str, Any]] = []
        for cid in log.credentials():
            m = by_id.get(cid)
            if wanted is not None and (m is None or m.method is not wanted):
                continue
            entries = log.entries(cid)
            rows.append({
                "credential_id": cid.hex(),
                "user": m.user if m else None,
                "method": m.method.value if m else None,
                "verifier": a.verifier_name(m.verifier_id) if m else None,
                "entries": [e.to_json() for e in entries],
                "sent": log.sent(cid) + 1,
            })
    human = []
    for row in rows:
        entries = row["entries"]
        last = f", last ATC {entries[-1]['atc']}" if entries else ""
        owner = f"{row['user']} {row['method']} at {row['verifier']}" if row["user"] else \
            "no longer enrolled"
        human.append(f"{row['credential_id']} ({owner}): {len(entries)} offline uses{last}, "
                     f"{len(entries) - min(row['sent'], len(entries))} not sent to the verifier")
    ctx.emit("\n".join(human) or "no offline use logged", {"logs": rows})
    return 0


def cmd_log_submit(ctx: Context) -> int:
    """``hsm-auth log submit --method M``: send the method's log to the online service."""
    from .agent_online import URL_ENV, service_url
    from .keystore import Authorization
    from .online_client import OnlineClient

    method = Method.parse(ctx.args.method)
    config = ctx.config()
    url = service_url(config)
    if url is None:
        raise errors.ConfigError(f"no [online] url in the config (nor {URL_ENV})")
    pin = method_pin(ctx, method)
    with ctx.authenticator() as a, pin_hint(method):
        report = OnlineClient(a, url).submit_log(
            method, auth=Authorization(pin=pin) if pin is not None else None
        )
    if report is None:
        ctx.emit("nothing new to submit", {"report": None})
        return 0
    ctx.emit(display.escape(_log_line(method.value, report), keep="\n"), {"report": report})
    return 0


def _log_line(method: str, report: dict[str, Any]) -> str:
    """A service's offline log report (docs/PROTOCOL.md §19.3) for people."""
    alerts = report.get("alerts") or []
    not_submitted = report.get("not_submitted") or []
    human = (
        f"offline log of {method}: the verifier holds {report.get('entries')} offline uses "
        f"({report.get('received')} new): {report.get('submitted')} submitted, "
        f"{len(not_submitted)} generated, not submitted"
    )
    return human + "".join(f"\nALERT {a.get('code')}: {a.get('text')}" for a in alerts[:50]
                           if isinstance(a, dict))


# --- the online service (hsm_auth.service; imported only by these commands) ---


def _rate_arg(text: str) -> tuple[float, int]:
    """``RATE[/BURST]``: requests per second and the bucket's size (0: no limit)."""
    rate_text, _, burst_text = text.partition("/")
    try:
        rate = float(rate_text)
        burst = int(burst_text) if burst_text else max(1, int(rate * 2))
    except (ValueError, OverflowError):  # OverflowError: a rate of 1e400 (inf)
        raise argparse.ArgumentTypeError("takes RATE[/BURST], e.g. 5/20 (0: no limit)") from None
    if not (0 <= rate <= 1e6 and 1 <= burst <= 10**7):
        raise argparse.ArgumentTypeError("RATE is 0..10^6 per second, BURST 1..10^7")
    return rate, burst


def _service_settings(ctx: Context) -> Any:
    from .service.context import ServiceSettings

    args = ctx.args
    address_rate, address_burst = args.rate_address
    user_rate, user_burst = args.rate_user
    directory = Path(args.verifier) if args.verifier else ctx.paths.verifier_dir
    return ServiceSettings(
        verifier_dir=directory,
        database=ctx.verifier_database(),
        hsm=ctx.verifier_hsm(),
        workers=args.workers,
        max_body=args.max_body,
        address_rate=address_rate,
        address_burst=address_burst,
        user_rate=user_rate,
        user_burst=user_burst,
    )


def cmd_serve(ctx: Context) -> int:
    try:
        from .service import server
    except ImportError as e:
        raise errors.ConfigError(
            f"the service needs the 'service' extra ({e.name} is missing): "
            "pip install 'hsm-auth[service]'"
        ) from None
    args = ctx.args
    listen = server.parse_listen(args.listen)

    def announce(url: str) -> None:
        print(f"hsm-auth: serving on {url}", file=ctx.err, flush=True)

    server.serve(
        _service_settings(ctx),
        listen,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        access_log=args.access_log,
        proxy_headers=args.proxy_headers,
        forwarded_allow_ips=args.forwarded_allow_ips,
        announce=announce,
    )
    return 0


def _add_serve_command(add: Callable[..., argparse.ArgumentParser], sub: Any) -> None:
    p = add(sub, "serve", cmd_serve, "run the online verifier (HTTP API, see README)")
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:8080; port 0: any free port)")
    p.add_argument("--verifier", metavar="DIR",
                   help="the verifier's directory (default: the one under --home)")
    p.add_argument("--database", "--db", dest="db", metavar="DSN",
                   help="postgresql://… or a SQLite file (default: as for `verifier`; a DSN "
                   "with a password belongs in HSM_AUTH_VERIFIER_DATABASE, not argv)")
    p.add_argument("--hsm", metavar="URI", help="pkcs11: URI of the verifier's keys' token")
    p.add_argument("--workers", type=count_arg(64), default=1,
                   help="worker processes (default 1; more than 1 needs PostgreSQL)")
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate chain")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    p.add_argument("--max-body", type=count_arg(16 * 1024 * 1024), default=64 * 1024,
                   metavar="BYTES", help="largest request body (default 65536; larger: 413)")
    p.add_argument("--rate-address", type=_rate_arg, default=(200.0, 400), metavar="RATE/BURST",
                   help="requests per second per client address, per worker (default 200/400;"
                   " 0: no limit)")
    p.add_argument("--rate-user", type=_rate_arg, default=(5.0, 20), metavar="RATE/BURST",
                   help="requests per second per user name, per worker (default 5/20)")
    p.add_argument("--proxy-headers", action="store_true",
                   help="take the client address from X-Forwarded-For (behind a reverse proxy)")
    p.add_argument("--forwarded-allow-ips", metavar="IPS",
                   help="the proxies trusted for --proxy-headers (default 127.0.0.1)")
    p.add_argument("--access-log", action="store_true",
                   help="log one line per request (paths, never bodies or headers)")


def _api_key_row(record: Any) -> dict[str, Any]:
    return {
        "key_id": record.key_id,
        "label": record.label,
        "scopes": list(record.scopes),
        "created": record.created,
        "revoked": record.revoked,
    }


def cmd_api_key_create(ctx: Context) -> int:
    from . import api_keys

    v = ctx.verifier()
    try:
        issued = api_keys.create(
            v.store, ctx.args.label, ctx.args.scope or (), now=int(time.time())
        )
    finally:
        v.close()
    # The key itself goes to stdout once, and nowhere else (no log, no file).
    ctx.emit(issued.key, {**_api_key_row(issued.record), "key": issued.key})
    print(
        f"API key {issued.record.key_id} ({','.join(issued.record.scopes)}) created: "
        "it is shown only this once",
        file=ctx.err,
    )
    return 0


def cmd_api_key_list(ctx: Context) -> int:
    v = ctx.verifier()
    try:
        records = v.store.api_keys()
    finally:
        v.close()
    rows = [_api_key_row(r) for r in records]
    lines = [
        f"{r['key_id']}  {','.join(r['scopes']):<32} "
        f"{'revoked ' + _utc_text(r['revoked']) if r['revoked'] else 'active'}  {r['label']}"
        for r in rows
    ]
    ctx.emit("\n".join(lines) or "no API keys", {"api_keys": rows})
    return 0


def cmd_api_key_revoke(ctx: Context) -> int:
    from . import api_keys

    v = ctx.verifier()
    try:
        api_keys.revoke(v.store, ctx.args.key_id, now=int(time.time()))
    finally:
        v.close()
    ctx.emit(f"API key {ctx.args.key_id} revoked", {"revoked": ctx.args.key_id})
    return 0


def _add_api_key_commands(
    add: Callable[..., argparse.ArgumentParser], vsub: Any, common: Any, vopt: Any,
    only: Collection[str] | None,
) -> None:
    if only is not None and "api-key" not in only:
        return
    ap = vsub.add_parser("api-key", help="API keys of the online service (hsm-auth serve)",
                         parents=[common])
    asub = ap.add_subparsers(dest="api_key_command", required=True, metavar="COMMAND")
    p = add(asub, "create", cmd_api_key_create,
            "make an API key (printed once, to stdout) for the service provider's backend",
            [vopt])
    p.add_argument("--label", type=text_arg, required=True, help="what the key is for")
    p.add_argument("--scope", action="append", choices=("enroll", "verify", "challenge", "admin"),
                   help="a scope the key has (repeat for several)")
    add(asub, "list", cmd_api_key_list, "list API keys (ids, labels, scopes; never a secret)",
        [vopt])
    p = add(asub, "revoke", cmd_api_key_revoke, "revoke an API key: refused from now on", [vopt])
    p.add_argument("key_id", help="the key's id (16 hex digits, from `api-key list`)")


def method_pin(ctx: Context, method: Method, prompt: str = "Offline PIN: ") -> str | None:
    """The PIN for ``method``: read for the pin method; for the others a PIN option is
    refused rather than ignored (it would never reach the token: their token PIN, if
    any, comes from the configuration, so that every command finds it)."""
    refuse_unused_pin_options(ctx, method)
    return read_pin(ctx.args, ctx.err, prompt) if method.needs_pin else None


def refuse_unused_pin_options(ctx: Context, method: Method) -> None:
    """Refuse ``--pin-file``/``--pin-fd`` for a method that asks for no PIN."""
    if method.needs_pin:
        return
    if getattr(ctx.args, "pin_file", None) or getattr(ctx.args, "pin_fd", None) is not None:
        raise InvalidInput(
            f"--pin-file/--pin-fd are for the pin method only; the {method.value} method asks "
            f"for no PIN (a PKCS#11 token's user PIN comes from pin-source=file:PATH in the "
            f"uri of [methods.{method.value}] in config.toml)"
        )


@contextlib.contextmanager
def pin_hint(method: Method) -> Iterator[None]:
    """Say which option or config key gives the PIN a token asked for."""
    if method is Method.PIN:
        where = "give the offline PIN at the prompt, with --pin-file PATH or with --pin-fd N"
    elif method is Method.DEVICE:
        where = (
            "set pin-source=file:PATH (a 0600 file holding the token's user PIN) in the uri "
            "of [methods.device] in config.toml"
        )
    else:  # FIDO2: the backend's message names the authenticator PIN setting itself
        yield
        return
    try:
        yield
    except PinRequired as e:
        raise PinRequired(f"{e}: {where}") from None


def read_activation_code(ctx: Context) -> str:
    """The offer's activation code from ``--activation-code-file`` (a private file) or
    the terminal (never from argv), checked for typos at once."""
    from . import activation, files

    if ctx.args.activation_code_file:
        data = files.read_secret_file(ctx.args.activation_code_file, "the activation code file")
        try:
            typed = data.decode("ascii").strip()
        except UnicodeDecodeError:
            raise activation.ActivationCodeTypo(
                "the activation code file does not hold an activation code"
            ) from None
    else:
        try:
            tty = open("/dev/tty")  # noqa: SIM115 - closed below
        except OSError:
            raise InvalidInput(
                "no terminal to ask for the activation code; use --activation-code-file PATH"
            ) from None
        with tty:
            print("Activation code (from the verifier, e.g. XXXX-XXXX-XXXX): ", end="",
                  file=ctx.err, flush=True)
            typed = tty.readline(256).strip()
    return activation.normalize(typed)  # a typo stops here, before any PIN or key


def cmd_enroll(ctx: Context) -> int:
    method = Method.parse(ctx.args.method)
    offer = read_text_arg(ctx.args.offer, sys.stdin)
    from .enrollment_messages import EnrollmentOffer

    EnrollmentOffer.from_text(offer)  # a bad offer, or a PIN option for no PIN, is told
    refuse_unused_pin_options(ctx, method)  # before the activation code is asked for
    code = read_activation_code(ctx)
    # The pin method uses the token's existing user PIN (PKCS#11) or sets the TPM keys'
    # auth value: either way the PIN given now is the one every OTP will ask for.
    pin = method_pin(
        ctx, method, "Offline PIN (PKCS#11: the token's user PIN; TPM2: the PIN for the new keys): "
    )
    with ctx.authenticator() as a, pin_hint(method):
        text = a.add_or_update(
            method, offer, activation_code=code, pin=pin, replace=ctx.args.replace,
            token=ctx.args.token,
        )
    print(f"enrolled the {method.value} method; give this response to the verifier:", file=ctx.err)
    ctx.emit(text, {"response": text, "method": method.value})
    return 0


def _request_lines(request: OfflineRequest) -> list[str]:
    """What the user approves: verifier, user (and tenant), context, then the
    transaction's ``label: value`` lines and whether data is to be entered (§17)."""
    from . import transaction

    tenant = f" (tenant {request.tenant})" if request.tenant else ""
    lines = [
        f"Verifier: {request.verifier_name}",
        f"User:     {request.user}{tenant}",
        f"Context:  {request.context}",
    ]
    lines += [f"          {line}" for line in transaction.lines(request.transaction)]
    if request.user_data:
        lines.append(f"Data:     enter up to {request.user_data} characters (finish --data)")
    return lines


def _show_request(ctx: Context, request: OfflineRequest) -> None:
    for line in _request_lines(request):
        print(line, file=ctx.err)


def _user_data_arg(value: str | None) -> str | None:
    """``--data``: the text itself, or ``@FILE`` (its content; surrounding white space
    is not part of the data, docs/PROTOCOL.md §17)."""
    if value is None or not value.startswith("@"):
        return value
    return _read_text_file(value[1:])


def cmd_start(ctx: Context) -> int:
    with ctx.authenticator() as a:
        request = a.start_offline_authentication(read_text_arg(ctx.args.data, sys.stdin))
    machine: dict[str, Any] = {
        "verifier": request.verifier_name,
        "user": request.user,
        "context": request.context,
        "methods": [m.value for m in request.methods],
        "expires": request.expires,
    }
    if request.tenant is not None:
        machine["tenant"] = request.tenant
    if request.transaction is not None:
        machine["transaction"] = [list(pair) for pair in request.transaction]
    if request.user_data:
        machine["user_data"] = request.user_data
    lines = [*_request_lines(request), f"Methods:  {', '.join(m.value for m in request.methods)}"]
    ctx.emit("\n".join(lines), machine)
    return 0


def cmd_finish(ctx: Context) -> int:
    method = Method.parse(ctx.args.method)
    refuse_unused_pin_options(ctx, method)  # before the request is shown: one error line
    with ctx.authenticator() as a:
        text = read_text_arg(ctx.args.data, sys.stdin)
        request = a.start_offline_authentication(text)
        _check_account(request, ctx.args.user)
        _show_request(ctx, request)
        entered = _user_data_arg(ctx.args.user_data)  # read once: the agent's or ours
        # The agent, where the policy caches (it picks the first present token: a token
        # named with --token is used here).
        if method.needs_pin and not ctx.args.no_agent and ctx.args.token is None:
            from . import agent_cli

            with pin_hint(method):
                held = agent_cli.finish_via_agent(
                    ctx, text, method.value, data=entered, prompt=ctx.args.prompt
                )
            if held is not None:
                ctx.emit(held["otp"], {"otp": held["otp"], "method": method.value,
                                       "atc": held["atc"], "agent": True,
                                       "pin_asked": not held.get("held")})
                return 0
        pin = method_pin(ctx, method)
        with pin_hint(method):
            result = a.finish_offline_authentication(
                request, method, pin=pin, token=ctx.args.token, data=entered,
                prompt=ctx.args.prompt,
            )
    ctx.emit(
        result.otp,
        {"otp": result.otp, "method": method.value, "atc": result.atc, "token": result.token},
    )
    return 0


def _check_account(request: OfflineRequest, account: str | None) -> None:
    """finish --user: the code must be for that user (``USER`` or ``TENANT/USER``)."""
    if account is None:
        return
    from . import enrollments

    tenant = enrollments.offer_tenant(request.data)
    if account not in (request.user, enrollments.account(tenant, request.user)):
        raise errors.UnknownMethod(
            f"this code is for {enrollments.account(tenant, request.user)!r}, not {account!r}"
        )


def cmd_sync(ctx: Context) -> int:
    """The ATC resync (docs/PROTOCOL.md §10, §18): answer a sync message with the
    token's report, take the verifier's acknowledgement, or (``--online``) both
    through the online service."""
    if ctx.args.online:
        return _sync_online(ctx)
    if ctx.args.method is not None:
        raise InvalidInput("--method goes with --online (a sync message names its method)")
    text = read_text_arg(ctx.args.data, sys.stdin)
    from .protocol import MessageType, message_kind

    if message_kind(textcode.decode(text)) is MessageType.ATC_ACK:
        with ctx.authenticator() as a:
            updated = a.apply_sync_ack(text)
        ctx.emit(
            f"synced {updated.method.value}: offline use counts from ATC {updated.synced_atc}",
            {"method": updated.method.value, "synced_atc": updated.synced_atc},
        )
        return 0
    from .sync_messages import SyncMessage

    method = SyncMessage.from_text(text)[0].method  # signature checked by sync()
    pin = method_pin(ctx, method)
    with ctx.authenticator() as a, pin_hint(method):
        result = a.sync(text, pin=pin)
    print(
        f"{method.value}: the token reports ATC {result.atc} "
        f"({result.unsubmitted} OTPs were never submitted); give this report to the verifier "
        "(hsm-auth verifier sync-report) and its acknowledgement to hsm-auth sync: offline "
        "use counts from the old ATC until then",
        file=ctx.err,
    )
    ctx.emit(
        result.report,
        {
            "method": method.value,
            "atc": result.atc,
            "synced_atc": result.method.synced_atc,
            "unsubmitted": result.unsubmitted,
            "report": result.report,
        },
    )
    return 0


def _sync_online(ctx: Context) -> int:
    """``sync --online``: each method (or ``--method``) through the service at the
    [online] url, with signed requests; the acknowledgement resets the offline count."""
    from .agent_online import URL_ENV, online_verifier, service_url
    from .errors import ConfigError, UnknownMethod
    from .keystore import Authorization
    from .online_client import OnlineClient

    if ctx.args.data is not None:
        raise InvalidInput("sync --online takes no message: the service sends it")
    config = ctx.config()
    url = service_url(config)
    if url is None:
        raise ConfigError(f"no [online] url in the config (nor {URL_ENV}): where is the service?")
    lines: list[str] = []
    done: list[dict[str, Any]] = []
    with ctx.authenticator() as a:
        verifier_id = online_verifier(a, config)
        enrolled = [m.method for m in a.enrolled
                    if m.verifier_id == verifier_id and m.credential_id]
        if verifier_id is None or not enrolled:
            raise UnknownMethod("no method is enrolled here for the online verifier")
        methods = [Method.parse(ctx.args.method)] if ctx.args.method else [
            m for m in Method if m in enrolled
        ]
        client = OnlineClient(a, url, verifier_id=verifier_id)
        for method in methods:
            pin = method_pin(ctx, method)
            with pin_hint(method):
                synced = client.sync(
                    method, auth=None if pin is None else Authorization(pin=pin)
                )
                # The offline logs at this online contact (docs/PROTOCOL.md §19.3).
                logs = client.submit_logs(
                    method, auth=None if pin is None else Authorization(pin=pin)
                )
            lines.append(
                f"synced {method.value}: the token reported ATC {synced.atc} "
                f"({synced.unsubmitted} OTPs were never submitted); offline use counts "
                f"from ATC {synced.synced_atc}"
            )
            lines += [_log_line(m, r) for m, r in logs.items()]
            done.append({"method": method.value, "atc": synced.atc,
                         "unsubmitted": synced.unsubmitted, "synced_atc": synced.synced_atc,
                         "offline_logs": logs})
    ctx.emit(display.escape("\n".join(lines), keep="\n"), {"synced": done})
    return 0


def cmd_renew(ctx: Context) -> int:
    """Renew a method's offline expiry at the online service (docs/PROTOCOL.md §20)."""
    from .agent_online import URL_ENV, service_url
    from .keystore import Authorization
    from .online_client import OnlineClient

    method = Method.parse(ctx.args.method)
    pin = method_pin(ctx, method, "Offline PIN (to sign the renewal in the token): ")
    url = ctx.args.url or service_url(ctx.config())
    if not url:
        raise errors.ConfigError(
            f"no online service to renew at: give --url, or set [online] url in config.toml "
            f"or {URL_ENV}"
        )
    with ctx.authenticator() as a, pin_hint(method):
        auth = Authorization(pin=pin, interaction=ctx.interaction)
        updated = OnlineClient(a, url).renew(method, auth=auth)
    row = _method_row(updated)
    print(f"renewed the {method.value} method: {_expiry_text(row)}", file=ctx.err)
    ctx.emit(_method_lines(row), row)
    return 0


def _certificate_summary(pem: str) -> dict[str, Any] | None:
    """What ``methods`` shows of a stored device certificate (None: none stored)."""
    if not pem:
        return None
    from cryptography import x509

    from . import device_ca

    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise errors.StateError("credentials.json holds a malformed certificate") from None
    return {**device_ca.summary(cert).to_json(), "pem": pem}


def _utc_text(timestamp: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(timestamp))


def _expiry_text(row: dict[str, Any]) -> str:
    """How long the method may be used offline, in words (``methods``, ``renew``)."""
    expires = row["offline_expires"]
    if not expires:
        return "offline use never expires"
    if row["expired"]:
        return f"offline use expired on {_utc_text(expires)} (hsm-auth renew)"
    return f"offline use until {_utc_text(expires)}"


def _method_lines(row: dict[str, Any]) -> str:
    line = f"{row['user']:16} {row['method']:10} {row['backend']}"
    if row["token"]:
        line += f"  token {row['token']!r}"
    if row["credential_id"]:
        line += f"  credential {row['credential_id'][:16]}"
    line += f"\n  {_expiry_text(row)}"
    cert = row["certificate"]
    if cert is None:
        return line + "  (no certificate: hsm-auth certificate RESULT stores it)"
    return (
        f"{line}\n  certificate: {cert['subject']}\n  issuer:      {cert['issuer']}\n"
        f"  valid:       {_utc_text(cert['not_before'])} to {_utc_text(cert['not_after'])}\n"
        f"  sha256:      {cert['fingerprint']}\n  attestation: {cert['attestation'] or '-'}"
    )


def _method_row(m: Any) -> dict[str, Any]:
    """What ``methods``, ``certificate`` and ``renew`` show of an enrolled method."""
    from . import expiry

    return {"user": m.user, "method": m.method.value, "backend": m.backend,
            "synced_atc": m.synced_atc, "token": m.token_label, "credential_id": m.credential_id,
            "offline_expires": m.offline_expires,
            "expired": expiry.expired(m.offline_expires, time.time()),
            "certificate": _certificate_summary(m.certificate)}


def cmd_methods(ctx: Context) -> int:
    a = ctx.authenticator()
    rows = [_method_row(m) for m in a.enrolled]
    ctx.emit("\n".join(map(_method_lines, rows)) or "nothing enrolled", {"methods": rows})
    return 0


def cmd_tpm_register(ctx: Context) -> int:
    method = Method.parse(ctx.args.method)
    with ctx.authenticator() as a:
        text = a.tpm_registration_request(method)
    print("give this request to the verifier (hsm-auth verifier tpm-challenge):", file=ctx.err)
    ctx.emit(text, {"request": text, "method": method.value})
    return 0


def cmd_tpm_activate(ctx: Context) -> int:
    method = Method.parse(ctx.args.method)
    with ctx.authenticator() as a:
        a.tpm_activate(read_text_arg(ctx.args.challenge, sys.stdin), method)
    ctx.emit(
        "the TPM is registered: its enrollments now carry an attestation this verifier checks",
        {"registered": True, "method": method.value},
    )
    return 0


def cmd_certificate(ctx: Context) -> int:
    with ctx.authenticator() as a:
        updated = a.store_result(read_text_arg(ctx.args.result, sys.stdin))
    row = _method_row(updated)
    print(f"stored the verifier's certificate for the {updated.method.value} method", file=ctx.err)
    ctx.emit(_method_lines(row), row)
    return 0


def _keys_pin(ctx: Context) -> str | None:
    """A PIN only when one is given: most tokens list their keys without one."""
    if getattr(ctx.args, "pin_file", None) or getattr(ctx.args, "pin_fd", None) is not None:
        return read_pin(ctx.args, ctx.err)
    return None


def _key_rows(keys: Sequence[Any]) -> list[dict[str, Any]]:
    return [
        {
            "backend": k.backend,
            "state": k.state.value,
            "kind": k.kind.value,
            "label": k.label,
            "uri": k.uri,
        }
        for k in keys
    ]


def _key_lines(rows: list[dict[str, Any]]) -> list[str]:
    return [f"{r['state']:9} {r['backend']:7} {r['kind']:9} {r['label']}" for r in rows]


def _report_unreachable(ctx: Context, unreachable: Sequence[tuple[str, str]]) -> None:
    if not ctx.args.json:
        for backend, reason in unreachable:
            print(f"hsm-auth: not listed ({backend}): {reason}", file=ctx.err)


def cmd_keys_list(ctx: Context) -> int:
    with ctx.authenticator() as a:
        report = a.keys(pin=_keys_pin(ctx))
    rows = _key_rows(report.keys)
    lines = _key_lines(rows) or ["no hsm-auth keys in the configured tokens"]
    if report.orphans:
        lines.append(f"{len(report.orphans)} orphaned (hsm-auth keys prune removes them)")
    _report_unreachable(ctx, report.unreachable)
    ctx.emit(
        "\n".join(lines),
        {
            "keys": rows,
            "orphans": len(report.orphans),
            "unreachable": [{"backend": b, "reason": r} for b, r in report.unreachable],
        },
    )
    return 0


def cmd_keys_prune(ctx: Context) -> int:
    pin = _keys_pin(ctx)
    with ctx.authenticator() as a:
        if ctx.args.yes:
            report = a.prune_orphans(pin=pin, unclaimed=ctx.args.unclaimed)
            victims = report.keys
        else:  # a dry run: what --yes would delete now
            report = a.keys(pin=pin)
            doomed = {"orphan", "unclaimed"} if ctx.args.unclaimed else {"orphan"}
            victims = tuple(k for k in report.keys if k.state.value in doomed)
    rows = _key_rows(victims)
    if ctx.args.yes:
        human = "\n".join([f"deleted {len(rows)} keys", *_key_lines(rows)])
    elif rows:
        human = "\n".join(
            [f"would delete {len(rows)} keys:", *_key_lines(rows), "run again with --yes"]
        )
    else:
        human = "nothing to delete"
    _report_unreachable(ctx, report.unreachable)
    ctx.emit(
        human,
        {
            "deleted" if ctx.args.yes else "would_delete": rows,
            "dry_run": not ctx.args.yes,
            "unreachable": [{"backend": b, "reason": r} for b, r in report.unreachable],
        },
    )
    return 0


def cmd_token_init(ctx: Context) -> int:
    from . import tokens

    method = Method.parse(ctx.args.method)
    if ctx.args.softhsm is not None:
        pin = None
        if method is Method.PIN:
            pin = read_pin(ctx.args, ctx.err, "Offline PIN for the new token (its user PIN): ")
        elif ctx.args.pin_file or ctx.args.pin_fd is not None:
            raise InvalidInput(
                "--pin-file/--pin-fd are for --method pin; the device token's user PIN is "
                "generated into a 0600 file that its pin-source names"
            )
        result = tokens.init_softhsm(
            ctx.paths, ctx.args.softhsm, method, pin=pin, replace=ctx.args.replace
        )
        what = f"SoftHSM token {ctx.args.softhsm!r}"
    else:
        if ctx.args.pin_file or ctx.args.pin_fd is not None:
            raise InvalidInput(
                "--pin-file/--pin-fd are for --softhsm --method pin; a TPM key's PIN is "
                "set when the method is enrolled"
            )
        result = tokens.init_swtpm(
            ctx.paths, Path(ctx.args.swtpm), method, replace=ctx.args.replace
        )
        what = f"swtpm in {ctx.args.swtpm}"
    for note in result.notes:
        print(f"note: {note}", file=ctx.err)
    ctx.emit(
        f"{what} serves the {method.value} method; [methods.{method.value}] written to "
        f"{result.config_file}",
        {
            "method": method.value,
            "backend": result.backend,
            "settings": dict(result.settings),
            "environment": dict(result.environment),
            "config": str(result.config_file),
        },
    )
    return 0


def cmd_token_stop(ctx: Context) -> int:
    from . import tokens

    stopped = tokens.stop_swtpm(Path(ctx.args.swtpm))
    ctx.emit(
        f"swtpm in {ctx.args.swtpm} {'stopped' if stopped else 'was not running'}",
        {"stopped": stopped},
    )
    return 0


def cmd_token_udev_rules(ctx: Context) -> int:
    from . import tokens

    print(tokens.udev_rules(), end="", file=ctx.out)
    return 0


def cmd_demo(ctx: Context) -> int:
    from .demo import run_demo

    try:
        return run_demo(ctx.paths, out=ctx.out, err=ctx.err, as_json=ctx.args.json)
    except RuntimeError as e:  # how the emulator fixtures (swtpm, softhsm2-util) fail
        raise errors.BackendUnavailable(f"the demo could not start its emulators: {e}") from None


# --- workstation login (hsm_auth.login) -----------------------------------------


def _login_authdir(ctx: Context, cfg: configmod.Config) -> Path:
    from .login import DEFAULT_AUTHDIR

    if ctx.args.authdir:
        return Path(ctx.args.authdir)
    table = cfg.raw.get("login", {})
    if not isinstance(table, dict):
        return DEFAULT_AUTHDIR
    return Path(table.get("authdir", DEFAULT_AUTHDIR))


def cmd_login_enroll(ctx: Context) -> int:
    from .login import AuthDir, enroll

    method = Method.parse(ctx.args.method)
    cfg = ctx.config()
    pin = read_pin(ctx.args, ctx.err, "Login PIN: ") if method.needs_pin else None
    with AuthDir(_login_authdir(ctx, cfg), create=True) as authdir:
        cred = enroll(
            authdir,
            ctx.args.user,
            method,
            cfg,
            pin=pin,
            replace_existing=ctx.args.replace,
            warn=lambda m: print(m, file=ctx.err),
            interaction=ctx.interaction,
            add=ctx.args.add,
        )
    ctx.emit(
        f"enrolled {ctx.args.user} for login with {method.value} ({cred.backend})",
        {
            "user": ctx.args.user,
            "method": method.value,
            "backend": cred.backend,
            "counter": cred.counter,
        },
    )
    return 0


def cmd_login_check(ctx: Context) -> int:
    from .login import AuthDir, login

    cfg = ctx.config()
    method = Method.parse(ctx.args.method) if ctx.args.method else None
    with AuthDir(_login_authdir(ctx, cfg)) as authdir:
        creds = authdir.read(ctx.args.user) or []
        needs_pin = any(c.method.needs_pin for c in creds if method in (None, c.method))
        pin = read_pin(ctx.args, ctx.err, "Login PIN: ") if needs_pin else None
        result = login(
            authdir,
            ctx.args.user,
            pin=pin,
            method=method,
            warn=lambda m: print(m, file=ctx.err),
            interaction=ctx.interaction,
            config=cfg,
        )
    ctx.emit(
        f"login ok: {result.user} with {result.method.value} (counter {result.counter})",
        {"user": result.user, "method": result.method.value, "counter": result.counter},
    )
    return 0



# --- the agent (hsm_auth.agent_cli holds these commands; imported when one runs) --------


def cmd_agent(ctx: Context) -> int:
    from . import agent_cli

    return agent_cli.cmd_agent(ctx)


def cmd_challenges(ctx: Context) -> int:
    from . import agent_cli

    return agent_cli.cmd_challenges(ctx)


def cmd_approve(ctx: Context) -> int:
    from . import agent_cli

    return agent_cli.cmd_approve(ctx)


def cmd_reject(ctx: Context) -> int:
    from . import agent_cli

    return agent_cli.cmd_reject(ctx)


def cmd_claim(ctx: Context) -> int:
    from . import agent_cli

    return agent_cli.cmd_claim(ctx)


def add_agent_commands(add: Callable[..., argparse.ArgumentParser], sub: Any, pin: Any) -> None:
    """``agent``, ``challenges``, ``approve``, ``reject``, ``claim``."""
    sock = _Parser(add_help=False)
    sock.add_argument(
        "--socket", metavar="PATH",
        help="the agent's socket (default: $HSM_AUTH_AGENT_SOCKET, else "
        "$XDG_RUNTIME_DIR/hsm-auth/agent.sock)",
    )
    p = add(sub, "agent", cmd_agent, "run the agent: polls online verifiers for push "
            "challenges, answers them, holds the PIN cache (see README, The agent)", [sock])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--status", action="store_true", help="show a running agent's state")
    what.add_argument("--lock", action="store_true", help="wipe a running agent's PIN cache")
    what.add_argument(
        "--install-unit", action="store_true",
        help="write the systemd user unit hsm-auth-agent.service (ExecStart: this hsm-auth)",
    )
    p.add_argument("--unit-dir", metavar="DIR",
                   help="with --install-unit: where (default ~/.config/systemd/user)")
    add(sub, "challenges", cmd_challenges, "list the challenges the agent holds", [sock])
    for name, func, verb in (("approve", cmd_approve, "approve"), ("reject", cmd_reject, "reject")):
        p = add(sub, name, func, f"{verb} a challenge (signed in the token)", [sock, pin])
        p.add_argument("id", type=text_arg, help="the challenge id (hsm-auth challenges)")
        p.add_argument("--method", type=text_arg,
                       help="answer with this enrolled method (default: the one that received it)")
    p = add(sub, "claim", cmd_claim,
            "claim a QR challenge: show its context (IP, browser, location, data), then "
            "approve or reject it", [sock, pin])
    p.add_argument("claim", nargs="?", help="the QR code's text, @FILE, or - for stdin (default)")
    p.add_argument("--method", type=text_arg, help="claim with this enrolled method")
    decide = p.add_mutually_exclusive_group()
    decide.add_argument("--approve", action="store_true", help="approve without asking")
    decide.add_argument("--reject", action="store_true", help="reject without asking")

# --- parser -----------------------------------------------------------------


def _columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size()`` finds it: ``COLUMNS``,
    else the width of the terminal on stdout, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, given the width it would ask shutil for: importing
    shutil (with bz2 and lzma) costs every command 2 ms of start-up."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        super().__init__(
            prog, indent_increment, max_help_position, _columns() - 2 if width is None else width
        )


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser with :class:`_Formatter` unless told otherwise, held to the
    CLI's contract: an error is one ``hsm-auth: error:`` line and exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        line = f"hsm-auth: error: {message} (see {self.prog} --help)"  # may quote argv
        self.exit(2, display.escape(line, keep="") + "\n")


class _Partial(Exception):
    """A parser built for some commands only cannot answer: build them all."""


class _PartialParser(_Parser):
    """The parser :func:`build_parser` makes with ``only``: it answers only a
    command line that parses without error or help; anything else goes to the
    whole parser, so that messages, usage and help are exactly its own."""

    def error(self, message: str) -> NoReturn:
        raise _Partial(message)

    def print_help(self, file: Any = None) -> None:
        raise _Partial("help")


class _Skipped(argparse.ArgumentParser):
    """Stands in for the parser of a command that a partial parser leaves out:
    what is added to it is dropped."""

    def __init__(self) -> None:  # nothing of ArgumentParser is used
        pass

    def add_argument(self, *args: Any, **kwargs: Any) -> Any:
        return None

    def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:
        return self

    def add_mutually_exclusive_group(self, *args: Any, **kwargs: Any) -> Any:
        return self

    def add_subparsers(self, *args: Any, **kwargs: Any) -> Any:
        return self

    def add_parser(self, *args: Any, **kwargs: Any) -> Any:
        return self

    def set_defaults(self, *args: Any, **kwargs: Any) -> None:
        pass


def _command_words(argv: Sequence[str]) -> set[str]:
    """The first two words of ``argv`` past the global options (the command and,
    for a group such as ``verifier``, its sub-command); empty when unsure."""
    words: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in ("--json", "--debug"):
            continue
        if arg == "--home":
            next(args, None)
            continue
        if arg.startswith("--home="):
            continue
        if arg.startswith("-") or len(words) == 2:
            break
        words.append(arg)
    return set(words)


def parse_command_line(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``build_parser().parse_args(argv)``, building only the parsers of the
    command ``argv`` names when that parses: building all of them is a tenth of
    the start-up time of ``hsm-auth start`` (``bench/startup.py``)."""
    words = _command_words(sys.argv[1:] if argv is None else argv)
    if words:
        try:
            return build_parser(only=words).parse_args(argv)
        except _Partial:
            pass
    return build_parser().parse_args(argv)


def build_parser(only: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The command line. With ``only``, a :class:`_PartialParser` holding just
    the commands named there (and the groups): see :func:`parse_command_line`."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--version", action=_VersionAction, help="print the installed version and exit"
    )
    common.add_argument(
        "--home", default=argparse.SUPPRESS, help="keep all state under DIR (or HSM_AUTH_HOME)"
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and logs"
    )

    pin = _Parser(add_help=False)
    pin.add_argument("--pin-file", metavar="PATH", help="read the PIN from this file")
    pin.add_argument(
        "--pin-fd", metavar="FD", type=int, help="read the PIN from this file descriptor"
    )

    parser = (_Parser if only is None else _PartialParser)(
        prog="hsm-auth",
        description=DESCRIPTION,
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        parent: Any,
        name: str,
        func: Callable[[Context], int],
        help_text: str,
        parents: Sequence[Any] = (),
    ) -> argparse.ArgumentParser:
        if only is not None and (name not in only or isinstance(parent, _Skipped)):
            return _Skipped()
        p: argparse.ArgumentParser = parent.add_parser(
            name,
            help=help_text,
            description=help_text,
            parents=[common, *parents],
            epilog=EXIT_CODES,
            formatter_class=_Formatter,
        )
        p.set_defaults(func=func)
        return p

    def group(name: str, help_text: str) -> argparse.ArgumentParser:
        """A command with sub-commands (``verifier``, ``login``, …)."""
        if only is not None and name not in only:
            return _Skipped()
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, parents=[common])
        return p

    add(sub, "demo", cmd_demo, DEMO_HELP)
    add(sub, "backends", cmd_backends, "list backends and why any is unavailable")
    add(sub, "methods", cmd_methods, "list the methods enrolled on this authenticator")
    p = add(
        sub,
        "certificate",
        cmd_certificate,
        "store the certificate from the verifier's enrollment result (`verifier enroll` prints it)",
    )
    p.add_argument("result", nargs="?", help="the result text, @FILE, or - for stdin (default)")

    tp = group("tpm", "register the TPM's attestation key with a verifier")
    tsub = tp.add_subparsers(dest="tpm_command", required=True, metavar="COMMAND")
    for name, func, help_text in (
        ("register", cmd_tpm_register,
         "print a registration request: the TPM's EK certificate and attestation key"),
        ("activate", cmd_tpm_activate,
         "open the verifier's challenge in the TPM (credential activation)"),
    ):
        p = add(tsub, name, func, help_text)
        p.add_argument(
            "--method", type=text_arg, default="device",
            help="the method whose TPM it is (device or pin; default device)",
        )
        if name == "activate":
            p.add_argument(
                "challenge", nargs="?", help="the challenge text, @FILE, or - for stdin (default)"
            )

    kp = group("keys", "hsm-auth keys in tokens; orphans")
    ksub = kp.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    add(
        ksub,
        "list",
        cmd_keys_list,
        "list the keys with hsm-auth labels in the configured tokens: enrolled, orphan "
        "(left by an enrollment that was killed or failed) or unclaimed (not made here)",
        [pin],
    )
    p = add(
        ksub,
        "prune",
        cmd_keys_prune,
        "delete orphaned keys (shows what it would delete unless --yes is given)",
        [pin],
    )
    p.add_argument("--yes", action="store_true", help="delete them (default: only show them)")
    p.add_argument(
        "--unclaimed",
        action="store_true",
        help="also delete unclaimed keys (careful: another hsm-auth home on the same token "
        "may use them)",
    )

    p = add(sub, "enroll", cmd_enroll, "enroll a method from a verifier's offer", [pin])
    p.add_argument("--method", type=text_arg, required=True, help=METHOD_HELP)
    p.add_argument("--offer", help="the offer text, @FILE, or - for stdin (default)")
    p.add_argument("--replace", action="store_true", help="replace an enrolled method")
    p.add_argument(
        "--token", type=text_arg, metavar="NAME",
        help="name this token (another token of an enrolled method, e.g. a backup key, "
        "needs its own name; finish --token picks it)",
    )
    p.add_argument(
        "--activation-code-file",
        metavar="PATH",
        help="a private file holding the offer's activation code (default: ask on the terminal)",
    )

    p = add(sub, "start", cmd_start, "check verification data and show its context")
    p.add_argument("data", nargs="?", help="verification data, @FILE, or - for stdin")

    p = add(sub, "finish", cmd_finish, "authenticate and print the OTP", [pin])
    p.add_argument(
        "--no-agent", action="store_true",
        help="do not use a running agent (by default the pin method goes through it when "
        "the verifier's pin_cache policy lets the agent hold the token unlocked)",
    )
    p.add_argument(
        "--socket", metavar="PATH",
        help="the agent's socket (default: $HSM_AUTH_AGENT_SOCKET, else "
        "$XDG_RUNTIME_DIR/hsm-auth/agent.sock)",
    )
    p.add_argument(
        "--method",
        type=text_arg,
        required=True,
        help=f"{METHOD_HELP}: an enrolled one that the verification data allows "
        "(`start` lists them)",
    )
    p.add_argument(
        "--data",
        dest="user_data",
        metavar="TEXT|@FILE",
        type=text_arg,
        help="the data the verifier asks you to enter (`start` says how many characters); "
        "the OTP binds it",
    )
    p.add_argument(
        "--prompt",
        type=text_arg,
        help="the text shown while the token waits for your verification (default: the "
        "method's own)",
    )
    p.add_argument(
        "--token", type=text_arg, metavar="NAME",
        help="the token to use when several of the method are enrolled (its name from "
        "enroll --token, or its credential id; default: the first one present)",
    )
    p.add_argument(
        "--user", type=text_arg, metavar="USER",
        help="refuse a code that is not for USER (or TENANT/USER): on a workstation "
        "shared by several users",
    )
    p.add_argument("data", nargs="?", help="verification data, @FILE, or - for stdin")

    p = add(
        sub,
        "sync",
        cmd_sync,
        "resync the ATC after an online login: answer a sync message (prints the report), "
        "take the verifier's acknowledgement, or --online both through the service",
        [pin],
    )
    p.add_argument("data", nargs="?",
                   help="sync message or acknowledgement, @FILE, or - for stdin")
    p.add_argument("--online", action="store_true",
                   help="through the service at [online] url (or HSM_AUTH_ONLINE_URL): "
                   "signed requests, the report, the acknowledgement")
    p.add_argument("--method", type=text_arg, help="with --online: only this method "
                   "(default: every method enrolled with that verifier)")

    p = add(
        sub,
        "renew",
        cmd_renew,
        "renew a method's offline use at the online service (a request signed in the "
        "token): stores the verifier's new expiry and certificate",
        [pin],
    )
    p.add_argument("--method", type=text_arg, required=True, help=METHOD_HELP)
    p.add_argument(
        "--url",
        type=text_arg,
        help="the online service (default: HSM_AUTH_ONLINE_URL, else [online] url in "
        "config.toml)",
    )

    vopt = _Parser(add_help=False)
    vopt.add_argument(
        "--db",
        metavar="DSN",
        help="database: postgresql://… or a SQLite file (default: [verifier] database, "
        "HSM_AUTH_VERIFIER_DATABASE, else verifier.db in the verifier's directory)",
    )
    vopt.add_argument(
        "--hsm",
        metavar="URI",
        help="pkcs11: URI of the token holding the verifier's keys (init creates them there; "
        "default: [verifier] hsm or HSM_AUTH_VERIFIER_HSM, else a 0600 key file)",
    )

    vp = group("verifier", "the verifier side")
    vsub = vp.add_subparsers(dest="verifier_command", required=True, metavar="COMMAND")

    def vadd(name: str, func: Callable[[Context], int], help_text: str) -> argparse.ArgumentParser:
        return add(vsub, name, func, help_text, [vopt])

    p = vadd("init", cmd_verifier_init, "create the verifier's identity, keys and database")
    p.add_argument(
        "--name",
        type=text_arg,
        default="hsm-auth verifier",
        help="the name authenticators show the user",
    )
    p = vadd("offer", cmd_verifier_offer, "print an enrollment offer for a user")
    p.add_argument("--user", type=text_arg, required=True, help=USER_HELP)
    p.add_argument("--tenant", type=text_arg, help=TENANT_HELP)
    p.add_argument(
        "--label", type=text_arg,
        help="name the credential it makes (unique per user, e.g. yubikey-backup): a new "
        "name adds another token of an enrolled method (default: the method's name)",
    )
    p.add_argument(
        "--methods", type=text_arg, help="comma-separated methods the offer allows (default: all)"
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="allow replacing an enrolled method (needs allow_override = true in policy.toml)",
    )
    p.add_argument(
        "--activation-code-file",
        metavar="PATH",
        help="write the offer's one-time activation code to this file, mode 0600 (default: "
        "show it on the terminal's stderr; with --json: in the JSON)",
    )
    p = vadd(
        "enroll",
        cmd_verifier_enroll,
        "record an enrollment response (prints the enrollment result with the certificate)",
    )
    p.add_argument("response", nargs="?", help="the response text, @FILE, or - for stdin (default)")
    p = vadd(
        "tpm-challenge",
        cmd_verifier_tpm_challenge,
        "answer an authenticator's TPM registration request (hsm-auth tpm register) with a "
        "credential-activation challenge",
    )
    p.add_argument("request", nargs="?", help="the request text, @FILE, or - for stdin (default)")
    p = vadd(
        "session",
        cmd_verifier_session,
        "start an offline session (prints the verification data)",
    )
    p.add_argument("--user", type=text_arg, required=True, help=USER_HELP)
    p.add_argument(
        "--context",
        required=True,
        type=text_arg,
        help="what the user approves, shown on the authenticator",
    )
    p.add_argument(
        "--methods", type=text_arg, help="comma-separated allowed methods (default: all enrolled)"
    )
    p.add_argument(
        "--transaction",
        action="append",
        default=[],
        metavar="LABEL=VALUE",
        type=text_arg,
        help="transaction data shown with the context and bound by the OTP (repeat: up to 8, "
        "in the order shown)",
    )
    p.add_argument(
        "--user-data",
        type=int,
        default=0,
        metavar="N",
        help="have the user enter 1..N characters on the authenticator (verify --data)",
    )
    p.add_argument("--tenant", type=text_arg, help="the user's tenant")
    p.add_argument("--qr", help="terminal, png:PATH or svg:PATH")
    p.add_argument(
        "--id-file",
        metavar="FILE",
        help="write the session id to FILE (verify --session @FILE); stdout then "
        "carries only the verification data",
    )
    p = vadd("verify", cmd_verifier_verify, "check an OTP for a session")
    p.add_argument("--session", type=text_arg, required=True, help=SESSION_HELP)
    p.add_argument(
        "--data",
        metavar="TEXT|@FILE",
        type=text_arg,
        help="what the user entered on the authenticator (a session with --user-data)",
    )
    p.add_argument(
        "--otp",
        default="-",
        type=text_arg,
        help="the OTP, or - (default) to read it from stdin / the terminal",
    )
    p = vadd(
        "resync",
        cmd_verifier_resync,
        "resynchronize from two consecutive OTPs of one session",
    )
    p.add_argument("--session", type=text_arg, required=True, help=SESSION_HELP)
    p.add_argument("--otp", type=text_arg, required=True, help="an OTP of that session")
    p.add_argument(
        "--next-otp", type=text_arg, required=True, help="the OTP the authenticator made next"
    )
    p = vadd(
        "sync",
        cmd_verifier_sync,
        "after an online login: print a sync message for the authenticator (hsm-auth sync)",
    )
    p.add_argument("--user", type=text_arg, required=True, help=USER_HELP)
    p.add_argument("--method", type=text_arg, required=True, help=METHOD_HELP)
    p.add_argument("--tenant", type=text_arg, help=TENANT_HELP)
    p.add_argument("--credential", type=text_arg, metavar="ID|LABEL", help=CREDENTIAL_HELP)
    p = vadd(
        "sync-report",
        cmd_verifier_sync_report,
        "apply the authenticator's sync report: the ATC moves to the token's (prints the "
        "acknowledgement for hsm-auth sync)",
    )
    p.add_argument("report", nargs="?", help="the report text, @FILE, or - for stdin (default)")
    p = vadd(
        "purge",
        cmd_verifier_purge,
        "delete expired sessions and offers, destroy the agreement keys of used or expired "
        "offers (also done on one in 64 writes)",
    )
    p.add_argument(
        "--grace",
        type=int,
        default=3600,
        metavar="SECONDS",
        help="keep what expired less than this long ago (default 3600)",
    )
    def name_credential(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--user", type=text_arg, required=True, help=USER_HELP)
        p.add_argument(
            "--method", type=text_arg,
            help=f"{METHOD_HELP}: its only credential (several: give --credential)",
        )
        p.add_argument(
            "--credential", type=text_arg, metavar="ID|LABEL",
            help=f"{CREDENTIAL_HELP}: {what} that one only",
        )
        p.add_argument("--tenant", type=text_arg, help=TENANT_HELP)

    p = vadd("unlock", cmd_verifier_unlock, "unlock a locked credential")
    name_credential(p, "unlock")
    p = vadd(
        "credentials",
        cmd_verifier_credentials,
        "list credentials (label, credential id, ATC, failures, locked)",
    )
    p.add_argument("user_name", nargs="?", metavar="USER", help="only this user's")
    p.add_argument("--user", type=text_arg, help="only this user's")
    p.add_argument("--tenant", type=text_arg, help="only this tenant's")
    p = vadd("revoke", cmd_verifier_revoke,
             "revoke (delete) one of a user's credentials; the others keep working")
    name_credential(p, "revoke")
    p = vadd("show", cmd_verifier_show, "show a user's counters, lockout state and recent events")
    p.add_argument("--user", type=text_arg, required=True, help=USER_HELP)
    p.add_argument(
        "--recent", type=count_arg(10_000), default=20, help="how many audit events (default 20)"
    )
    vadd("ca-cert", cmd_verifier_ca_cert, "print the device CA certificate (PEM) that "
         "issues the enrolled signing keys' certificates")
    p = vadd("result", cmd_verifier_result, "print the enrollment result of an enrolled method "
             "again (its certificate, for `hsm-auth certificate`)")
    name_credential(p, "the result of")
    p = vadd("audit", cmd_verifier_audit, "print audit records as JSON lines (oldest first)")
    p.add_argument("--user", type=text_arg, help="only this user's")
    p.add_argument(
        "--offline", action="store_true",
        help="instead: each credential's offline log, reconciled with the OTPs accepted "
        "(generated, not submitted; alerts)",
    )
    p.add_argument(
        "--limit",
        type=count_arg(1_000_000),
        default=100,
        help="the newest N records (default 100)",
    )

    _add_api_key_commands(add, vsub, common, vopt, only)
    _add_serve_command(add, sub)

    tp = group("token", "software tokens to try hsm-auth (SoftHSM, swtpm)")
    tsub = tp.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    p = add(
        tsub,
        "init",
        cmd_token_init,
        "create a SoftHSM token or start a swtpm for a method (a software token)",
        [pin],
    )
    p.description = EMULATOR_INIT_HELP
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--softhsm", metavar="LABEL", help="create a SoftHSM token with this label")
    which.add_argument("--swtpm", metavar="DIR", help="start a swtpm with its state in DIR")
    p.add_argument("--method", default="device", help="device (default) or pin")
    p.add_argument(
        "--replace", action="store_true", help="overwrite the method's table in the config"
    )
    p = add(tsub, "stop", cmd_token_stop, "stop a swtpm started by 'token init --swtpm DIR'")
    p.add_argument("--swtpm", metavar="DIR", required=True, help="the DIR given to token init")
    add(
        tsub,
        "udev-rules",
        cmd_token_udev_rules,
        "print the udev rules that give the seat's user access to tokens (see README)",
    )

    op = group("log", "the offline log: each offline use, hash-chained and signed in the token")
    osub = op.add_subparsers(dest="log_command", required=True, metavar="COMMAND")
    p = add(osub, "show", cmd_log_show, "list the offline uses logged here")
    p.add_argument("--method", type=text_arg, help="only this method's (default: all)")
    p = add(osub, "submit", cmd_log_submit,
            "send a method's offline log to the online service ([online] url)", [pin])
    p.add_argument("--method", type=text_arg, required=True, help=METHOD_HELP)

    lp = group("login", "workstation login (PAM)")
    lsub = lp.add_subparsers(dest="login_command", required=True, metavar="COMMAND")
    for name, func, text in (
        ("enroll", cmd_login_enroll, "enroll a user for workstation login"),
        ("check", cmd_login_check, "run a login check as the PAM helper does"),
    ):
        p = add(lsub, name, func, text, [pin])
        p.add_argument("--user", type=text_arg, required=True, help="the local account")
        p.add_argument("--method", type=text_arg, required=name == "enroll", help=METHOD_HELP)
        p.add_argument(
            "--authdir",
            "--authfile",
            dest="authdir",
            metavar="DIR",
            help="the authfile directory (default /etc/hsm-auth/login)",
        )
        if name == "enroll":
            p.add_argument("--replace", action="store_true", help="replace an enrolled method")
            p.add_argument("--add", action="store_true",
                           help="enroll another token of the method (login tries each)")
    add_agent_commands(add, sub, pin)
    return parser


def describe_retry(status: errors.RetryStatus) -> str:
    """Words for what a token said about further tries ("" when it said nothing).

    A locked state is named by the error's own message ("PIN locked"); this adds
    only when it ends."""
    if status.locked:
        if status.retry_after is None:
            return ""
        return f"retry in {math.ceil(status.retry_after)} s"
    if status.retries_left is None:
        return ""
    if status.retries_left == 0:
        return "no retries left"
    if status.retries_left == 1:
        return "1 retry left"
    return f"{status.retries_left} retries left"


def describe(error: HsmAuthError) -> str:
    """The one line a user sees for an error: its message, and its data in words."""
    if isinstance(error, errors.InvalidToken):
        return "OTP refused"
    text = str(error) or error.__class__.__name__
    if isinstance(error, errors.AuthorizationError):
        retry = describe_retry(error.retry)
        if retry:
            text = f"{text} ({retry})"
    return text


def error_json(error: HsmAuthError) -> dict[str, Any]:
    """The ``--json`` form of an error: its words, its type and its data. An
    authorization error always has ``retries_left`` (KOBIL's ``retryCounter``; null
    where the token does not say), ``retry_after`` (``retryDelay``, seconds; null
    unless a lockout ends by itself) and ``locked``, from the token itself."""
    doc: dict[str, Any] = {"error": describe(error), "type": error.__class__.__name__}
    if isinstance(error, errors.AuthorizationError):
        doc.update(asdict(error.retry))
    return doc


#: Commands that read local state and check signatures only. No module they load
#: logs, so they skip importing and configuring logging unless --debug is given
#: (start-up time, ``bench/startup.py``); tests/test_startup.py keeps this true.
_LOAD_NOTHING_THAT_LOGS = frozenset({cmd_start, cmd_sync, cmd_methods})


def _configure_logging(debug: bool, err: TextIO) -> None:
    import logging

    logging.basicConfig(
        level=logging.DEBUG if debug else logging.ERROR,
        stream=err,
        format="%(name)s: %(message)s",
    )


class _TerminalText:
    """The CLI's stdout and stderr: every text goes through :func:`hsm_auth.display.escape`,
    so no raw control character (a C1 CSI, a bidi override, ...) of a context, a name or
    an error message reaches a terminal, whatever wrote it."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(display.escape(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, ...
        return getattr(self._stream, name)


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = cast(TextIO, _TerminalText(out or sys.stdout))
    err = cast(TextIO, _TerminalText(err or sys.stderr))
    args = parse_command_line(argv)
    for name, default in (("home", None), ("json", False), ("debug", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    if args.debug or args.func not in _LOAD_NOTHING_THAT_LOGS or getattr(args, "online", False):
        _configure_logging(args.debug, err)  # sync --online talks to the service
    ctx = Context(args, out, err)
    try:
        code: int = args.func(ctx)
        return code
    except HsmAuthError as e:
        if args.debug:
            raise
        if args.json:
            import json

            print(json.dumps(error_json(e), sort_keys=True), file=out)
        print(f"hsm-auth: error: {describe(e)}", file=err)
        return e.exit_code
    except KeyboardInterrupt:
        print("hsm-auth: interrupted", file=err)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
