"""An authoritative test DNS server for tsubame-delivery's MX tests, on dnslib.

Usage: dns_zone.py ZONEFILE [--servfail NAME]... [--lifetime SECONDS]

Serves the records of ZONEFILE (master-file syntax, as dnslib's RR.fromZone reads
it) on 127.0.0.1, over UDP and TCP on one free port, and prints that port as the
first line on stdout once both listen.

dnslib's own zoneresolver answers NXDOMAIN whenever no record of the asked type
matches, so it cannot say "the name exists but has no MX", which the implicit-MX
rule (RFC 5321 section 5.1) depends on. This resolver answers like an authoritative
server instead:

* records of the name and type: NOERROR with them; a CNAME of the name is answered
  and followed within the zone;
* the name has records of other types only: NOERROR, no answer, the zone's SOA in
  the authority section (NODATA, RFC 2308 section 2.2);
* a --servfail name: SERVFAIL;
* any other name: NXDOMAIN, with the SOA (RFC 2308 section 2.1).

It exits when its stdin closes (the test that started it is gone) or after
--lifetime seconds, whichever comes first, so it never outlives its test for long.
"""

import argparse
import os
import sys
import threading
import time

from dnslib import QTYPE, RCODE, RR
from dnslib.server import BaseResolver, DNSLogger, DNSServer

# Longest CNAME chain followed within the zone; a loop ends here.
MAX_CNAME_CHAIN = 8
# Attempts at finding a port free for both UDP and TCP.
BIND_ATTEMPTS = 20


def key(label):
    return str(label).lower()


class AuthoritativeResolver(BaseResolver):
    def __init__(self, records, servfail):
        self.by_name = {}
        self.soa = None
        for record in records:
            self.by_name.setdefault(key(record.rname), []).append(record)
            if record.rtype == QTYPE.SOA and self.soa is None:
                self.soa = record
        self.servfail = {name.lower().rstrip(".") + "." for name in servfail}

    def resolve(self, request, handler):
        reply = request.reply()
        reply.header.aa = 1
        name = key(request.q.qname)
        qtype = request.q.qtype
        if name in self.servfail:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        for _ in range(MAX_CNAME_CHAIN):
            records = self.by_name.get(name)
            if records is None:
                if not reply.rr:
                    reply.header.rcode = RCODE.NXDOMAIN
                self.add_soa(reply)
                return reply
            matching = [r for r in records if r.rtype == qtype]
            if matching:
                for record in matching:
                    reply.add_answer(record)
                return reply
            aliases = [r for r in records if r.rtype == QTYPE.CNAME]
            if not aliases or qtype == QTYPE.CNAME:
                self.add_soa(reply)
                return reply
            reply.add_answer(aliases[0])
            name = key(aliases[0].rdata.label)
        return reply

    def add_soa(self, reply):
        if self.soa is not None:
            reply.add_auth(self.soa)


def start_servers(resolver, logger):
    """Binds UDP on a free port, then TCP on the same one; retries on a clash."""
    last_error = None
    for _ in range(BIND_ATTEMPTS):
        udp = DNSServer(resolver, address="127.0.0.1", port=0, logger=logger)
        port = udp.server.server_address[1]
        try:
            tcp = DNSServer(resolver, address="127.0.0.1", port=port, tcp=True, logger=logger)
        except OSError as error:
            udp.server.server_close()
            last_error = error
            continue
        udp.start_thread()
        tcp.start_thread()
        return port
    raise SystemExit("dns_zone.py: no port free for both UDP and TCP: %s" % last_error)


def exit_when_stdin_closes():
    sys.stdin.buffer.read()
    os._exit(0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("zonefile")
    parser.add_argument("--servfail", action="append", default=[])
    parser.add_argument("--lifetime", type=float, default=300.0)
    args = parser.parse_args()

    with open(args.zonefile, encoding="utf-8") as zone:
        records = list(RR.fromZone(zone.read()))
    resolver = AuthoritativeResolver(records, args.servfail)
    # Errors only, on stderr: stdout carries the port line.
    logger = DNSLogger("-request,-reply,-truncated,+error", prefix=False,
                       logf=lambda line: print(line, file=sys.stderr, flush=True))
    port = start_servers(resolver, logger)
    print(port, flush=True)

    threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    time.sleep(args.lifetime)
    os._exit(0)


if __name__ == "__main__":
    main()
