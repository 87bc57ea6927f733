"""A test SMTP server for tsubame-delivery's integration tests, on aiosmtpd.

Usage: aiosmtpd_sink.py PORT OUTDIR [--reject ADDRESS] [--defer ADDRESS]

Each accepted message is written to OUTDIR as N.json (envelope and parameters) and
N.eml (the content exactly as aiosmtpd received it, after dot-unstuffing). RCPT for
--reject gets 550, for --defer 451. OUTDIR/ready appears once the server listens.
"""

import argparse
import json
import os
import threading

from aiosmtpd.controller import Controller


class Handler:
    def __init__(self, outdir, reject, defer):
        self.outdir = outdir
        self.reject = reject
        self.defer = defer
        self.count = 0
        self.lock = threading.Lock()

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
        record = {
            "mail_from": envelope.mail_from,
            "mail_options": envelope.mail_options,
            "rcpt_tos": envelope.rcpt_tos,
            "smtp_utf8": envelope.smtp_utf8,
        }
        # Write the envelope last and atomically: its presence means the message is
        # complete.
        with open(base + ".json.tmp", "w", encoding="utf-8") as out:
            json.dump(record, out, ensure_ascii=False)
        os.rename(base + ".json.tmp", base + ".json")
        return "250 2.0.0 OK queued as %d" % number


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("outdir")
    parser.add_argument("--reject")
    parser.add_argument("--defer")
    args = parser.parse_args()
    handler = Handler(args.outdir, args.reject, args.defer)
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=args.port,
        enable_SMTPUTF8=True,
        decode_data=False,
    )
    controller.start()
    with open(os.path.join(args.outdir, "ready"), "w") as ready:
        ready.write("ready\n")
    # Run until killed by the test's guard.
    threading.Event().wait()


if __name__ == "__main__":
    main()
