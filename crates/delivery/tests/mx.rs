//! MX lookup against a DNS server nobody here wrote: dnslib's `DNSServer` (Python,
//! `pip install dnslib`), serving the zone below through `tests/peers/dns_zone.py` on a
//! free loopback port.
//!
//! These tests fail, never skip, when python3 or dnslib is missing: CI must install
//! them. Every server is killed when its guard drops (and exits by itself when its
//! stdin closes or its lifetime ends), and every lookup has a deadline, so no test
//! can hang.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tsubame_delivery::mx::{MAX_MX_HOSTS, MxError, MxHost, MxResolver, ResolverOptions};

/// Deadline of each lookup in these tests; the local server answers in milliseconds.
const TEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the DNS server may take to start and print its port.
const STARTUP_DEADLINE: Duration = Duration::from_secs(15);
/// The server exits by itself after this long, should its guard never run.
const SERVER_LIFETIME_SECS: u32 = 300;
/// Lookup deadline in the test against a server that never answers.
const SHORT_TIMEOUT: Duration = Duration::from_secs(2);
/// Slack on top of a deadline for thread scheduling on a busy 2-core machine.
const DEADLINE_SLACK: Duration = Duration::from_secs(3);

/// Names the server answers with SERVFAIL.
const SERVFAIL_NAMES: [&str; 2] = ["servfail.test", "mx.servfail.test"];

/// MX records listed worst first where order matters, so that the order must come
/// from sorting, not from the server.
const ZONE: &str = r#"
$TTL 60
test.                   SOA ns.test. hostmaster.test. 1 3600 600 86400 60

two-mx.test.            MX 20 mx2.two-mx.test.
two-mx.test.            MX 10 mx1.two-mx.test.
mx1.two-mx.test.        A 127.0.0.11
mx2.two-mx.test.        AAAA 2001:db8::12
mx2.two-mx.test.        A 192.0.2.12

alias.test.             CNAME two-mx.test.

implicit.test.          A 192.0.2.1
implicit6.test.         AAAA 2001:db8::25

dual.test.              MX 10 mx.dual.test.
mx.dual.test.           AAAA 2001:db8::2
mx.dual.test.           A 192.0.2.2

nullmx.test.            MX 0 .

noaddress.test.         TXT "no mail here"

skip.test.              MX 20 ok.skip.test.
skip.test.              MX 10 textonly.skip.test.
skip.test.              MX 5 gone.skip.test.
textonly.skip.test.     TXT "no address"
ok.skip.test.           A 192.0.2.3

unreachable.test.       MX 10 gone.unreachable.test.
unreachable.test.       MX 20 textonly.unreachable.test.
textonly.unreachable.test. TXT "no address"

broken.test.            MX 10 mx.servfail.test.

equal.test.             MX 10 b.equal.test.
equal.test.             MX 10 a.equal.test.
equal.test.             MX 5 first.equal.test.
first.equal.test.       A 192.0.2.5
a.equal.test.           A 192.0.2.6
b.equal.test.           A 192.0.2.7

xn--bcher-kva.test.     A 192.0.2.4
"#;

/// Domain with more MX hosts than [`MAX_MX_HOSTS`], preferences 1 to this.
const MANY_MX_HOSTS: u16 = 12;

fn zone() -> String {
    let mut zone = ZONE.to_string();
    for preference in (1..=MANY_MX_HOSTS).rev() {
        zone.push_str(&format!(
            "many.test. MX {preference} mx{preference}.many.test.\n\
             mx{preference}.many.test. A 192.0.2.{}\n",
            100 + preference
        ));
    }
    zone
}

/// Kills and reaps the child when dropped, whatever the test did.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn peer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/dns_zone.py")
}

