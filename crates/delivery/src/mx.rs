//! MX lookup (RFC 5321 §5.1): which hosts take mail for a domain, in which order, at
//! which addresses.
//!
//! Delivery workers are plain blocking threads, and hickory-resolver runs only on
//! tokio. [`MxResolver`] joins the two: it owns one background thread,
//! `tsubame-resolver`, running a current-thread tokio runtime with one hickory
//! resolver (so one cache). [`MxResolver::lookup`] sends its request over a bounded
//! channel, the thread spawns a task per request (so lookups from many workers
//! overlap), and the caller blocks until its own reply comes. Handles are cheap clones
//! of one shared resolver; the thread stops when the last handle is dropped or on
//! [`MxResolver::shutdown`].
//!
//! # Rules
//!
//! * **The domain** is matched case-insensitively and may end in one dot. Non-ASCII
//!   (U-label) domains, which SMTPUTF8 (RFC 6531) lets in, are converted to their
//!   A-label (`xn--`) form before the lookup, as IDNA2008 requires (RFC 5891 §5), using
//!   the UTS #46 conversion hickory-proto already carries. Every name is queried as a
//!   fully qualified name, never through the resolv.conf search list: names in SMTP are
//!   fully qualified (RFC 5321 §2.3.5). A domain that is an IP address in bare form is
//!   refused: an address must be written as an address literal.
//! * **Address literals** `[192.0.2.1]` and `[IPv6:2001:db8::1]` (RFC 5321 §4.1.3) name
//!   the host directly: that address, no DNS. Other tags of the general form
//!   (`[tag:…]`) are refused.
//! * **MX records** are tried by preference, lowest first; hosts of equal preference in
//!   random order, which RFC 5321 §5.1 requires to spread load. A host named twice
//!   keeps its lowest preference. At most [`MAX_MX_HOSTS`] are kept.
//! * **No MX records** (the name exists, the MX set is empty): the implicit MX, the
//!   domain itself at preference 0 (RFC 5321 §5.1). If it has no A or AAAA either, the
//!   failure is permanent.
//! * **Null MX** (RFC 7505 §3: a single MX whose exchange is the root, `.`): the domain
//!   accepts no mail; permanent, enhanced status 5.1.10 ("Recipient address has null
//!   MX", registered by RFC 7505). Root exchanges next to real ones (which RFC 7505 §3
//!   forbids) are dropped and the real ones used.
//! * **NXDOMAIN**: permanent, 5.1.2 "bad destination system address" (RFC 3463 §3.2).
//! * **SERVFAIL, REFUSED, timeouts, network errors**: temporary, 4.4.3 "directory server
//!   failure" (RFC 3463 §3.5). The whole lookup, MX and addresses together, has one
//!   deadline ([`ResolverOptions::timeout`]).
//! * **Addresses**: each host's A and AAAA are queried together, and IPv4 addresses come
//!   before IPv6 ones (IPv4 egress is the one nearly every relay has; an IPv6-only
//!   route is the exception). At most [`MAX_ADDRESSES_PER_HOST`] per host. A host
//!   without addresses is skipped (logged at debug); when no host has any, the failure
//!   is temporary: a broken MX host is the kind of DNS mistake that gets fixed within
//!   the queue's retry period.
//! * Local-host rules of RFC 5321 §5.1 (dropping MX records that point at this relay
//!   and all of worse preference) need the relay's own names and are the caller's.
//!
//! The caller connects to `SocketAddr::new(address, port)` with the port from its
//! configuration ([`MxHost::socket_addresses`]); [`SMTP_PORT`] is only the usual value.

use std::collections::HashSet;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, mpsc as std_mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData};
use tokio::sync::{Semaphore, mpsc as tokio_mpsc};
use tokio::task::JoinSet;
use tracing::debug;

/// The port SMTP servers listen on for relay (RFC 5321 §4.5.4.2, assigned by IANA).
/// The caller passes the port from its configuration; this is only the usual value.
pub const SMTP_PORT: u16 = 25;

