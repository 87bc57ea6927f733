"""A test SMTP server for tsubame-delivery's integration tests, on aiosmtpd.

Usage: aiosmtpd_sink.py PORT OUTDIR [--reject ADDRESS] [--defer ADDRESS]
           [--cert PEM --key PEM [--starttls [--require-starttls] | --implicit-tls]
            [--tls-max 1.2|1.3]]
           [--auth MECHANISM[,MECHANISM...] [--auth-required]] [--bearer-host NAME]
           [--issued-tokens LOG] [--bearer-user NAME]...

Each accepted message is written to OUTDIR as N.json (envelope, parameters, the TLS
version the message came over or null, the AUTH mechanism and login or null) and
N.eml (the content exactly as aiosmtpd received it, after dot-unstuffing). RCPT for
--reject gets 550, for --defer 451. Every MAIL command, accepted or not, appends a
line to OUTDIR/mail.log, so a test can prove that no transaction was attempted.
OUTDIR/ready appears once the server listens.

TLS: --starttls offers STARTTLS with the certificate (RFC 3207), --implicit-tls
speaks TLS from the first byte (RFC 8314). AUTH is offered over TLS only (after
STARTTLS, or on the implicit TLS connection) with the mechanisms listed (PLAIN, LOGIN,
XOAUTH2, OAUTHBEARER, and CRAM-MD5, which always fails); the one valid login is read
from the environment variables TSUBAME_TEST_SMTP_USERNAME and
TSUBAME_TEST_SMTP_PASSWORD (PLAIN, LOGIN) or TSUBAME_TEST_SMTP_TOKEN (XOAUTH2,
OAUTHBEARER), which each test sets to a value it generates.

Bearer tokens: the initial response must be exactly the documented one (XOAUTH2:
"user=" USER ^A "auth=Bearer " TOKEN ^A ^A; OAUTHBEARER, RFC 7628 section 3.1:
"n,a=" USER "," ^A "host=" --bearer-host ^A "port=" PORT ^A "auth=Bearer " TOKEN ^A ^A,
with "," and "=" in USER escaped as "=2C" and "=3D"). A right token gets 235. A wrong
one gets the error challenge, a 334 with base64 JSON (Google's for XOAUTH2, RFC 7628
section 3.2.2's for OAUTHBEARER); the client must answer it (XOAUTH2: an empty line,
OAUTHBEARER: AQ==), and then gets 535 5.7.8, as from Gmail. Any other initial
response gets 535 5.7.8 without a challenge. Each bearer AUTH appends one line to
OUTDIR/auth.log saying what happened, never the token. With a bearer mechanism the
server takes AUTH lines up to RFC 4954's 12,288 octets (aiosmtpd's default is 512).

For benchmarks, which refresh tokens while they run: --issued-tokens LOG accepts, instead
of TSUBAME_TEST_SMTP_TOKEN, any token the OAuth token endpoint peer
(crates/oauth/tests/peers/token_endpoint.py --log LOG) issued and that has not expired
(see IssuedTokens; a refused one is logged as "wrong token (never issued)" or "(expired)"),
and --bearer-user NAME (repeatable) accepts these logins instead of
TSUBAME_TEST_SMTP_USERNAME, any token for any of them.
"""

import argparse
import base64
import binascii
import collections
import json
import os
import re
import ssl
import threading
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword

BUILTIN_MECHANISMS = {"PLAIN", "LOGIN"}
BEARER_MECHANISMS = {"XOAUTH2", "OAUTHBEARER"}
CUSTOM_MECHANISMS = {"CRAM-MD5"} | BEARER_MECHANISMS

# RFC 4954 section 4: AUTH lines, and the responses after it, up to 12,288 octets.
MAX_AUTH_LINE_BYTES = 12288