/// Fails the test with the install hint when python3 or dnslib is missing.
fn require_dnslib() {
    let status = Command::new("python3")
        .args(["-c", "import dnslib"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match status {
        Ok(status) if status.success() => {}
        _ => {
            panic!("the MX tests need python3 with dnslib as their DNS server: pip install dnslib")
        }
    }
}

/// The zone served by dnslib on 127.0.0.1, UDP and TCP.
struct DnsServer {
    _child: ChildGuard,
    address: SocketAddr,
    _dir: tempfile::TempDir,
}

impl DnsServer {
    fn start() -> Self {
        require_dnslib();
        let dir = tempfile::tempdir().expect("temporary directory");
        let zone_path = dir.path().join("test.zone");
        std::fs::File::create(&zone_path)
            .and_then(|mut file| file.write_all(zone().as_bytes()))
            .expect("write the zone file");
        let mut command = Command::new("python3");
        command
            .arg(peer_script())
            .arg(&zone_path)
            .args(["--lifetime", &SERVER_LIFETIME_SECS.to_string()]);
        for name in SERVFAIL_NAMES {
            command.args(["--servfail", name]);
        }
        let mut child = ChildGuard(
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start python3 dns_zone.py"),
        );
        let stdout = child.0.stdout.take().expect("piped stdout");
        let (sender, receiver) = mpsc::channel();
        // A thread reads the port line, so the wait for it can have a deadline.
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = sender.send(line);
        });
        let line = receiver
            .recv_timeout(STARTUP_DEADLINE)
            .expect("dns_zone.py printed no port in time");
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("dns_zone.py did not start (printed {line:?})"));
        Self {
            _child: child,
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            _dir: dir,
        }
    }

    fn resolver(&self) -> MxResolver {
        resolver_at(self.address, TEST_TIMEOUT)
    }
}

