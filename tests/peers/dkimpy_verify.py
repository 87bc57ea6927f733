#!/usr/bin/env python3
"""Verifies every DKIM-Signature of a message with dkimpy, an implementation nobody on
this project wrote.

Usage: dkimpy_verify.py MESSAGE_FILE NAME=TXT_VALUE...

Each NAME=TXT_VALUE is the key record a DNS lookup of NAME (for example
sel._domainkey.example.com.) returns, exactly as `tsubame dkim keygen` prints its value.
Exit status: 0 when the message has at least one signature and all verify, 1 when one
fails (its index and dkimpy's reason on stderr), 2 on a usage or import error.
"""
import sys

try:
    import dkim
except ImportError:
    print("dkimpy is not installed (pip install dkimpy pynacl)", file=sys.stderr)
    sys.exit(2)


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1], "rb") as message_file:
        message = message_file.read()
    records = {}
    for argument in sys.argv[2:]:
        name, _, value = argument.partition("=")
        records[name.lower().rstrip(".") + "."] = value.encode()

    def dnsfunc(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        return records.get(name.lower().rstrip(".") + ".")

    verifier = dkim.DKIM(message)
    signatures = [
        header for header in verifier.headers if header[0].lower() == b"dkim-signature"
    ]
    if not signatures:
        print("no DKIM-Signature header", file=sys.stderr)
        return 1
    failed = 0
    for index in range(len(signatures)):
        verifier = dkim.DKIM(message)
        try:
            ok = verifier.verify(idx=index, dnsfunc=dnsfunc)
        except dkim.DKIMException as error:
            ok = False
            print(f"signature {index}: {error}", file=sys.stderr)
        if not ok:
            failed += 1
            print(f"signature {index} failed: {verifier.signature_fields}", file=sys.stderr)
        else:
            algorithm = verifier.signature_fields.get(b"a", b"?").decode()
            print(f"signature {index} ({algorithm}) verified")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