/// Default deadline for one whole lookup (MX, then the hosts' addresses): the worst
/// case of the system stub resolver's defaults (resolv.conf(5): `timeout:5`,
/// `attempts:2`, up to 3 name servers, so 5 s × 2 × 3 = 30 s).
pub const DEFAULT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Timeout of one DNS query when [`ResolverOptions::nameserver`] is given (with system
/// configuration, resolv.conf's `timeout:` applies): resolv.conf(5)'s default.
pub const DNS_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Most MX hosts returned for one domain (the lowest preferences win). Postfix stops
/// after `smtp_mx_address_limit` = 5 addresses and `smtp_mx_session_limit` = 2
/// sessions per delivery attempt; that policy is the delivery engine's. This limit
/// only bounds the DNS work one domain can cause (at most 2 × 10 address queries
/// after the MX query) while leaving twice the five hosts large providers publish.
pub const MAX_MX_HOSTS: usize = 10;

/// Most addresses kept per host, IPv4 first. Round-robin address sets of large
/// providers hold a handful; once several addresses of one host have failed, more of
/// the same host seldom help, and the next MX host is the better try.
pub const MAX_ADDRESSES_PER_HOST: usize = 8;

/// Most lookups the resolver thread runs at once; further requests wait in the queue.
/// Each lookup has at most 1 + 2 × [`MAX_MX_HOSTS`] queries in flight, so this bounds
/// the thread's outstanding queries to about 1,300, far above what any number of
/// delivery workers we run needs, and far below what exhausts sockets.
pub const MAX_CONCURRENT_LOOKUPS: usize = 64;

/// Requests queued for the resolver thread before [`MxResolver::lookup`] blocks on
/// sending (backpressure instead of unbounded growth).
pub const REQUEST_QUEUE_DEPTH: usize = 256;

/// Longest valid domain name in text form, without the trailing dot: 255 octets on the
/// wire (RFC 1035 §2.3.4) less the length octet of the first label and the root label.
pub const MAX_DOMAIN_BYTES: usize = 253;

/// Longest destination accepted as written, before IDNA mapping: RFC 5321 §4.5.3.1.2's
/// 255 octets, the limit the server applies to the domain of every address it accepts
/// (`tsubame_smtp_proto::command::MAX_DOMAIN_BYTES`). Anything longer cannot have come
/// through it, and is refused before the comparatively costly UTS #46 processing.
pub const MAX_WRITTEN_DOMAIN_BYTES: usize = tsubame_smtp_proto::command::MAX_DOMAIN_BYTES;

/// Longest label (RFC 1035 §2.3.4).
pub const MAX_LABEL_BYTES: usize = 63;

/// How long [`MxResolver::new`] waits for the resolver thread to report that it has
/// read its configuration and started; reading resolv.conf takes microseconds.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long past the lookup deadline a caller waits for its reply before giving up on
/// the resolver thread. The thread enforces the deadline itself; this only keeps a
/// caller from hanging should the thread be stuck.
const REPLY_GRACE: Duration = Duration::from_secs(5);

/// How long stopping the runtime waits for work it cannot cancel (blocking tasks).
const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// Enhanced status of a domain that does not exist or cannot take mail (RFC 3463 §3.2,
/// X.1.2 "Bad destination system address").
pub const STATUS_BAD_DESTINATION_SYSTEM: &str = "5.1.2";
/// Enhanced status of a malformed destination (RFC 3463 §3.2, X.1.3 "Bad destination
/// mailbox address syntax", which "can apply to any field in the address").
pub const STATUS_BAD_DESTINATION_SYNTAX: &str = "5.1.3";
/// Enhanced status of a null MX domain (X.1.10, "Recipient address has null MX",
/// registered by RFC 7505).
pub const STATUS_NULL_MX: &str = "5.1.10";
/// Enhanced status of every [`MxError::Temporary`] (RFC 3463 §3.5, X.4.3 "Directory
/// server failure").
pub const STATUS_DIRECTORY_FAILURE: &str = "4.4.3";
/// Enhanced status of a local fault: the resolver could not start or has stopped
/// (RFC 3463 §3.4, X.3.0 "Other or undefined mail system status").
pub const STATUS_LOCAL_FAILURE: &str = "4.3.0";

/// How the resolver finds its name servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolverOptions {
    /// `Some`: ask only this server, over UDP and TCP, ignoring the system
    /// configuration (tests point it at a local DNS server). `None`: the name servers
    /// and options of `/etc/resolv.conf`.
    pub nameserver: Option<SocketAddr>,
    /// Deadline for one whole [`MxResolver::lookup`], MX and address queries together
    /// (or for one [`crate::txt::lookup_txt`]).
    pub timeout: Duration,
}

impl Default for ResolverOptions {
    fn default() -> Self {
        Self {
            nameserver: None,
            timeout: DEFAULT_LOOKUP_TIMEOUT,
        }
    }
}

/// One host to try, with its addresses in the order to try them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    /// The MX exchange (or the domain itself for the implicit MX, or the literal as
    /// written for an address literal): lower case ASCII, no trailing dot. This is the
    /// name to verify a TLS certificate against.
    pub name: String,
    /// MX preference; 0 for the implicit MX and address literals.
    pub preference: u16,
    /// Never empty: IPv4 first, then IPv6, at most [`MAX_ADDRESSES_PER_HOST`].
    pub addresses: Vec<IpAddr>,
}

impl MxHost {
    /// The addresses to connect to, in order, on `port` (the configured SMTP port,
    /// usually [`SMTP_PORT`]).
    pub fn socket_addresses(&self, port: u16) -> impl Iterator<Item = SocketAddr> + '_ {
        self.addresses
            .iter()
            .map(move |address| SocketAddr::new(*address, port))
    }
}

/// Why a lookup gave no host to try.
///
/// `Display` is one line naming the domain, fit for a bounce's Diagnostic-Code and for
/// logs; [`MxError::status`] is the enhanced status code to go with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MxError {
    /// Try again later: SERVFAIL, REFUSED, a timeout, a network error, or no MX host
    /// with an address. Enhanced status [`STATUS_DIRECTORY_FAILURE`].
    #[error("DNS lookup for {domain} failed temporarily: {reason}")]
    Temporary { domain: String, reason: String },
    /// The domain cannot take mail and retrying will not change that: it does not
    /// exist, publishes a null MX, has no MX and no address, or is malformed.
    #[error("{domain}: {reason}")]
    Permanent {
        domain: String,
        reason: String,
        /// Enhanced status code (RFC 3463), e.g. `"5.1.2"`.
        status: &'static str,
    },
    /// [`MxResolver::new`] could not read the system resolver configuration
    /// (`/etc/resolv.conf`).
    #[error("cannot use the system DNS configuration (/etc/resolv.conf): {reason}")]
    SystemConfig { reason: String },
    /// [`MxResolver::new`] could not start the resolver thread or its runtime.
    #[error("cannot start the DNS resolver: {reason}")]
    Start { reason: String },
    /// The resolver has been shut down, its thread is gone, or `lookup` was called
    /// where it must not block (inside an async runtime). A local fault: retry later.
    #[error("DNS resolver unavailable: {reason}")]
    Unavailable { reason: String },
}

