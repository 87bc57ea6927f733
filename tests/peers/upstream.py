"""An SMTP upstream for tsubame's delivery tests, on aiosmtpd (a server nobody here wrote).

Usage: upstream.py --port P --outdir DIR [options]

Each accepted message is written to DIR as N.eml (the content exactly as received,
after dot-unstuffing) and then N.json (envelope, written last and atomically: its
presence means the message is complete). DIR/ready appears once the server listens.
Every refusal is counted in DIR/events.log, one line per event.

Options:
  --bind ADDR          address to listen on (default 127.0.0.1)
  --reject ADDR        RCPT for ADDR gets 550 5.1.1 (repeatable)
  --rcpt-reply TEXT    every RCPT gets this reply instead (e.g. Google's
                       "550 5.4.5 Daily user sending quota exceeded.")
  --defer-first N      the first N messages get 451 4.3.0 at end of data (not stored)
  --hang-first N       the first N transactions stall at RCPT for --hang-secs, then 451
  --hang-secs S        (default 30)
  --delay-ms D         wait D ms before answering end of data (a slow upstream)
  --cert PEM --key PEM with --starttls (offer STARTTLS, RFC 3207; --require-starttls
                       refuses mail before it) or --implicit-tls (RFC 8314)
  --auth               require AUTH (PLAIN or LOGIN, offered over TLS only); the one
                       valid login comes from TSUBAME_TEST_SMTP_USERNAME and
                       TSUBAME_TEST_SMTP_PASSWORD, which each test generates

N.json holds: mail_from, mail_options, rcpt_tos, tls (the TLS version the message came
over, or null), auth_login (the login used, or null) and auth_mechanism (the SASL
mechanism of that login, PLAIN or LOGIN, or null).
"""

import argparse
import asyncio
import json
import os
import ssl
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Handler:
    def __init__(self, args):
        self.args = args
        self.outdir = args.outdir
        self.lock = threading.Lock()
        self.stored = 0
        self.deferred = 0
        self.hung = 0

    def event(self, text):
        with self.lock:
            with open(os.path.join(self.outdir, "events.log"), "a") as log:
                log.write(text + "\n")

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self.lock:
            hang = self.hung < self.args.hang_first
            if hang:
                self.hung += 1
        if hang:
            self.event("hang " + address)
            await asyncio.sleep(self.args.hang_secs)
            return "451 4.4.2 stalled on purpose"
        if self.args.rcpt_reply:
            self.event("rcpt-reply " + address)
            return self.args.rcpt_reply
        if address in (self.args.reject or []):
            self.event("reject " + address)
            return "550 5.1.1 <%s>: no such user here" % address
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.args.delay_ms:
            await asyncio.sleep(self.args.delay_ms / 1000.0)
        with self.lock:
            defer = self.deferred < self.args.defer_first
            if defer:
                self.deferred += 1
            else:
                self.stored += 1
                number = self.stored
        if defer:
            self.event("defer " + ",".join(envelope.rcpt_tos))
            return "451 4.3.0 try again later"
        base = os.path.join(self.outdir, str(number))
        with open(base + ".eml", "wb") as content:
            content.write(envelope.original_content)
        # Set for implicit TLS and after STARTTLS alike.
        tls = server.transport.get_extra_info("ssl_object")
        record = {
            "mail_from": envelope.mail_from,
            "mail_options": envelope.mail_options,
            "rcpt_tos": envelope.rcpt_tos,
            "tls": tls.version() if tls is not None else None,
            "auth_login": getattr(session, "auth_data", None),
            "auth_mechanism": getattr(session, "tsubame_auth_mechanism", None),
        }
        with open(base + ".json.tmp", "w", encoding="utf-8") as out:
            json.dump(record, out, ensure_ascii=False)
        os.rename(base + ".json.tmp", base + ".json")
        return "250 2.0.0 OK queued as %d" % number


def check_login(username, password):
    def authenticator(server, session, envelope, mechanism, auth_data):
        if (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == username
            and auth_data.password == password
        ):
            # Kept beside auth_data (the login, which other tests read as a string) so
            # that the record can say which mechanism the client chose.
            session.tsubame_auth_mechanism = mechanism
            return AuthResult(success=True, auth_data=auth_data.login.decode())
        return AuthResult(success=False, handled=False)

    return authenticator


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--outdir", required=True)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--reject", action="append")
    parser.add_argument("--rcpt-reply")
    parser.add_argument("--defer-first", type=int, default=0)
    parser.add_argument("--hang-first", type=int, default=0)
    parser.add_argument("--hang-secs", type=float, default=30.0)
    parser.add_argument("--delay-ms", type=int, default=0)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--starttls", action="store_true")
    parser.add_argument("--require-starttls", action="store_true")
    parser.add_argument("--implicit-tls", action="store_true")
    parser.add_argument("--auth", action="store_true")
    args = parser.parse_args()
    options = {}
    context = None
    if args.starttls or args.implicit_tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
    if args.starttls:
        options["tls_context"] = context
        options["require_starttls"] = args.require_starttls
    if args.auth:
        options["authenticator"] = check_login(
            os.environ["TSUBAME_TEST_SMTP_USERNAME"].encode(),
            os.environ["TSUBAME_TEST_SMTP_PASSWORD"].encode(),
        )
        options["auth_required"] = True
        # aiosmtpd treats only STARTTLS as TLS; under implicit TLS every byte is
        # encrypted anyway.
        options["auth_require_tls"] = not args.implicit_tls
    else:
        options["auth_exclude_mechanism"] = ["PLAIN", "LOGIN"]
    controller = Controller(
        Handler(args),
        hostname=args.bind,
        port=args.port,
        ssl_context=context if args.implicit_tls else None,
        enable_SMTPUTF8=True,
        decode_data=False,
        # Large enough for the benchmark-sized and reclaim test messages.
        data_size_limit=64 * 1024 * 1024,
        **options,
    )
    controller.start()
    with open(os.path.join(args.outdir, "ready"), "w") as ready:
        ready.write("ready\n")
    # Run until killed by the test's guard.
    threading.Event().wait()


if __name__ == "__main__":
    main()
