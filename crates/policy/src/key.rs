//! What a limit is counted against: a client address or a user name, normalised so that
//! trivially different spellings share one counter and no key is unboundedly large.

use std::net::{IpAddr, Ipv6Addr};

/// IPv6 clients are counted per /64: that is the usual end-site allocation (RFC 6177
/// section 2 recommends no less for any site), so one subscriber holds a whole /64 and
/// could otherwise rotate through 2^64 addresses to get fresh counters.
pub const IPV6_KEY_PREFIX_BITS: u32 = 64;

/// Longest user name kept in a key, in bytes: 256, the longest path RFC 5321 section
/// 4.5.3.1.3 allows, which covers login names that are mail addresses. Longer names (from
/// a client that sends junk) are cut to this length, so all names sharing their first 256
/// bytes share one counter; no configured user has such a name.
pub const MAX_USER_NAME_BYTES: usize = 256;

/// A client address or a user name. Build it with [`Key::ip`] or [`Key::user`], which
/// normalise it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key(KeyKind);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum KeyKind {
    /// IPv4, or an IPv6 address with all but its first [`IPV6_KEY_PREFIX_BITS`] zeroed.
    Ip(IpAddr),
    /// ASCII-lowercased, at most [`MAX_USER_NAME_BYTES`] bytes.
    User(Box<str>),
}

impl Key {
    /// The key of a client address: IPv4 as is; IPv4-mapped IPv6 as the IPv4 address
    /// (the same client reached over a dual-stack socket); other IPv6 by its /64.
    pub fn ip(address: IpAddr) -> Self {
        let normalised = match address {
            IpAddr::V4(v4) => IpAddr::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let mask = u128::MAX << (128 - IPV6_KEY_PREFIX_BITS);
                    IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & mask))
                }
            },
        };
        Self(KeyKind::Ip(normalised))
    }

    /// The key of a user name: ASCII case folded (login names are matched without case
    /// by most deployments, and a guesser must not get a fresh counter per spelling),
    /// cut to [`MAX_USER_NAME_BYTES`] at a character boundary.
    pub fn user(name: &str) -> Self {
        let mut end = name.len().min(MAX_USER_NAME_BYTES);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let kept = name.get(..end).unwrap_or_default();
        Self(KeyKind::User(kept.to_ascii_lowercase().into_boxed_str()))
    }
}
