"""An OAuth 2.0 authorisation server for tsubame-oauth's tests, on http.server and
cryptography (code nobody here wrote): Google's token endpoint and consent page, as far
as tsubame uses them.

Usage: token_endpoint.py --log FILE [options]

Prints its port on the first line of standard output once it listens on 127.0.0.1.
Exits when its standard input closes, or after --lifetime seconds.

POST /token (application/x-www-form-urlencoded) answers the grants:
  refresh_token       client_id and client_secret must be the expected ones, and
                      refresh_token --refresh-token or one the code grant issued
  jwt-bearer          the assertion's RS256 signature is checked with --public-key, its
                      header (alg, typ, kid) and claims: iss = --service-account, scope =
                      https://mail.google.com/, aud = this endpoint's URL, exp - iat <=
                      3600, iat not in the future, exp not past, sub present
  authorization_code  the code must be one GET /auth issued, redirect_uri and client
                      credentials must match, and the code_verifier must hash (S256) to
                      the code_challenge GET /auth was given (RFC 7636)
A good request gets {"access_token": "at-N", "expires_in": --expires-in, "token_type":
"Bearer"} (N counts the tokens issued; the code grant also gets "refresh_token":
"1//rt-N"). A bad one gets 400 invalid_grant (401 invalid_client for wrong client
credentials).

GET /auth?...: the consent page. Checks the query like Google (response_type=code,
client_id, redirect_uri, scope, state, code_challenge with method S256,
access_type=offline, prompt=consent) and redirects (302) to redirect_uri with a new code
and the state.

--mode-file FILE is read at each POST; its first word changes the answer: "ok" (or no
file), "invalid_grant", "unauthorized_client", "500" (an HTML 500), "hang" (answer
nothing for --hang-secs, then close).

Every request appends one JSON line to --log: {"path", "grant_type", "ok", "why",
"sub", "mode", "at_unix"} (at_unix: when it was logged, in seconds since the epoch), and
a token it issued also "expires_in". The line is written before the answer is sent, so a
client holding "at-N" can count on N successful /token lines being in the log (the SMTP
peer's --issued-tokens reads them).

--cert PEM --key PEM serve https instead of http.
"""

import argparse
import base64
import hashlib
import json
import os
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

SCOPE = "https://mail.google.com/"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# Largest request body read: a JWT assertion is about 1 KiB.
BODY_BYTES_MAX = 64 * 1024