# The error challenges: Google's for XOAUTH2, RFC 7628 section 3.2.2's for OAUTHBEARER.
ERROR_CHALLENGES = {
    "XOAUTH2": {"status": "401", "schemes": "Bearer", "scope": "https://mail.google.com/"},
    "OAUTHBEARER": {
        "status": "invalid_token",
        "scope": "https://mail.tsubame.test/",
        "openid-configuration": "https://auth.tsubame.test/.well-known/openid-configuration",
    },
}
# What the client must send back to the error challenge.
ERROR_ANSWERS = {"XOAUTH2": b"", "OAUTHBEARER": b"\x01"}
TOKEN_REJECTED = (
    "535-5.7.8 Username and Password not accepted. For more information, go to\r\n"
    "535 5.7.8  https://support.tsubame.test/mail/?p=BadCredentials"
)


class IssuedTokens:
    """The access tokens token_endpoint.py issued, read from its request log.

    That peer names its tokens "at-1", "at-2", ... in the order it issues them and logs
    each successful /token request (with at_unix and expires_in) before it answers, so
    once a client holds "at-N" the log has at least N successful /token lines. Which line
    is token N's is certain only without concurrent requests; the N-th line's expiry is
    used, off by the time between two concurrent refreshes at most. Good for the
    refresh-token and jwt-bearer grants only: the code grant numbers its refresh tokens
    from the same counter.
    """

    TOKEN = re.compile(rb"at-([1-9][0-9]{0,9})")

    def __init__(self, path):
        self.path = path
        # Bytes of the log read so far, and an incomplete last line kept for later.
        self.offset = 0
        self.partial = b""
        # expiries[N - 1]: when token "at-N" expires, seconds since the epoch.
        self.expiries = []

    def read_new_lines(self):
        try:
            with open(self.path, "rb") as log:
                log.seek(self.offset)
                data = log.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            record = json.loads(line)
            if record.get("path") == "/token" and record.get("ok"):
                self.expiries.append(record["at_unix"] + record["expires_in"])

    def refusal(self, token):
        """None for a token the endpoint issued that is still valid, else why not."""
        match = self.TOKEN.fullmatch(token)
        if match is None:
            return "never issued"
        number = int(match.group(1))
        if number > len(self.expiries):
            self.read_new_lines()
        if number > len(self.expiries):
            return "never issued"
        if time.time() >= self.expiries[number - 1]:
            return "expired"
        return None


