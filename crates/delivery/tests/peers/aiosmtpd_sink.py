"""A test SMTP server for tsubame-delivery's integration tests, on aiosmtpd.

Usage: aiosmtpd_sink.py PORT OUTDIR [--reject ADDRESS] [--defer ADDRESS]
           [--cert PEM --key PEM [--starttls [--require-starttls] | --implicit-tls]
            [--tls-max 1.2|1.3]]
           [--auth MECHANISM[,MECHANISM...] [--auth-required]]

Each accepted message is written to OUTDIR as N.json (envelope, parameters, the TLS
version the message came over or null, the AUTH mechanism and login or null) and
N.eml (the content exactly as aiosmtpd received it, after dot-unstuffing). RCPT for
--reject gets 550, for --defer 451. Every MAIL command, accepted or not, appends a
line to OUTDIR/mail.log, so a test can prove that no transaction was attempted.
OUTDIR/ready appears once the server listens.

TLS: --starttls offers STARTTLS with the certificate (RFC 3207), --implicit-tls
speaks TLS from the first byte (RFC 8314). AUTH is offered over TLS only (after
STARTTLS, or on the implicit TLS connection) with the mechanisms listed (PLAIN, LOGIN, and CRAM-MD5, which
always fails); the one valid login is read from the environment variables
TSUBAME_TEST_SMTP_USERNAME and TSUBAME_TEST_SMTP_PASSWORD, which each test sets to a
value it generates.
"""

import argparse
import json
import os
import ssl
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

BUILTIN_MECHANISMS = {"PLAIN", "LOGIN"}
CUSTOM_MECHANISMS = {"CRAM-MD5"}


class Handler:
    def __init__(self, outdir, reject, defer):
        self.outdir = outdir
        self.reject = reject
        self.defer = defer
        self.count = 0
        self.lock = threading.Lock()

    def log_mail(self, line):
        with self.lock:
            with open(os.path.join(self.outdir, "mail.log"), "a", encoding="utf-8") as log:
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


class Authenticated:
    """What a successful login leaves in session.auth_data."""

    def __init__(self, mechanism, login):
        self.mechanism = mechanism
        self.login = login


def authenticator(username, password):
    def check(server, session, envelope, mechanism, auth_data):
        valid = (
            isinstance(auth_data, LoginPassword)
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
    args = parser.parse_args()
    if (args.starttls or args.implicit_tls) and not (args.cert and args.key):
        parser.error("TLS needs --cert and --key")
    if args.starttls and args.implicit_tls:
        parser.error("--starttls and --implicit-tls exclude each other")

    handler = Handler(args.outdir, args.reject, args.defer)
    smtp_options = {}
    context = None
    if args.starttls or args.implicit_tls:
        context = tls_context(args.cert, args.key, args.tls_max)
    if args.starttls:
        smtp_options["tls_context"] = context
        smtp_options["require_starttls"] = args.require_starttls
    if args.auth:
        mechanisms = {mechanism.upper() for mechanism in args.auth.split(",")}
        unknown = mechanisms - BUILTIN_MECHANISMS - CUSTOM_MECHANISMS
        if unknown:
            parser.error("unknown mechanisms: " + ",".join(sorted(unknown)))
        username = os.environ["TSUBAME_TEST_SMTP_USERNAME"].encode("utf-8")
        password = os.environ["TSUBAME_TEST_SMTP_PASSWORD"].encode("utf-8")
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
    controller = Controller(
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