impl MxError {
    /// True when retrying cannot help and the recipients should be bounced.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Permanent { .. })
    }

    /// The enhanced status code (RFC 3463) for a DSN or log line.
    pub fn status(&self) -> &'static str {
        match self {
            Self::Permanent { status, .. } => status,
            Self::Temporary { .. } => STATUS_DIRECTORY_FAILURE,
            Self::SystemConfig { .. } | Self::Start { .. } | Self::Unavailable { .. } => {
                STATUS_LOCAL_FAILURE
            }
        }
    }

    fn temporary(domain: &str, reason: impl Into<String>) -> Self {
        Self::Temporary {
            domain: domain.to_string(),
            reason: reason.into(),
        }
    }

    fn permanent(domain: &str, reason: impl Into<String>, status: &'static str) -> Self {
        Self::Permanent {
            domain: domain.to_string(),
            reason: reason.into(),
            status,
        }
    }
}

// ---------------------------------------------------------------------------------
// The destination: domain or address literal, checked before any DNS.

/// What the part after `@` names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Destination {
    /// An address literal; `text` is its normalised form, e.g. `[ipv6:2001:db8::1]`.
    Literal { text: String, address: IpAddr },
    /// A domain in lower case A-label form, without the trailing dot.
    Domain(String),
}

/// The tag of an IPv6 address literal (RFC 5321 §4.1.3), matched case-insensitively
/// like every ABNF string (RFC 5234 §2.3).
const IPV6_LITERAL_TAG: &str = "IPv6:";

/// Checks what follows `@` in a recipient address without any DNS: a domain comes back
/// in the form it is looked up in (lower-case A-labels, no trailing dot), an address
/// literal in its normalised form. The same check [`MxResolver::lookup`] makes first;
/// public for the fuzzer and for tools.
pub fn normalize_destination(input: &str) -> Result<String, MxError> {
    parse_destination(input).map(|destination| match destination {
        Destination::Literal { text, .. } => text,
        Destination::Domain(domain) => domain,
    })
}

fn parse_destination(input: &str) -> Result<Destination, MxError> {
    let malformed =
        |reason: String| MxError::permanent(input, reason, STATUS_BAD_DESTINATION_SYNTAX);
    if input.len() > MAX_WRITTEN_DOMAIN_BYTES {
        return Err(malformed(format!(
            "domain is {} bytes long as written, more than {MAX_WRITTEN_DOMAIN_BYTES} \
             (RFC 5321 §4.5.3.1.2)",
            input.len()
        )));
    }
    if let Some(inner) = input.strip_prefix('[') {
        let Some(inner) = inner.strip_suffix(']') else {
            return Err(malformed("unterminated address literal".to_string()));
        };
        return parse_address_literal(inner).map_err(malformed);
    }
    let ip_not_literal = || {
        malformed(
            "an IP address must be written as an address literal, e.g. [192.0.2.1] \
             (RFC 5321 §4.1.3)"
                .to_string(),
        )
    };
    if input.parse::<IpAddr>().is_ok() {
        return Err(ip_not_literal());
    }
    let without_root = input.strip_suffix('.').unwrap_or(input);
    let ascii = if without_root.is_ascii() {
        without_root.to_ascii_lowercase()
    } else {
        // U-labels to A-labels (IDNA2008 lookup, RFC 5891 §5) through hickory-proto's
        // UTS #46 processing, which also lower-cases and rejects disallowed characters.
        let name = Name::from_utf8(without_root).map_err(|error| {
            malformed(format!(
                "internationalized domain name cannot be converted to A-labels: {error}"
            ))
        })?;
        let ascii = name.to_ascii();
        ascii
            .strip_suffix('.')
            .unwrap_or(&ascii)
            .to_ascii_lowercase()
    };
    // IDNA mapping drops ignored characters (U+034F, U+200B, ...): "4\u{34f}.4.4.4"
    // becomes an IP address, which is refused as it would be when written plainly
    // (found by the mx_destination fuzz target).
    if ascii.parse::<IpAddr>().is_ok() {
        return Err(ip_not_literal());
    }
    check_hostname(&ascii).map_err(malformed)?;
    Ok(Destination::Domain(ascii))
}

fn parse_address_literal(inner: &str) -> Result<Destination, String> {
    let tag_len = IPV6_LITERAL_TAG.len();
    if inner.len() >= tag_len
        && inner.is_char_boundary(tag_len)
        && inner[..tag_len].eq_ignore_ascii_case(IPV6_LITERAL_TAG)
    {
        let text = &inner[tag_len..];
        let address: Ipv6Addr = text
            .parse()
            .map_err(|_| format!("invalid IPv6 address literal [{inner}]"))?;
        return Ok(Destination::Literal {
            text: format!("[ipv6:{address}]"),
            address: IpAddr::V6(address),
        });
    }
    if inner.contains(':') {
        return Err(format!(
            "unsupported address literal [{inner}]: only IPv4 and IPv6 literals are \
             supported (RFC 5321 §4.1.3)"
        ));
    }
    // Rust's parser takes exactly the dotted quad of RFC 5321's IPv4-address-literal:
    // four decimal octets, no leading zeros, no shorthand forms.
    let address: Ipv4Addr = inner
        .parse()
        .map_err(|_| format!("invalid IPv4 address literal [{inner}]"))?;
    Ok(Destination::Literal {
        text: format!("[{address}]"),
        address: IpAddr::V4(address),
    })
}

