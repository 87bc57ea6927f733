#!/usr/bin/env python3
"""Drive one SMTP session with Python's smtplib, as the end-to-end tests ask.

Reads a JSON job on standard input:

    {"host": "127.0.0.1", "port": 2525, "source_address": "127.0.0.2" or null,
     "local_hostname": "peer.tsubame.test", "timeout_secs": 20,
     "implicit_tls": false, "ca_file": "/tmp/ca.pem" or null,
     "actions": [{"op": "ehlo"}, {"op": "mail", "from": "a@x", "options": []}, ...]}

With "implicit_tls" the connection is TLS from the first byte (smtplib.SMTP_SSL, RFC
8314); the "starttls" action upgrades a plain one. Either verifies the server's
certificate against "ca_file" and the host name. The "starttls" result carries the
TLS version and cipher ("tls"); "login" is SMTP.login, which picks the mechanism.

Each action runs in order on the one connection and yields one result:
{"code": int, "message": str} for a reply, or {"exception": name, "detail": str, ...}
when smtplib raised. Message bytes travel as hex ("message_hex") so that 8-bit and
malformed content passes through JSON unchanged. Writes {"results": [...]} (plus
"connect_error" when the connection failed) as JSON on standard output.

The script only uses smtplib's public methods, so what reaches the server is exactly
what a Python application using smtplib would send.
"""

import json
import smtplib
import ssl
import sys


def reply(pair):
    code, message = pair
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return {"code": code, "message": message}


def failure(error):
    result = {"exception": type(error).__name__, "detail": str(error)}
    code = getattr(error, "smtp_code", None)
    if code is not None:
        result["code"] = code
        message = getattr(error, "smtp_error", b"")
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        result["message"] = message
    recipients = getattr(error, "recipients", None)
    if isinstance(recipients, dict):
        result["refused"] = {
            address: reply(pair) for address, pair in recipients.items()
        }
    return result


def tls_context(job):
    context = ssl.create_default_context(cafile=job.get("ca_file"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def tls_info(client):
    cipher = client.sock.cipher()
    return {"version": client.sock.version(), "cipher": cipher[0] if cipher else None}


def run_action(client, action, job):
    op = action["op"]
    if op == "starttls":
        result = reply(client.starttls(context=tls_context(job)))
        result["tls"] = tls_info(client)
        return result
    if op == "login":
        return reply(client.login(action["user"], action["password"]))
    if op == "ehlo":
        return reply(client.ehlo(action.get("name")))
    if op == "helo":
        return reply(client.helo(action.get("name")))
    if op == "mail":
        return reply(client.mail(action["from"], action.get("options", [])))
    if op == "rcpt":
        return reply(client.rcpt(action["to"], action.get("options", [])))
    if op == "data":
        return reply(client.data(bytes.fromhex(action["message_hex"])))
    if op == "sendmail":
        refused = client.sendmail(
            action["from"],
            action["to"],
            bytes.fromhex(action["message_hex"]),
            action.get("mail_options", []),
            action.get("rcpt_options", []),
        )
        return {"code": 250, "message": "sendmail ok", "refused": {
            address: reply(pair) for address, pair in refused.items()
        }}
    if op == "verify":
        return reply(client.verify(action["address"]))
    if op == "rset":
        return reply(client.rset())
    if op == "noop":
        return reply(client.noop())
    if op == "quit":
        return reply(client.quit())
    if op == "extensions":
        client.ehlo_or_helo_if_needed()
        return {"code": 250, "message": json.dumps(client.esmtp_features)}
    raise ValueError(f"unknown action {op!r}")


def main():
    job = json.load(sys.stdin)
    source = job.get("source_address")
    output = {"results": []}
    options = {
        "local_hostname": job.get("local_hostname", "peer.tsubame.test"),
        "timeout": job.get("timeout_secs", 20),
        "source_address": (source, 0) if source else None,
    }
    try:
        if job.get("implicit_tls"):
            client = smtplib.SMTP_SSL(
                job["host"], job["port"], context=tls_context(job), **options
            )
        else:
            client = smtplib.SMTP(job["host"], job["port"], **options)
    except (OSError, smtplib.SMTPException) as error:
        output["connect_error"] = f"{type(error).__name__}: {error}"
        json.dump(output, sys.stdout)
        return
    for action in job["actions"]:
        try:
            output["results"].append(run_action(client, action, job))
        except smtplib.SMTPServerDisconnected as error:
            output["results"].append(failure(error))
            break
        except (OSError, smtplib.SMTPException) as error:
            output["results"].append(failure(error))
    try:
        client.close()
    except OSError:
        pass
    json.dump(output, sys.stdout)


if __name__ == "__main__":
    main()
