#!/usr/bin/env python3
"""An SMTP connection driven step by step by a test, with TLS from Python's ssl module.

For the device-login tests that need control over every byte (STARTTLS with commands
pipelined behind it, AUTH exchanges, timing of a delayed reply) on a connection that
may be encrypted: plain, switched to TLS by STARTTLS, or TLS from the first byte
(RFC 8314). The TLS side is Python's ssl module (OpenSSL), a peer nobody here wrote.

The test writes one JSON request per line on standard input and reads one JSON answer
per line on standard output. The first request opens the connection:

    {"op": "connect", "host": "127.0.0.1", "port": 2525, "source": "127.0.0.2" or null,
     "implicit_tls": false, "ca_file": "/tmp/ca.pem", "server_hostname": "127.0.0.1",
     "timeout_secs": 15}
        -> {"ok": true, "tls": {...} or null} | {"error": "..."}

then, in any order:

    {"op": "send", "hex": "45484c4f..."}      write the bytes in one sendall
        -> {"ok": true} | {"error": "..."}
    {"op": "reply", "timeout_secs": 15}       read one whole (multi-line) reply
        -> {"reply": {"code": 250, "lines": ["...", ...]}} | {"closed": true}
         | {"timeout": true} | {"error": "..."}
    {"op": "starttls"}                        TLS handshake on the connection now
        -> {"tls": {"version", "cipher", "peer_subject"}, "leftover_hex": "..."}
         | {"error": "...", "leftover_hex": "..."}
    {"op": "close"}                           close and exit
        -> {"ok": true}

"leftover_hex" holds bytes that had arrived in clear text after the reply to STARTTLS
and before the handshake: a server that answered commands pipelined behind STARTTLS
puts them there. The peer certificate is verified against "ca_file" and
"server_hostname".
"""

import json
import socket
import ssl
import sys
import time

# Longest reply line accepted; RFC 5321 section 4.5.3.1.5 says 512 octets, a healthy
# server stays far below this.
MAX_LINE_BYTES = 64 * 1024


class Session:
    def __init__(self, request):
        self.timeout = float(request.get("timeout_secs", 15))
        self.ca_file = request.get("ca_file")
        self.server_hostname = request.get("server_hostname") or request["host"]
        source = request.get("source")
        self.sock = socket.create_connection(
            (request["host"], request["port"]),
            timeout=self.timeout,
            source_address=(source, 0) if source else None,
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.closed = False
        self.tls = None
        if request.get("implicit_tls"):
            self.tls = self.handshake()

    def context(self):
        context = ssl.create_default_context(cafile=self.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def handshake(self):
        self.sock.settimeout(self.timeout)
        self.sock = self.context().wrap_socket(
            self.sock, server_hostname=self.server_hostname
        )
        subject = dict(
            item for field in self.sock.getpeercert().get("subject", ()) for item in field
        )
        cipher = self.sock.cipher()
        return {
            "version": self.sock.version(),
            "cipher": cipher[0] if cipher else None,
            "peer_subject": subject,
        }

    def read_more(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout()
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(16 * 1024)
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            # A reset, or a TLS connection closed without close_notify: closed all the same.
            chunk = b""
        if not chunk:
            self.closed = True
        self.buffer += chunk

    def take_reply(self):
        """One whole reply from the buffer, or None."""
        lines = []
        position = 0
        while True:
            end = self.buffer.find(b"\r\n", position)
            if end < 0:
                if len(self.buffer) - position > MAX_LINE_BYTES:
                    raise ValueError("reply line too long")
                return None
            line = self.buffer[position:end].decode("utf-8", "replace")
            position = end + 2
            if len(line) < 3 or not line[:3].isdigit():
                raise ValueError("malformed reply line %r" % line)
            lines.append(line)
            if len(line) == 3 or line[3] == " ":
                break
            if line[3] != "-":
                raise ValueError("malformed reply line %r" % line)
        self.buffer = self.buffer[position:]
        codes = {line[:3] for line in lines}
        if len(codes) != 1:
            raise ValueError("reply code changed within a reply: %r" % lines)
        return {"code": int(lines[0][:3]), "lines": [line[4:] for line in lines]}

    def reply(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            reply = self.take_reply()
            if reply is not None:
                return {"reply": reply}
            if self.closed:
                return {"closed": True, "leftover_hex": self.buffer.hex()}
            try:
                self.read_more(deadline)
            except (socket.timeout, TimeoutError):
                return {"timeout": True}

    def starttls(self):
        leftover = self.buffer
        self.buffer = b""
        try:
            self.tls = self.handshake()
        except (OSError, ssl.SSLError, ValueError) as error:
            return {
                "error": "%s: %s" % (type(error).__name__, error),
                "leftover_hex": leftover.hex(),
            }
        return {"tls": self.tls, "leftover_hex": leftover.hex()}


def answer(value):
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def main():
    session = None
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        try:
            if op == "connect":
                session = Session(request)
                answer({"ok": True, "tls": session.tls})
            elif op == "send":
                session.sock.sendall(bytes.fromhex(request["hex"]))
                answer({"ok": True})
            elif op == "reply":
                answer(session.reply(float(request.get("timeout_secs", 15))))
            elif op == "starttls":
                answer(session.starttls())
            elif op == "close":
                if session is not None:
                    session.sock.close()
                answer({"ok": True})
                return
            else:
                answer({"error": "unknown op %r" % op})
        except (OSError, ssl.SSLError, ValueError) as error:
            answer({"error": "%s: %s" % (type(error).__name__, error)})


if __name__ == "__main__":
    main()
