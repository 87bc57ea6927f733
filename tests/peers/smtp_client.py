#!/usr/bin/env python3
"""Drive one SMTP session with Python's smtplib, as the end-to-end tests ask.

Reads a JSON job on standard input:

    {"host": "127.0.0.1", "port": 2525, "source_address": "127.0.0.2" or null,
     "local_hostname": "peer.tsubame.test", "timeout_secs": 20,
     "actions": [{"op": "ehlo"}, {"op": "mail", "from": "a@x", "options": []}, ...]}

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


def run_action(client, action):
    op = action["op"]
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
    try:
        client = smtplib.SMTP(
            job["host"],
            job["port"],
            local_hostname=job.get("local_hostname", "peer.tsubame.test"),
            timeout=job.get("timeout_secs", 20),
            source_address=(source, 0) if source else None,
        )
    except (OSError, smtplib.SMTPException) as error:
        output["connect_error"] = f"{type(error).__name__}: {error}"
        json.dump(output, sys.stdout)
        return
    for action in job["actions"]:
        try:
            output["results"].append(run_action(client, action))
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