class Handler:
    def __init__(self, outdir, reject, defer, bearer=None, issued=None):
        self.outdir = outdir
        self.reject = reject
        self.defer = defer
        # (usernames, token, host, port), each as bytes (usernames a list, token None
        # with `issued`), or None without bearer mechanisms.
        self.bearer = bearer
        # IssuedTokens when any token the endpoint peer issued is good, else None.
        self.issued = issued
        self.count = 0
        self.lock = threading.Lock()

    def log_mail(self, line):
        self.log("mail.log", line)

    def log(self, name, line):
        with self.lock:
            with open(os.path.join(self.outdir, name), "a", encoding="utf-8") as log:
                log.write(line + "\n")

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.log_mail("MAIL " + address)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address == self.reject:
            return "550 5.1.1 no such user here"
        if address == self.defer:
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.count += 1
            number = self.count
        base = os.path.join(self.outdir, str(number))
        with open(base + ".eml", "wb") as content:
            content.write(envelope.original_content)
        # Set for implicit TLS and after STARTTLS alike.
        ssl_object = server.transport.get_extra_info("ssl_object")
        auth_data = getattr(session, "auth_data", None)
        record = {
            "mail_from": envelope.mail_from,
            "mail_options": envelope.mail_options,
            "rcpt_tos": envelope.rcpt_tos,
            "smtp_utf8": envelope.smtp_utf8,
            "tls": ssl_object.version() if ssl_object is not None else None,
            "auth_mechanism": getattr(auth_data, "mechanism", None),
            "auth_login": getattr(auth_data, "login", None),
        }
        # Write the envelope last and atomically: its presence means the message is
        # complete.
        with open(base + ".json.tmp", "w", encoding="utf-8") as out:
            json.dump(record, out, ensure_ascii=False)
        os.rename(base + ".json.tmp", base + ".json")
        return "250 2.0.0 OK queued as %d" % number

    async def auth_CRAM__MD5(self, server, args):
        # Offered only so a client can be shown a mechanism it does not support.
        return AuthResult(success=False, handled=False)

    async def auth_XOAUTH2(self, server, args):
        return await self.bearer_auth(server, args, "XOAUTH2")

    async def auth_OAUTHBEARER(self, server, args):
        return await self.bearer_auth(server, args, "OAUTHBEARER")

    def bearer_prefix(self, mechanism, username):
        """The initial response up to the token."""
        _, _, host, port = self.bearer
        if mechanism == "XOAUTH2":
            return b"user=" + username + b"\x01auth=Bearer "
        authzid = username.replace(b"=", b"=3D").replace(b",", b"=2C")
        return (
            b"n,a=" + authzid + b",\x01host=" + host + b"\x01port=" + port
            + b"\x01auth=Bearer "
        )

    async def bearer_auth(self, server, args, mechanism):
        if len(args) != 2:
            self.log("auth.log", mechanism + " without initial response")
            return AuthResult(success=False, handled=False)
        try:
            response = base64.b64decode(args[1], validate=True)
        except binascii.Error:
            self.log("auth.log", mechanism + " initial response not base64")
            return AuthResult(success=False, handled=False)
        usernames, token, _, _ = self.bearer
        for username in usernames:
            prefix = self.bearer_prefix(mechanism, username)
            well_formed = (
                response.startswith(prefix)
                and response.endswith(b"\x01\x01")
                and b"\x01" not in response[len(prefix):-2]
            )
            if well_formed:
                break
        else:
            self.log("auth.log", mechanism + " malformed initial response")
            return AuthResult(success=False, handled=False)
        presented = response[len(prefix):-2]
        if self.issued is not None:
            refusal = self.issued.refusal(presented)
        else:
            refusal = None if presented == token else ""
        if refusal is None:
            self.log(
                "auth.log",
                "%s accepted, initial response %d base64 bytes" % (mechanism, len(args[1])),
            )
            login = username.decode("utf-8", "replace")
            return AuthResult(success=True, auth_data=Authenticated(mechanism, login))
        challenge = json.dumps(ERROR_CHALLENGES[mechanism], separators=(",", ":"))
        answer = await server.challenge_auth(challenge)
        if answer is MISSING:
            # challenge_auth has replied already (501 to "*" or to bad base64).
            self.log("auth.log", mechanism + " wrong token; challenge answer not base64")
            return AuthResult(success=False, handled=True)
        why = " (%s)" % refusal if refusal else ""
        self.log("auth.log", "%s wrong token%s; challenge answered %r" % (mechanism, why, answer))
        if answer != ERROR_ANSWERS[mechanism]:
            return AuthResult(success=False, handled=False, message="501 5.5.2 bad answer")
        return AuthResult(success=False, handled=False, message=TOKEN_REJECTED)


class LongAuthLines(SMTP):
    """aiosmtpd with AUTH lines up to RFC 4954's 12,288 octets.

    aiosmtpd reads lines through a StreamReader limited to line_length_limit (1,001)
    and refuses commands over 512 octets; a bearer token's initial response is longer.
    The reader's limit is read in SMTP.__init__, the command limits per command.
    """

    line_length_limit = MAX_AUTH_LINE_BYTES

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # An instance dict: SMTP's is a class attribute shared by every connection.
        self.command_size_limits = collections.defaultdict(
            lambda: SMTP.command_size_limit, {"AUTH": MAX_AUTH_LINE_BYTES}
        )


class LongAuthController(Controller):
    def factory(self):
        return LongAuthLines(self.handler, **self.SMTP_kwargs)


class Authenticated:
    """What a successful login leaves in session.auth_data."""

    def __init__(self, mechanism, login):
        self.mechanism = mechanism
        self.login = login


def authenticator(username, password):
    def check(server, session, envelope, mechanism, auth_data):
        valid = (
            password is not None
            and isinstance(auth_data, LoginPassword)
            and auth_data.login == username
            and auth_data.password == password
        )
        if not valid:
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", "replace")
        return AuthResult(success=True, auth_data=Authenticated(mechanism, login))

    return check