def b64url_decode(text):
    if "=" in text:
        raise ValueError("padding in base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class State:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.issued = 0
        # code -> (code_challenge, redirect_uri, client_id)
        self.codes = {}
        # Refresh tokens the code grant issued; good for the refresh grant too.
        self.refresh_tokens = set()
        self.public_key = None
        if args.public_key:
            with open(args.public_key, "rb") as f:
                self.public_key = serialization.load_pem_public_key(f.read())

    def mode(self):
        try:
            with open(self.args.mode_file) as f:
                words = f.read().split()
                return words[0] if words else "ok"
        except (OSError, TypeError):
            return "ok"

    def log(self, record):
        record = dict(record, at_unix=round(time.time(), 3))
        with self.lock:
            with open(self.args.log, "a") as f:
                f.write(json.dumps(record) + "\n")

    def next_number(self):
        with self.lock:
            self.issued += 1
            return self.issued


class Refused(Exception):
    def __init__(self, error, why, status=400):
        super().__init__(why)
        self.error = error
        self.why = why
        self.status = status


def make_handler(state):
    args = state.args

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *arguments):
            pass

        def setup(self):
            if isinstance(self.request, ssl.SSLSocket):
                self.request.settimeout(10)
                self.request.do_handshake()
            super().setup()

        def endpoint_url(self):
            scheme = "https" if args.cert else "http"
            return "%s://127.0.0.1:%d/token" % (scheme, self.server.server_address[1])

        def send_json(self, status, document):
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            record = {"path": url.path, "grant_type": None, "ok": False, "why": None,
                      "sub": None, "mode": None}
            try:
                if url.path != "/auth":
                    raise Refused("not_found", "no such page", 404)
                query = dict(urllib.parse.parse_qsl(url.query, strict_parsing=True))
                expected = {
                    "response_type": "code", "client_id": args.client_id, "scope": SCOPE,
                    "access_type": "offline", "prompt": "consent",
                    "code_challenge_method": "S256",
                }
                for name, value in expected.items():
                    if query.get(name) != value:
                        raise Refused("invalid_request", "%s is %r" % (name, query.get(name)))
                for name in ("redirect_uri", "state", "code_challenge", "login_hint"):
                    if not query.get(name):
                        raise Refused("invalid_request", "no " + name)
                redirect = query["redirect_uri"]
                if not redirect.startswith("http://127.0.0.1:"):
                    raise Refused("invalid_request", "redirect_uri is not loopback")
                code = "4/code-%d" % state.next_number()
                with state.lock:
                    state.codes[code] = (query["code_challenge"], redirect, args.client_id)
                location = redirect + "?" + urllib.parse.urlencode(
                    {"state": query["state"], "code": code, "scope": SCOPE})
                record.update(ok=True, sub=query["login_hint"])
                state.log(record)
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
            except Refused as refused:
                record["why"] = refused.why
                state.log(record)
                self.send_json(refused.status, {"error": refused.error,
                                                "error_description": refused.why})

        def do_POST(self):
            mode = state.mode()
            record = {"path": self.path, "grant_type": None, "ok": False, "why": None,
                      "sub": None, "mode": mode}
            try:
                if self.path != "/token":
                    raise Refused("not_found", "no such endpoint", 404)
                if self.headers.get("Content-Type") != "application/x-www-form-urlencoded":
                    raise Refused("invalid_request", "content type %r" % self.headers.get("Content-Type"))
                length = int(self.headers.get("Content-Length", "-1"))
                if length < 0 or length > BODY_BYTES_MAX:
                    raise Refused("invalid_request", "bad Content-Length")
                body = self.rfile.read(length).decode("ascii")
                pairs = urllib.parse.parse_qsl(body, strict_parsing=True, keep_blank_values=True)
                form = dict(pairs)
                if len(form) != len(pairs):
                    raise Refused("invalid_request", "a repeated field")
                grant = form.get("grant_type")
                record["grant_type"] = grant
                if mode == "hang":
                    state.log(dict(record, why="hanging"))
                    time.sleep(args.hang_secs)
                    self.close_connection = True
                    return
                if mode == "500":
                    state.log(dict(record, why="500"))
                    body = b"<html><body>Internal Server Error</body></html>"
                    self.send_response(500)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(body)
                    self.close_connection = True
                    return
                if mode in ("invalid_grant", "unauthorized_client"):
                    raise Refused(mode, "told to refuse")
                document = {"token_type": "Bearer", "expires_in": args.expires_in}
                if grant == "refresh_token":
                    self.check_client(form)
                    with state.lock:
                        known = form.get("refresh_token") in state.refresh_tokens
                    if not known and (not args.refresh_token
                                      or form.get("refresh_token") != args.refresh_token):
                        raise Refused("invalid_grant", "Token has been expired or revoked.")
                    if set(form) != {"grant_type", "refresh_token", "client_id", "client_secret"}:
                        raise Refused("invalid_request", "fields %r" % sorted(form))
                elif grant == JWT_BEARER:
                    record["sub"] = self.check_assertion(form.get("assertion", ""))
                elif grant == "authorization_code":
                    self.check_client(form)
                    with state.lock:
                        issued = state.codes.pop(form.get("code"), None)
                    if issued is None:
                        raise Refused("invalid_grant", "unknown or used code")
                    challenge, redirect, _ = issued
                    if form.get("redirect_uri") != redirect:
                        raise Refused("invalid_grant", "redirect_uri differs")
                    verifier = form.get("code_verifier", "")
                    computed = base64.urlsafe_b64encode(
                        hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()
                    if computed != challenge:
                        raise Refused("invalid_grant", "code_verifier does not match")
                    document["refresh_token"] = "1//rt-%d" % state.next_number()
                    with state.lock:
                        state.refresh_tokens.add(document["refresh_token"])
                else:
                    raise Refused("unsupported_grant_type", "grant %r" % grant)
                document["access_token"] = "at-%d" % state.next_number()
                record["ok"] = True
                record["expires_in"] = args.expires_in
                state.log(record)
                self.send_json(200, document)
            except Refused as refused:
                record["why"] = refused.why
                state.log(record)
                self.send_json(refused.status, {"error": refused.error,
                                                "error_description": refused.why})

        def check_client(self, form):
            if form.get("client_id") != args.client_id or form.get("client_secret") != args.client_secret:
                raise Refused("invalid_client", "wrong client credentials", 401)

        def check_assertion(self, assertion):
            if state.public_key is None:
                raise Refused("invalid_grant", "no --public-key given")
            parts = assertion.split(".")
            if len(parts) != 3:
                raise Refused("invalid_grant", "not a JWS in compact form")
            try:
                header = json.loads(b64url_decode(parts[0]))
                claims = json.loads(b64url_decode(parts[1]))
                signature = b64url_decode(parts[2])
            except ValueError as error:
                raise Refused("invalid_grant", "undecodable JWT: %s" % error)
            if header != {"alg": "RS256", "typ": "JWT", "kid": args.key_id}:
                raise Refused("invalid_grant", "header %r" % header)
            try:
                state.public_key.verify(signature, (parts[0] + "." + parts[1]).encode("ascii"),
                                        padding.PKCS1v15(), hashes.SHA256())
            except InvalidSignature:
                raise Refused("invalid_grant", "Invalid JWT Signature.")
            now = time.time()
            checks = [
                (claims.get("iss") == args.service_account, "iss"),
                (claims.get("scope") == SCOPE, "scope"),
                (claims.get("aud") == self.endpoint_url(), "aud"),
                (isinstance(claims.get("iat"), int) and isinstance(claims.get("exp"), int), "iat/exp types"),
            ]
            for passed, name in checks:
                if not passed:
                    raise Refused("invalid_grant", "claim %s: %r" % (name, claims))
            if not (0 < claims["exp"] - claims["iat"] <= 3600):
                raise Refused("invalid_grant", "exp - iat not in (0, 3600]")
            if claims["iat"] > now + 60 or claims["exp"] < now:
                raise Refused("invalid_grant", "Invalid JWT: Token must be a short-lived token")
            sub = claims.get("sub")
            if not sub:
                raise Refused("invalid_grant", "no sub")
            if sub in args.deny_sub:
                raise Refused("unauthorized_client",
                              "Client is unauthorized to retrieve access tokens using this method")
            if set(claims) != {"iss", "sub", "scope", "aud", "iat", "exp"}:
                raise Refused("invalid_grant", "claims %r" % sorted(claims))
            return sub

    return Handler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", required=True)
    parser.add_argument("--mode-file")
    parser.add_argument("--client-id", default="test-client.apps.googleusercontent.com")
    parser.add_argument("--client-secret", default="")
    parser.add_argument("--refresh-token", default="")
    parser.add_argument("--public-key")
    parser.add_argument("--key-id", default="")
    parser.add_argument("--service-account", default="")
    parser.add_argument("--deny-sub", action="append", default=[])
    parser.add_argument("--expires-in", type=int, default=3600)
    parser.add_argument("--hang-secs", type=float, default=30)
    parser.add_argument("--lifetime", type=float, default=300)
    parser.add_argument("--cert", help="serve https with this PEM certificate chain")
    parser.add_argument("--key", help="the certificate's PEM key")
    args = parser.parse_args()

    state = State(args)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    # A client that refuses the certificate is part of the tests; no traceback for it.
    server.handle_error = lambda request, address: None
    if args.cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.cert, args.key)
        # The handshake runs in the handler's thread, not in accept().
        server.socket = context.wrap_socket(server.socket, server_side=True,
                                            do_handshake_on_connect=False)
    print(server.server_address[1], flush=True)

    def stop_when_stdin_closes():
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=stop_when_stdin_closes, daemon=True).start()
    threading.Timer(args.lifetime, lambda: os._exit(0)).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