/// RFC 5321 §4.1.2 `Domain`: dot-separated labels of letters, digits and hyphens, each
/// starting and ending with a letter or digit, within RFC 1035 §2.3.4's lengths.
/// `name` is already lower case, without the trailing dot.
fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty domain".to_string());
    }
    if name.len() > MAX_DOMAIN_BYTES {
        return Err(format!(
            "domain is {} bytes long, more than {MAX_DOMAIN_BYTES}",
            name.len()
        ));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(format!("empty label in domain {name:?}"));
        }
        if label.len() > MAX_LABEL_BYTES {
            return Err(format!(
                "label of {} bytes in domain {name:?}, more than {MAX_LABEL_BYTES}",
                label.len()
            ));
        }
        let bytes = label.as_bytes();
        let letter_or_digit = |byte: &u8| byte.is_ascii_alphanumeric();
        if !bytes
            .iter()
            .all(|byte| letter_or_digit(byte) || *byte == b'-')
            || !bytes.first().is_some_and(letter_or_digit)
            || !bytes.last().is_some_and(letter_or_digit)
        {
            return Err(format!(
                "invalid label {label:?} in domain {name:?}: only letters, digits and \
                 inner hyphens are allowed (RFC 5321 §4.1.2)"
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Ordering MX records.

/// splitmix64 (Steele, Lea, Flood 2014): enough randomness to spread load over equal
/// MX preferences; nothing here needs to be unpredictable to an attacker.
#[derive(Debug, Clone)]
struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A seed from the standard library's per-process random hash keys.
    fn from_entropy() -> Self {
        Self::new(RandomState::new().hash_one(std::thread::current().id()))
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound` > 0), by multiply-and-shift: the bias is below
    /// `bound / 2^64`, nothing for a handful of MX hosts.
    fn below(&mut self, bound: usize) -> usize {
        let product = u128::from(self.next_u64()) * bound as u128;
        // The high half of a u64 × usize product is below `bound`, so it fits.
        (product >> 64) as usize
    }
}

/// Sorts by preference, lowest first, and shuffles each run of equal preferences
/// (RFC 5321 §5.1: the client MUST randomize them to spread the load).
fn order_by_preference<T>(
    records: &mut [T],
    preference: impl Fn(&T) -> u16,
    random: &mut SplitMix64,
) {
    records.sort_by_key(|record| preference(record));
    let mut start = 0;
    while start < records.len() {
        let first = preference(&records[start]);
        let mut end = start + 1;
        while end < records.len() && preference(&records[end]) == first {
            end += 1;
        }
        // Fisher–Yates over records[start..end].
        for last in (start + 1..end).rev() {
            let other = start + random.below(last - start + 1);
            records.swap(last, other);
        }
        start = end;
    }
}

// ---------------------------------------------------------------------------------
// The lookup itself, on the resolver thread.

/// A negative or failed DNS answer, as the rules above need it.
#[derive(Debug)]
pub(crate) enum Negative {
    /// NXDOMAIN: the name does not exist.
    NoSuchName,
    /// NOERROR with no records of the type asked for (NODATA).
    NoData,
    /// Anything else: SERVFAIL, REFUSED, timeout, network error.
    Failed(String),
}

pub(crate) fn classify(error: &NetError) -> Negative {
    match error {
        NetError::Dns(DnsError::NoRecordsFound(NoRecords { response_code, .. })) => {
            match *response_code {
                ResponseCode::NXDomain => Negative::NoSuchName,
                ResponseCode::NoError => Negative::NoData,
                code => Negative::Failed(format!("server answered {code}")),
            }
        }
        NetError::Dns(DnsError::ResponseCode(code)) => {
            Negative::Failed(format!("server answered {code}"))
        }
        other => Negative::Failed(other.to_string()),
    }
}

/// Which address record a query asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn record_type(self) -> &'static str {
        match self {
            Self::V4 => "A",
            Self::V6 => "AAAA",
        }
    }
}

/// The addresses of one name in one family, or why there are none.
#[derive(Debug)]
enum AddressAnswer {
    Found(Vec<IpAddr>),
    Missing(Negative),
}

async fn addresses_of(resolver: TokioResolver, name: Name, family: Family) -> AddressAnswer {
    let result = match family {
        Family::V4 => resolver.ipv4_lookup(name).await,
        Family::V6 => resolver.ipv6_lookup(name).await,
    };
    match result {
        Ok(lookup) => {
            let addresses: Vec<IpAddr> = lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::A(a) if family == Family::V4 => Some(IpAddr::V4(a.0)),
                    RData::AAAA(aaaa) if family == Family::V6 => Some(IpAddr::V6(aaaa.0)),
                    _ => None,
                })
                .collect();
            if addresses.is_empty() {
                AddressAnswer::Missing(Negative::NoData)
            } else {
                AddressAnswer::Found(addresses)
            }
        }
        Err(error) => AddressAnswer::Missing(classify(&error)),
    }
}

/// A host's A and AAAA answers, merged: its addresses, or why it has none.
#[derive(Debug)]
struct HostAddresses {
    addresses: Vec<IpAddr>,
    /// Each family without addresses, and why.
    missing: Vec<(Family, Negative)>,
}

/// Looks up A and AAAA for every name at once. The tasks live in a `JoinSet`, so when
/// the lookup's deadline drops this future, they are aborted with it.
async fn resolve_addresses(resolver: &TokioResolver, names: &[Name]) -> Vec<HostAddresses> {
    let mut tasks = JoinSet::new();
    for (index, name) in names.iter().enumerate() {
        for family in [Family::V4, Family::V6] {
            let (resolver, name) = (resolver.clone(), name.clone());
            tasks.spawn(async move { (index, family, addresses_of(resolver, name, family).await) });
        }
    }
    let mut answers: Vec<[Option<AddressAnswer>; 2]> = names.iter().map(|_| [None, None]).collect();
    while let Some(joined) = tasks.join_next().await {
        // A task that panicked leaves its slot empty, reported as a failure below.
        if let Ok((index, family, answer)) = joined
            && let Some(slots) = answers.get_mut(index)
        {
            slots[usize::from(family == Family::V6)] = Some(answer);
        }
    }
    answers
        .into_iter()
        .map(|[v4, v6]| {
            let mut host = HostAddresses {
                addresses: Vec::new(),
                missing: Vec::new(),
            };
            for (family, answer) in [(Family::V4, v4), (Family::V6, v6)] {
                match answer {
                    Some(AddressAnswer::Found(found)) => host.addresses.extend(found),
                    Some(AddressAnswer::Missing(why)) => host.missing.push((family, why)),
                    None => host.missing.push((
                        family,
                        Negative::Failed("lookup task ended without an answer".to_string()),
                    )),
                }
            }
            host.addresses.truncate(MAX_ADDRESSES_PER_HOST);
            host
        })
        .collect()
}

/// The domain as a fully qualified hickory name: never expanded by a search list.
fn fully_qualified(domain: &str) -> Result<Name, MxError> {
    let mut name = Name::from_ascii(domain).map_err(|error| {
        MxError::permanent(
            domain,
            format!("not a valid domain name: {error}"),
            STATUS_BAD_DESTINATION_SYNTAX,
        )
    })?;
    name.set_fqdn(true);
    Ok(name)
}

/// A hickory name as [`MxHost::name`] spells it: lower case, no trailing dot.
fn host_name(name: &Name) -> String {
    let ascii = name.to_ascii();
    ascii
        .strip_suffix('.')
        .unwrap_or(&ascii)
        .to_ascii_lowercase()
}

fn describe_failures(missing: &[(Family, Negative)], name: &str) -> Vec<String> {
    missing
        .iter()
        .filter_map(|(family, why)| match why {
            Negative::Failed(reason) => Some(format!(
                "{} lookup for {name}: {reason}",
                family.record_type()
            )),
            Negative::NoSuchName | Negative::NoData => None,
        })
        .collect()
}

/// The rules of the module documentation, for a domain in normalised form.
async fn resolve_domain(
    resolver: &TokioResolver,
    domain: &str,
    random: &mut SplitMix64,
) -> Result<Vec<MxHost>, MxError> {
    let name = fully_qualified(domain)?;
    let mut records: Vec<(u16, Name)> = match resolver.mx_lookup(name.clone()).await {
        // Answers may hold the CNAME chain too (RFC 5321 §5.1 follows it); keep the MX.
        Ok(lookup) => lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::MX(mx) => Some((mx.preference, mx.exchange.clone())),
                _ => None,
            })
            .collect(),
        Err(error) => match classify(&error) {
            Negative::NoData => Vec::new(),
            Negative::NoSuchName => {
                return Err(MxError::permanent(
                    domain,
                    "domain does not exist (NXDOMAIN)",
                    STATUS_BAD_DESTINATION_SYSTEM,
                ));
            }
            Negative::Failed(reason) => {
                return Err(MxError::temporary(domain, format!("MX lookup: {reason}")));
            }
        },
    };

    if records.is_empty() {
        return implicit_mx(resolver, domain, name).await;
    }
    let published = records.len();
    records.retain(|(_, exchange)| !exchange.is_root());
    if records.is_empty() {
        return Err(MxError::permanent(
            domain,
            "domain accepts no mail (null MX, RFC 7505)",
            STATUS_NULL_MX,
        ));
    }
    if records.len() < published {
        debug!(domain, "ignoring null MX published next to real MX records");
    }

    order_by_preference(&mut records, |(preference, _)| *preference, random);
    let mut seen = HashSet::new();
    records.retain(|(_, exchange)| seen.insert(host_name(exchange)));
    if records.len() > MAX_MX_HOSTS {
        debug!(
            domain,
            published = records.len(),
            kept = MAX_MX_HOSTS,
            "too many MX hosts; keeping the most preferred"
        );
        records.truncate(MAX_MX_HOSTS);
    }

    let names: Vec<Name> = records
        .iter()
        .map(|(_, exchange)| exchange.clone())
        .collect();
    let resolved = resolve_addresses(resolver, &names).await;
    let mut hosts = Vec::with_capacity(records.len());
    let mut failures = Vec::new();
    for ((preference, exchange), host) in records.into_iter().zip(resolved) {
        let name = host_name(&exchange);
        if host.addresses.is_empty() {
            debug!(domain, mx = name, "skipping MX host without addresses");
            failures.extend(describe_failures(&host.missing, &name));
            continue;
        }
        hosts.push(MxHost {
            name,
            preference,
            addresses: host.addresses,
        });
    }
    if hosts.is_empty() {
        let reason = if failures.is_empty() {
            format!(
                "none of the {} MX hosts has an A or AAAA address",
                names.len()
            )
        } else {
            format!("no MX host has a usable address ({})", failures.join("; "))
        };
        return Err(MxError::temporary(domain, reason));
    }
    Ok(hosts)
}

/// RFC 5321 §5.1: without MX records, the domain itself is the host, at preference 0.
async fn implicit_mx(
    resolver: &TokioResolver,
    domain: &str,
    name: Name,
) -> Result<Vec<MxHost>, MxError> {
    let resolved = resolve_addresses(resolver, std::slice::from_ref(&name)).await;
    let Some(host) = resolved.into_iter().next() else {
        return Err(MxError::temporary(domain, "address lookup gave no answer"));
    };
    if !host.addresses.is_empty() {
        return Ok(vec![MxHost {
            name: domain.to_string(),
            preference: 0,
            addresses: host.addresses,
        }]);
    }
    let failures = describe_failures(&host.missing, domain);
    if !failures.is_empty() {
        return Err(MxError::temporary(
            domain,
            format!("no MX records, and {}", failures.join("; ")),
        ));
    }
    let reason = if host
        .missing
        .iter()
        .any(|(_, why)| matches!(why, Negative::NoSuchName))
    {
        "domain does not exist (NXDOMAIN)"
    } else {
        "domain has no MX records and no A or AAAA address"
    };
    Err(MxError::permanent(
        domain,
        reason,
        STATUS_BAD_DESTINATION_SYSTEM,
    ))
}

// ---------------------------------------------------------------------------------
// The resolver thread and its handles.

type Reply = Result<Vec<MxHost>, MxError>;

/// One lookup for the resolver thread: a domain already checked and normalised.
struct Request {
    domain: String,
    /// Capacity 1: the task's one reply never blocks it.
    reply: std_mpsc::SyncSender<Reply>,
}

/// What every handle shares. Dropping the last handle drops this, which stops the
/// thread.
struct Shared {
    /// `None` once shut down. A lookup clones the sender out of the lock, so the lock
    /// is never held while blocking.
    sender: Mutex<Option<tokio_mpsc::Sender<Request>>>,
    /// Bounds the lookups in flight; closed on shutdown so queued requests are refused
    /// at once instead of waiting for a permit.
    permits: Arc<Semaphore>,
    thread: Mutex<Option<JoinHandle<()>>>,
    options: ResolverOptions,
}

impl Shared {
    fn shutdown(&self) {
        // Dropping the sender ends the thread's receive loop once the clones that
        // lookups in progress hold are gone.
        drop(
            self.sender
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        self.permits.close();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            debug!("the resolver thread had panicked");
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Blocking MX lookups for delivery workers, served by one background thread. Clone
/// it freely: every clone uses the same thread and cache.
#[derive(Clone)]
pub struct MxResolver {
    shared: Arc<Shared>,
}

impl fmt::Debug for MxResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MxResolver")
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

impl MxResolver {
    /// Starts the resolver thread. Fails when `options.nameserver` is `None` and
    /// `/etc/resolv.conf` cannot be read or names no server, or when the thread or its
    /// runtime cannot start.
    pub fn new(options: ResolverOptions) -> Result<Self, MxError> {
        let (setup_sender, setup_receiver) = std_mpsc::sync_channel(1);
        let (request_sender, request_receiver) = tokio_mpsc::channel(REQUEST_QUEUE_DEPTH);
        let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_LOOKUPS));
        let thread_permits = Arc::clone(&permits);
        let thread = std::thread::Builder::new()
            .name("tsubame-resolver".to_string())
            .spawn(move || {
                run_resolver_thread(options, request_receiver, thread_permits, setup_sender);
            })
            .map_err(|error| MxError::Start {
                reason: format!("spawning the resolver thread: {error}"),
            })?;
        // From here on, dropping `shared` stops and joins the thread.
        let shared = Shared {
            sender: Mutex::new(Some(request_sender)),
            permits,
            thread: Mutex::new(Some(thread)),
            options,
        };
        match setup_receiver.recv_timeout(STARTUP_TIMEOUT) {
            Ok(Ok(())) => Ok(Self {
                shared: Arc::new(shared),
            }),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(MxError::Start {
                reason: format!("the resolver thread did not start within {STARTUP_TIMEOUT:?}"),
            }),
        }
    }

    /// The hosts to try for `domain`, in order (see the module documentation for the
    /// rules). Blocks for at most about [`ResolverOptions::timeout`]. `domain` is what
    /// follows `@` in an address: a domain, with or without a trailing dot, in any
    /// case, or an address literal.
    ///
    /// Call it from a plain thread: inside an async runtime it refuses to block and
    /// returns [`MxError::Unavailable`].
    pub fn lookup(&self, domain: &str) -> Result<Vec<MxHost>, MxError> {
        let domain = match parse_destination(domain)? {
            Destination::Literal { text, address } => {
                return Ok(vec![MxHost {
                    name: text,
                    preference: 0,
                    addresses: vec![address],
                }]);
            }
            Destination::Domain(domain) => domain,
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(MxError::Unavailable {
                reason: "lookup blocks and was called inside an async runtime".to_string(),
            });
        }
        let sender = self
            .shared
            .sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(sender) = sender else {
            return Err(MxError::Unavailable {
                reason: "the resolver has been shut down".to_string(),
            });
        };
        let (reply, answer) = std_mpsc::sync_channel(1);
        if sender.blocking_send(Request { domain, reply }).is_err() {
            return Err(MxError::Unavailable {
                reason: "the resolver thread has stopped".to_string(),
            });
        }
        drop(sender);
        let wait = self.shared.options.timeout.saturating_add(REPLY_GRACE);
        match answer.recv_timeout(wait) {
            Ok(result) => result,
            Err(std_mpsc::RecvTimeoutError::Timeout) => Err(MxError::Unavailable {
                reason: format!("the resolver thread gave no answer within {wait:?}"),
            }),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => Err(MxError::Unavailable {
                reason: "the resolver stopped before answering".to_string(),
            }),
        }
    }

    /// Stops the resolver thread for every clone and waits for it. Lookups in progress
    /// and later ones fail with [`MxError::Unavailable`]. Dropping the last clone does
    /// the same.
    pub fn shutdown(&self) {
        self.shared.shutdown();
    }
}

/// The resolver thread: builds the runtime and resolver, reports the outcome to
/// [`MxResolver::new`], then serves requests until every sender is gone.
fn run_resolver_thread(
    options: ResolverOptions,
    requests: tokio_mpsc::Receiver<Request>,
    permits: Arc<Semaphore>,
    setup: std_mpsc::SyncSender<Result<(), MxError>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = setup.send(Err(MxError::Start {
                reason: format!("building the tokio runtime: {error}"),
            }));
            return;
        }
    };
    // hickory spawns its background work on the current runtime: build it inside.
    let resolver = {
        let _entered = runtime.enter();
        build_resolver(&options)
    };
    let resolver = match resolver {
        Ok(resolver) => resolver,
        Err(error) => {
            let _ = setup.send(Err(error));
            return;
        }
    };
    if setup.send(Ok(())).is_err() {
        return;
    }
    runtime.block_on(serve(resolver, requests, permits, options.timeout));
    // Tasks still running (their callers gave up or the resolver was shut down) are
    // cancelled here; dropping their reply senders tells any caller still waiting.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
}

pub(crate) fn build_resolver(options: &ResolverOptions) -> Result<TokioResolver, MxError> {
    let (config, mut resolver_options) = match options.nameserver {
        Some(server) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = server.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = server.port();
            let name_server = NameServerConfig::new(server.ip(), true, vec![udp, tcp]);
            let mut resolver_options = ResolverOpts::default();
            resolver_options.timeout = DNS_QUERY_TIMEOUT;
            (
                ResolverConfig::from_name_servers(vec![name_server]),
                resolver_options,
            )
        }
        None => hickory_resolver::system_conf::read_system_conf().map_err(|error| {
            MxError::SystemConfig {
                reason: error.to_string(),
            }
        })?,
    };
    // MX routing is DNS only: /etc/hosts knows nothing of mail exchangers, and an
    // entry there must not silently redirect a domain's mail.
    resolver_options.use_hosts_file = ResolveHosts::Never;
    // No single query may outlast the whole lookup.
    resolver_options.timeout = resolver_options.timeout.min(options.timeout);
    let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
    *builder.options_mut() = resolver_options;
    builder.build().map_err(|error| MxError::Start {
        reason: format!("building the DNS resolver: {error}"),
    })
}

/// The receive loop: one task per request, at most [`MAX_CONCURRENT_LOOKUPS`] at once.
async fn serve(
    resolver: TokioResolver,
    mut requests: tokio_mpsc::Receiver<Request>,
    permits: Arc<Semaphore>,
    timeout: Duration,
) {
    let mut random = SplitMix64::from_entropy();
    while let Some(request) = requests.recv().await {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            // Closed: shutting down. Answer now rather than leave the caller waiting.
            let _ = request.reply.try_send(Err(MxError::Unavailable {
                reason: "the resolver has been shut down".to_string(),
            }));
            continue;
        };
        let resolver = resolver.clone();
        // Each task shuffles with its own generator, seeded from the loop's.
        let mut task_random = SplitMix64::new(random.next_u64());
        tokio::spawn(async move {
            let domain = request.domain;
            let result = match tokio::time::timeout(
                timeout,
                resolve_domain(&resolver, &domain, &mut task_random),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err(MxError::temporary(
                    &domain,
                    format!("no complete DNS answer within {timeout:?}"),
                )),
            };
            // The caller may have given up; then nobody needs the answer.
            let _ = request.reply.try_send(result);
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(input: &str) -> Result<Destination, MxError> {
        parse_destination(input)
    }

    #[test]
    fn domains_are_normalised() {
        let cases = [
            ("example.com", "example.com"),
            ("Example.COM", "example.com"),
            ("example.com.", "example.com"),
            ("MX-1.example.com.", "mx-1.example.com"),
            ("localhost", "localhost"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("bücher.example", "xn--bcher-kva.example"),
            ("BÜCHER.example.", "xn--bcher-kva.example"),
        ];
        for (input, expected) in cases {
            assert_eq!(
                domain(input),
                Ok(Destination::Domain(expected.to_string())),
                "{input}"
            );
        }
    }

    #[test]
    fn malformed_domains_are_permanent_syntax_errors() {
        let long_label = "a".repeat(MAX_LABEL_BYTES + 1);
        // 25 labels of 9 bytes, 24 dots and ".com": exactly the limit; one more label
        // is over it.
        let longest_domain = format!("{}.com", ["abcdefghi"; 25].join("."));
        assert_eq!(longest_domain.len(), MAX_DOMAIN_BYTES);
        assert!(domain(&longest_domain).is_ok());
        let long_domain = format!("a.{longest_domain}");
        // Within the written limit, IDNA mapping may still shorten a name: 250 soft
        // hyphens (U+00AD, ignored) around a short name are 500 bytes and refused as
        // written, while 100 of them (200 bytes) map away and the name is accepted.
        let hyphens = |count: usize| "\u{ad}".repeat(count);
        assert_eq!(
            domain(&format!("exa{}mple.com", hyphens(100))),
            Ok(Destination::Domain("example.com".to_string()))
        );
        let over_written = format!("exa{}mple.com", hyphens(250));
        let written_error = domain(&over_written).expect_err("over the written limit");
        assert!(
            written_error.to_string().contains("more than 255"),
            "{written_error}"
        );
        let cases = [
            over_written.as_str(),
            "",
            ".",
            "..",
            "example..com",
            ".example.com",
            "example.com..",
            "-example.com",
            "example-.com",
            "exa mple.com",
            "exa_mple.com",
            "example.com/x",
            "*.example.com",
            long_label.as_str(),
            long_domain.as_str(),
            "192.0.2.1",
            "2001:db8::1",
            "[192.0.2.1",
            "[]",
            "[192.0.2]",
            "[192.0.2.256]",
            "[192.000.2.1]",
            "[IPv6:192.0.2.1]",
            "[IPv6:2001:db8::1%eth0]",
            "[x400:something]",
            "[2001:db8::1]",
            "ex\u{0}ample.com",
            // IDNA drops U+034F: what is left is an IP address (found by fuzzing).
            "4\u{34f}.4\u{34f}\u{34f}.4\u{34f}\u{34f}.4\u{34f}.",
            "192.0.2.1\u{200b}",
        ];
        for input in cases {
            let error = domain(input).expect_err(input);
            assert!(error.is_permanent(), "{input}: {error}");
            assert_eq!(error.status(), STATUS_BAD_DESTINATION_SYNTAX, "{input}");
        }
    }

    #[test]
    fn address_literals_need_no_dns() {
        let cases = [
            ("[192.0.2.1]", "[192.0.2.1]", "192.0.2.1"),
            ("[IPv6:2001:db8::1]", "[ipv6:2001:db8::1]", "2001:db8::1"),
            ("[ipv6:2001:DB8:0::1]", "[ipv6:2001:db8::1]", "2001:db8::1"),
            (
                "[IPV6:::ffff:192.0.2.1]",
                "[ipv6:::ffff:192.0.2.1]",
                "::ffff:192.0.2.1",
            ),
        ];
        for (input, text, address) in cases {
            assert_eq!(
                domain(input),
                Ok(Destination::Literal {
                    text: text.to_string(),
                    address: address.parse().expect("test address"),
                }),
                "{input}"
            );
        }
    }

    #[test]
    fn preference_order_with_equal_preferences_shuffled() {
        let records = [(20, "c"), (10, "a"), (30, "e"), (10, "b"), (20, "d")];
        let mut orders_of_first_pair = HashSet::new();
        for seed in 0..64 {
            let mut shuffled = records;
            order_by_preference(
                &mut shuffled,
                |(preference, _)| *preference,
                &mut SplitMix64::new(seed),
            );
            let preferences: Vec<u16> =
                shuffled.iter().map(|(preference, _)| *preference).collect();
            assert_eq!(preferences, [10, 10, 20, 20, 30]);
            let mut first_pair: Vec<&str> = shuffled[..2].iter().map(|(_, name)| *name).collect();
            orders_of_first_pair.insert(first_pair.clone());
            first_pair.sort_unstable();
            assert_eq!(first_pair, ["a", "b"]);
            let mut second_pair: Vec<&str> = shuffled[2..4].iter().map(|(_, name)| *name).collect();
            second_pair.sort_unstable();
            assert_eq!(second_pair, ["c", "d"]);
        }
        // Both orders of the equal pair occur: the shuffle is not a no-op.
        assert_eq!(orders_of_first_pair.len(), 2);
    }

    #[test]
    fn the_same_seed_gives_the_same_order() {
        let records: Vec<(u16, u32)> = (0..8).map(|index| (5, index)).collect();
        let mut first = records.clone();
        let mut second = records;
        order_by_preference(
            &mut first,
            |(preference, _)| *preference,
            &mut SplitMix64::new(7),
        );
        order_by_preference(
            &mut second,
            |(preference, _)| *preference,
            &mut SplitMix64::new(7),
        );
        assert_eq!(first, second);
    }

    #[test]
    fn below_stays_in_range() {
        let mut random = SplitMix64::new(1);
        for bound in 1..50 {
            for _ in 0..100 {
                assert!(random.below(bound) < bound);
            }
        }
    }

    #[test]
    fn errors_say_permanent_or_not_and_their_status() {
        let temporary = MxError::temporary("example.com", "MX lookup: request timed out");
        assert!(!temporary.is_permanent());
        assert_eq!(temporary.status(), "4.4.3");
        assert_eq!(
            temporary.to_string(),
            "DNS lookup for example.com failed temporarily: MX lookup: request timed out"
        );
        let permanent = MxError::permanent(
            "example.com",
            "domain accepts no mail (null MX, RFC 7505)",
            STATUS_NULL_MX,
        );
        assert!(permanent.is_permanent());
        assert_eq!(permanent.status(), "5.1.10");
        assert_eq!(
            permanent.to_string(),
            "example.com: domain accepts no mail (null MX, RFC 7505)"
        );
        let unavailable = MxError::Unavailable {
            reason: "shut down".to_string(),
        };
        assert!(!unavailable.is_permanent());
        assert_eq!(unavailable.status(), "4.3.0");
    }

    #[test]
    fn socket_addresses_use_the_given_port() {
        let host = MxHost {
            name: "mx.example.com".to_string(),
            preference: 10,
            addresses: vec![
                "192.0.2.1".parse().expect("test address"),
                "2001:db8::1".parse().expect("test address"),
            ],
        };
        let addresses: Vec<SocketAddr> = host.socket_addresses(2525).collect();
        assert_eq!(
            addresses,
            [
                "192.0.2.1:2525"
                    .parse::<SocketAddr>()
                    .expect("test address"),
                "[2001:db8::1]:2525".parse().expect("test address"),
            ]
        );
    }
}