def tls_context(cert, key, tls_max):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if tls_max == "1.2":
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("outdir")
    parser.add_argument("--reject")
    parser.add_argument("--defer")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--starttls", action="store_true")
    parser.add_argument("--require-starttls", action="store_true")
    parser.add_argument("--implicit-tls", action="store_true")
    parser.add_argument("--tls-max", choices=["1.2", "1.3"], default="1.3")
    parser.add_argument("--auth")
    parser.add_argument("--auth-required", action="store_true")
    parser.add_argument("--bearer-host", default="mx.tsubame.test")
    parser.add_argument("--issued-tokens", metavar="LOG")
    parser.add_argument("--bearer-user", action="append", default=[])
    args = parser.parse_args()
    if (args.starttls or args.implicit_tls) and not (args.cert and args.key):
        parser.error("TLS needs --cert and --key")
    if args.starttls and args.implicit_tls:
        parser.error("--starttls and --implicit-tls exclude each other")

    mechanisms = {m.upper() for m in args.auth.split(",")} if args.auth else set()
    bearer = None
    issued = None
    if mechanisms & BEARER_MECHANISMS:
        usernames = args.bearer_user or [os.environ["TSUBAME_TEST_SMTP_USERNAME"]]
        if args.issued_tokens:
            issued = IssuedTokens(args.issued_tokens)
            token = None
        else:
            token = os.environ["TSUBAME_TEST_SMTP_TOKEN"].encode("utf-8")
        bearer = (
            [username.encode("utf-8") for username in usernames],
            token,
            args.bearer_host.encode("utf-8"),
            str(args.port).encode("ascii"),
        )
    handler = Handler(args.outdir, args.reject, args.defer, bearer, issued)
    smtp_options = {}
    context = None
    if args.starttls or args.implicit_tls:
        context = tls_context(args.cert, args.key, args.tls_max)
    if args.starttls:
        smtp_options["tls_context"] = context
        smtp_options["require_starttls"] = args.require_starttls
    if args.auth:
        unknown = mechanisms - BUILTIN_MECHANISMS - CUSTOM_MECHANISMS
        if unknown:
            parser.error("unknown mechanisms: " + ",".join(sorted(unknown)))
        # A bearer-only test sets no password: then no password is valid (and with
        # --bearer-user no username need be set either).
        password = os.environ.get("TSUBAME_TEST_SMTP_PASSWORD")
        username = None
        if password is not None:
            username = os.environ["TSUBAME_TEST_SMTP_USERNAME"].encode("utf-8")
            password = password.encode("utf-8")
        smtp_options["authenticator"] = authenticator(username, password)
        # aiosmtpd counts only STARTTLS as TLS (its check is on the STARTTLS
        # protocol object), so under implicit TLS, where every byte is encrypted
        # anyway, AUTH has to be allowed "without TLS" to be offered at all.
        smtp_options["auth_require_tls"] = not args.implicit_tls
        smtp_options["auth_required"] = args.auth_required
        smtp_options["auth_exclude_mechanism"] = sorted(
            (BUILTIN_MECHANISMS | CUSTOM_MECHANISMS) - mechanisms
        )
    else:
        # No AUTH at all: aiosmtpd would otherwise offer PLAIN and LOGIN over TLS.
        smtp_options["auth_exclude_mechanism"] = sorted(
            BUILTIN_MECHANISMS | CUSTOM_MECHANISMS
        )
    controller_class = LongAuthController if bearer else Controller
    controller = controller_class(
        handler,
        hostname="127.0.0.1",
        port=args.port,
        ssl_context=context if args.implicit_tls else None,
        enable_SMTPUTF8=True,
        decode_data=False,
        **smtp_options,
    )
    controller.start()
    with open(os.path.join(args.outdir, "ready"), "w") as ready:
        ready.write("ready\n")
    # Run until killed by the test's guard.
    threading.Event().wait()


if __name__ == "__main__":
    main()