fn resolver_at(nameserver: SocketAddr, timeout: Duration) -> MxResolver {
    MxResolver::new(ResolverOptions {
        nameserver: Some(nameserver),
        timeout,
    })
    .expect("start the resolver")
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

fn host(name: &str, preference: u16, addresses: &[&str]) -> MxHost {
    MxHost {
        name: name.to_string(),
        preference,
        addresses: addresses.iter().map(|address| ip(address)).collect(),
    }
}

fn two_mx_hosts() -> Vec<MxHost> {
    vec![
        host("mx1.two-mx.test", 10, &["127.0.0.11"]),
        host("mx2.two-mx.test", 20, &["192.0.2.12", "2001:db8::12"]),
    ]
}

fn expect_permanent(result: Result<Vec<MxHost>, MxError>, status: &str) -> MxError {
    let error = result.expect_err("lookup should fail");
    assert!(error.is_permanent(), "{error}");
    assert_eq!(error.status(), status, "{error}");
    error
}

fn expect_temporary(result: Result<Vec<MxHost>, MxError>) -> MxError {
    let error = result.expect_err("lookup should fail");
    assert!(
        matches!(error, MxError::Temporary { .. }),
        "not temporary: {error:?}"
    );
    assert!(!error.is_permanent());
    assert_eq!(error.status(), "4.4.3");
    error
}

#[test]
fn mx_hosts_come_in_preference_order_with_ipv4_first() {
    let server = DnsServer::start();
    let resolver = server.resolver();
    assert_eq!(resolver.lookup("two-mx.test").unwrap(), two_mx_hosts());
    assert_eq!(
        resolver.lookup("dual.test").unwrap(),
        [host("mx.dual.test", 10, &["192.0.2.2", "2001:db8::2"])]
    );
}

#[test]
fn upper_case_and_trailing_dot_name_the_same_domain() {
    let server = DnsServer::start();
    let resolver = server.resolver();
    assert_eq!(resolver.lookup("TWO-MX.Test.").unwrap(), two_mx_hosts());
}

#[test]
fn a_cname_for_the_domain_is_followed() {
    let server = DnsServer::start();
    assert_eq!(
        server.resolver().lookup("alias.test").unwrap(),
        two_mx_hosts()
    );
}

#[test]
fn without_mx_the_domain_is_its_own_host() {
    let server = DnsServer::start();
    let resolver = server.resolver();
    assert_eq!(
        resolver.lookup("implicit.test").unwrap(),
        [host("implicit.test", 0, &["192.0.2.1"])]
    );
    assert_eq!(
        resolver.lookup("implicit6.test").unwrap(),
        [host("implicit6.test", 0, &["2001:db8::25"])]
    );
}

#[test]
fn null_mx_is_permanent_5_1_10() {
    let server = DnsServer::start();
    let error = expect_permanent(server.resolver().lookup("nullmx.test"), "5.1.10");
    assert!(error.to_string().contains("null MX"), "{error}");
}

#[test]
fn nonexistent_domain_is_permanent_5_1_2() {
    let server = DnsServer::start();
    let error = expect_permanent(server.resolver().lookup("missing.test"), "5.1.2");
    assert!(error.to_string().contains("NXDOMAIN"), "{error}");
    assert!(error.to_string().contains("missing.test"), "{error}");
}

#[test]
fn no_mx_and_no_address_is_permanent() {
    let server = DnsServer::start();
    expect_permanent(server.resolver().lookup("noaddress.test"), "5.1.2");
}

#[test]
fn mx_hosts_without_addresses_are_skipped() {
    let server = DnsServer::start();
    // gone.skip.test does not exist and textonly.skip.test has no address records.
    assert_eq!(
        server.resolver().lookup("skip.test").unwrap(),
        [host("ok.skip.test", 20, &["192.0.2.3"])]
    );
}

#[test]
fn no_mx_host_with_an_address_is_temporary() {
    let server = DnsServer::start();
    expect_temporary(server.resolver().lookup("unreachable.test"));
}

#[test]
fn servfail_is_temporary() {
    let server = DnsServer::start();
    let resolver = server.resolver();
    let error = expect_temporary(resolver.lookup("servfail.test"));
    assert!(error.to_string().contains("servfail.test"), "{error}");
    // The MX host's address lookups fail: temporary too, not "no address".
    let error = expect_temporary(resolver.lookup("broken.test"));
    assert!(error.to_string().contains("mx.servfail.test"), "{error}");
}

#[test]
fn equal_preferences_follow_the_better_one_in_either_order() {
    let server = DnsServer::start();
    let hosts = server.resolver().lookup("equal.test").unwrap();
    assert_eq!(hosts.len(), 3);
    assert_eq!(hosts[0], host("first.equal.test", 5, &["192.0.2.5"]));
    let mut rest = hosts[1..].to_vec();
    rest.sort_by(|left, right| left.name.cmp(&right.name));
    assert_eq!(
        rest,
        [
            host("a.equal.test", 10, &["192.0.2.6"]),
            host("b.equal.test", 10, &["192.0.2.7"]),
        ]
    );
}

#[test]
fn only_the_most_preferred_mx_hosts_are_kept() {
    let server = DnsServer::start();
    let hosts = server.resolver().lookup("many.test").unwrap();
    let preferences: Vec<u16> = hosts.iter().map(|host| host.preference).collect();
    let expected: Vec<u16> = (1..=MAX_MX_HOSTS as u16).collect();
    assert_eq!(preferences, expected);
    assert_eq!(hosts[0], host("mx1.many.test", 1, &["192.0.2.101"]));
}

#[test]
fn internationalized_domains_are_looked_up_as_a_labels() {
    let server = DnsServer::start();
    assert_eq!(
        server.resolver().lookup("bücher.test").unwrap(),
        [host("xn--bcher-kva.test", 0, &["192.0.2.4"])]
    );
}

/// A name server that never answers: UDP and TCP bound on one port, never read.
struct SilentServer {
    _udp: UdpSocket,
    _tcp: TcpListener,
    address: SocketAddr,
}

impl SilentServer {
    fn start() -> Self {
        // The UDP port the kernel picks may be taken for TCP by another process (CI
        // runs other servers meanwhile): pick again.
        for _ in 0..50 {
            let udp = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
            let address = udp.local_addr().expect("UDP address");
            if let Ok(tcp) = TcpListener::bind(address) {
                return Self {
                    _udp: udp,
                    _tcp: tcp,
                    address,
                };
            }
        }
        panic!("no port free for both UDP and TCP after 50 tries");
    }
}

#[test]
fn a_silent_name_server_is_a_temporary_failure_within_the_timeout() {
    let silent = SilentServer::start();
    let resolver = resolver_at(silent.address, SHORT_TIMEOUT);
    let started = Instant::now();
    let error = expect_temporary(resolver.lookup("example.test"));
    let elapsed = started.elapsed();
    assert!(
        elapsed < SHORT_TIMEOUT + DEADLINE_SLACK,
        "took {elapsed:?}: {error}"
    );
}

#[test]
fn address_literals_need_no_dns() {
    // A resolver whose server never answers: a literal must not wait for it.
    let silent = SilentServer::start();
    let resolver = resolver_at(silent.address, SHORT_TIMEOUT);
    let started = Instant::now();
    assert_eq!(
        resolver.lookup("[192.0.2.1]").unwrap(),
        [host("[192.0.2.1]", 0, &["192.0.2.1"])]
    );
    assert_eq!(
        resolver.lookup("[IPv6:2001:db8::1]").unwrap(),
        [host("[ipv6:2001:db8::1]", 0, &["2001:db8::1"])]
    );
    assert!(started.elapsed() < SHORT_TIMEOUT);
    expect_permanent(resolver.lookup("[192.0.2.300]"), "5.1.3");
}

#[test]
fn concurrent_lookups_from_many_threads() {
    const THREADS: usize = 8;
    const ROUNDS: usize = 5;
    let server = DnsServer::start();
    let resolver = server.resolver();
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let resolver = resolver.clone();
            thread::spawn(move || {
                for _ in 0..ROUNDS {
                    assert_eq!(resolver.lookup("two-mx.test").unwrap(), two_mx_hosts());
                    assert_eq!(
                        resolver.lookup("implicit.test").unwrap(),
                        [host("implicit.test", 0, &["192.0.2.1"])]
                    );
                    assert!(resolver.lookup("missing.test").unwrap_err().is_permanent());
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("a lookup thread failed");
    }
}

#[test]
fn lookups_after_shutdown_fail_temporarily_and_drop_does_not_hang() {
    let server = DnsServer::start();
    let resolver = server.resolver();
    let clone = resolver.clone();
    assert_eq!(clone.lookup("two-mx.test").unwrap(), two_mx_hosts());
    resolver.shutdown();
    let error = clone.lookup("two-mx.test").unwrap_err();
    assert!(matches!(error, MxError::Unavailable { .. }), "{error:?}");
    assert!(!error.is_permanent());

    let started = Instant::now();
    let resolver = server.resolver();
    resolver.lookup("two-mx.test").unwrap();
    drop(resolver);
    assert!(started.elapsed() < TEST_TIMEOUT);
}

#[test]
fn shutdown_ends_a_lookup_waiting_on_a_silent_server() {
    let silent = SilentServer::start();
    let resolver = resolver_at(silent.address, TEST_TIMEOUT);
    let waiting = {
        let resolver = resolver.clone();
        thread::spawn(move || resolver.lookup("example.test"))
    };
    // Let the lookup reach the resolver thread, then stop it under the lookup's feet.
    thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    resolver.shutdown();
    let result = waiting.join().expect("the lookup thread panicked");
    assert!(
        started.elapsed() < DEADLINE_SLACK,
        "{:?}",
        started.elapsed()
    );
    let error = result.unwrap_err();
    assert!(!error.is_permanent(), "{error}");
}

#[test]
fn lookup_inside_an_async_runtime_refuses_to_block() {
    let server = DnsServer::start();
    let resolver = server.resolver();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let error = runtime
        .block_on(async { resolver.lookup("two-mx.test") })
        .unwrap_err();
    assert!(matches!(error, MxError::Unavailable { .. }), "{error:?}");
}
