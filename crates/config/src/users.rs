//! Device accounts for SMTP AUTH: `[[user]]` entries, in the main configuration and/or in
//! the file named by `[auth] users_file`, and the password check.
//!
//! ```toml
//! [[user]]
//! name = "printer-2f"                        # the login; case-sensitive
//! password_hash = "$argon2id$v=19$m=19456,t=2,p=1$…"   # `tsubame user add` writes it
//! allowed_senders = ["scanner@example.com", "@example.com", ".example.com"]  # empty: any
//! allowed_recipient_domains = ["example.com", ".example.org"]              # empty: any
//! upstream = "relay"                         # optional; an [[upstream]] name or "mx"
//! ```
//!
//! Passwords are stored only as argon2id hashes in the PHC string format. A hash is
//! checked when the file is loaded (it must parse, be argon2id, carry its salt and output,
//! and ask for no more than the `HASH_*_MAX` limits), so a bad entry is a
//! `FILE:LINE:COLUMN` error at start instead of a login that can never succeed. Neither
//! errors nor `Debug` output ever show a hash.
//!
//! Verifying a password ([`Users::verify`]) costs what the hash's parameters ask for:
//! with the defaults (m = 19 MiB, t = 2, p = 1) tens of milliseconds of one core and
//! 19 MiB of memory. It must run on a worker thread, never on an event loop.

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params};
use std::collections::HashMap;

use serde::{Deserialize, Deserializer};

use crate::delivery::domain_matches;

/// Longest login name. RFC 4616 §2: a PLAIN server must accept an authentication
/// identity of up to 255 octets; we accept no more, so every name we store can log in.
pub const USER_NAME_BYTES_MAX: usize = 255;

/// Longest password we hash or verify. RFC 4616 §2 requires up to 255 octets; 1024 leaves
/// room for generated passphrases while keeping hostile input small.
pub const PASSWORD_BYTES_MAX: usize = 1024;

/// Most `[[user]]` entries over the configuration and the users file together. Lookup is
/// a linear scan, which at this size is microseconds against a hash's tens of ms.
pub const USERS_MAX: usize = 10_000;

/// Most memory one verification may ask for, in KiB (256 MiB). A hash asking for more
/// would let each login attempt take that much of the machine; OWASP's strongest
/// argon2id setting asks for 46 MiB.
pub const HASH_MEMORY_KIB_MAX: u32 = 256 * 1024;

/// Most passes one verification may ask for. OWASP's argon2id settings use 1 to 5.
pub const HASH_ITERATIONS_MAX: u32 = 16;

/// Most lanes one verification may ask for. The argon2 crate computes lanes one after
/// another (no `parallel` feature), so lanes add time like passes do.
pub const HASH_LANES_MAX: u32 = 16;

/// An argon2id hash with the crate's default parameters (m = 19456 KiB, t = 2, p = 1;
/// the same as `tsubame user add` writes) of a random password nobody knows. An unknown
/// name is verified against it so that it takes as long as a known one and the timing
/// of a failed login does not tell which names exist.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$\
    GnlactYWiah1MWKK80nPLQ$bupCbZCujrYlMJM4kwP/tvun3Cgw2cMrzxHsMJ2eAXU";

/// One device account.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// The login. Invariant: 1..=[`USER_NAME_BYTES_MAX`] bytes, no control characters.
    /// Compared byte for byte (case-sensitive).
    #[serde(deserialize_with = "deserialize_name")]
    pub name: String,
    /// Invariant: a well-formed argon2id PHC string within the `HASH_*_MAX` limits.
    pub password_hash: PasswordHashText,
    /// Envelope senders this user may use; empty means any.
    #[serde(default)]
    pub allowed_senders: Vec<SenderPattern>,
    /// Recipient domains this user may send to (exact, or `.example.com` for its
    /// subdomains, case-insensitive); empty means any.
    #[serde(default, deserialize_with = "deserialize_domains")]
    pub allowed_recipient_domains: Vec<String>,
    /// The upstream this user's mail goes through, overriding the routes. Invariant after
    /// validation: names an `[[upstream]]` or `mx`.
    #[serde(default)]
    pub upstream: Option<String>,
}

impl User {
    /// May this user send with envelope sender `mail_from` (an address without angle
    /// brackets; empty for the null sender `<>`)? With no `allowed_senders`, yes. The null
    /// sender matches no pattern, so a restricted user cannot send bounces.
    pub fn sender_allowed(&self, mail_from: &str) -> bool {
        self.allowed_senders.is_empty()
            || self
                .allowed_senders
                .iter()
                .any(|pattern| pattern.matches(mail_from))
    }

    /// May this user send to `recipient` (an address)? With no
    /// `allowed_recipient_domains`, yes.
    pub fn recipient_allowed(&self, recipient: &str) -> bool {
        if self.allowed_recipient_domains.is_empty() {
            return true;
        }
        let Some((_, domain)) = recipient.rsplit_once('@') else {
            return false;
        };
        self.allowed_recipient_domains
            .iter()
            .any(|pattern| domain_matches(pattern, domain))
    }
}

/// An argon2id password hash in PHC string format (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`).
/// Its `Debug` shows no part of it; only [`PasswordHashText::expose`] does, for writing
/// the users file.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct PasswordHashText(String);

impl PasswordHashText {
    /// Checks that `text` is an argon2id PHC string we can verify against. The error
    /// never contains the text.
    pub fn new(text: String) -> Result<Self, String> {
        let hash = PasswordHash::new(&text).map_err(|error| {
            format!("password_hash is not a PHC string ({error}); make one with `tsubame user add`")
        })?;
        if Algorithm::new(hash.algorithm.as_str()) != Ok(Algorithm::Argon2id) {
            return Err(format!(
                "password_hash uses {:?}; only argon2id is accepted (make one with `tsubame user add`)",
                hash.algorithm.as_str()
            ));
        }
        if hash.salt.is_none() || hash.hash.is_none() {
            return Err("password_hash lacks its salt or its hash output".to_string());
        }
        let params = Params::try_from(&hash)
            .map_err(|error| format!("password_hash has invalid argon2 parameters ({error})"))?;
        if let Some(version) = hash.version
            && argon2::Version::try_from(version).is_err()
        {
            return Err(format!(
                "password_hash has unknown argon2 version {version}"
            ));
        }
        let limits = [
            ("m (memory, KiB)", params.m_cost(), HASH_MEMORY_KIB_MAX),
            ("t (passes)", params.t_cost(), HASH_ITERATIONS_MAX),
            ("p (lanes)", params.p_cost(), HASH_LANES_MAX),
        ];
        for (what, value, maximum) in limits {
            if value > maximum {
                return Err(format!(
                    "password_hash asks for {what} = {value}; at most {maximum} is accepted"
                ));
            }
        }
        Ok(Self(text))
    }

    /// The PHC string, for the one place that writes it to the users file.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PasswordHashText {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Self::new(text)
    }
}

impl std::fmt::Debug for PasswordHashText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordHashText(***)")
    }
}

/// One entry of `allowed_senders`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum SenderPattern {
    /// `local@domain`: this address; the local part compared exactly (RFC 5321 §2.4
    /// leaves its case to the receiving host), the domain case-insensitively.
    Address { local: String, domain: String },
    /// `@example.com`: any address at exactly this domain (case-insensitive).
    Domain(String),
    /// `.example.com`: any address at a subdomain of it (not at example.com itself),
    /// as in the routes' domain patterns.
    Subdomains(String),
}

impl SenderPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let invalid = || {
            format!("allowed_senders entry {text:?} is not an address, @domain or .domain pattern")
        };
        if text.is_empty() || text.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(invalid());
        }
        if let Some(domain) = text.strip_prefix('@') {
            return valid_domain(domain)
                .then(|| Self::Domain(domain.to_string()))
                .ok_or_else(invalid);
        }
        if let Some(parent) = text.strip_prefix('.') {
            return valid_domain(parent)
                .then(|| Self::Subdomains(text.to_string()))
                .ok_or_else(invalid);
        }
        match text.rsplit_once('@') {
            Some((local, domain)) if !local.is_empty() && valid_domain(domain) => {
                Ok(Self::Address {
                    local: local.to_string(),
                    domain: domain.to_string(),
                })
            }
            _ => Err(invalid()),
        }
    }

    /// Does `address` (`local@domain`, no angle brackets) match?
    pub fn matches(&self, address: &str) -> bool {
        let Some((local, domain)) = address.rsplit_once('@') else {
            return false;
        };
        match self {
            Self::Address {
                local: want_local,
                domain: want_domain,
            } => local == want_local && domain.eq_ignore_ascii_case(want_domain),
            Self::Domain(want_domain) => domain.eq_ignore_ascii_case(want_domain),
            Self::Subdomains(pattern) => domain_matches(pattern, domain),
        }
    }
}

impl TryFrom<String> for SenderPattern {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Self::parse(&text)
    }
}

impl std::fmt::Display for SenderPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Address { local, domain } => write!(f, "{local}@{domain}"),
            Self::Domain(domain) => write!(f, "@{domain}"),
            Self::Subdomains(pattern) => f.write_str(pattern),
        }
    }
}

/// A domain as the patterns take it: non-empty, no `@`, no empty label.
fn valid_domain(domain: &str) -> bool {
    !domain.is_empty()
        && !domain.contains('@')
        && domain.split('.').all(|label| !label.is_empty())
        && !domain.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// Checks a login name against [`User::name`]'s invariant.
pub fn check_user_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > USER_NAME_BYTES_MAX {
        return Err(format!(
            "a user name must be 1 to {USER_NAME_BYTES_MAX} bytes long"
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("a user name must not contain control characters".to_string());
    }
    Ok(())
}

fn deserialize_name<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let name = String::deserialize(deserializer)?;
    check_user_name(&name).map_err(serde::de::Error::custom)?;
    Ok(name)
}

fn deserialize_domains<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    let domains = Vec::<String>::deserialize(deserializer)?;
    for domain in &domains {
        let bare = domain.strip_prefix('.').unwrap_or(domain);
        if !valid_domain(bare) {
            return Err(serde::de::Error::custom(format!(
                "allowed_recipient_domains entry {domain:?} is not a domain or .domain pattern"
            )));
        }
    }
    Ok(domains)
}

/// Why a login failed. Whatever the variant, the client must get the same reply
/// (`535 5.7.8`, RFC 4954 §6), so that it learns nothing about which names exist.
/// No variant carries the name tried: people type passwords into the name field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("no such user")]
    UnknownUser,
    #[error("wrong password")]
    WrongPassword,
    #[error("password longer than {PASSWORD_BYTES_MAX} bytes")]
    PasswordTooLong,
    /// The hash could not be computed (e.g. out of memory); not the client's fault.
    #[error("password verification failed: {reason}")]
    Internal { reason: String },
}

/// Why a new password could not be hashed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    #[error("the password is empty")]
    Empty,
    #[error("the password is longer than {PASSWORD_BYTES_MAX} bytes")]
    TooLong,
    #[error("hashing the password failed: {reason}")]
    Hashing { reason: String },
}

/// Hashes a new password with argon2id and the argon2 crate's default parameters, which
/// are OWASP's first recommendation: m = 19456 KiB (19 MiB), t = 2, p = 1, a random
/// 16-byte salt, 32-byte output. Takes tens of milliseconds.
pub fn hash_password(password: &[u8]) -> Result<PasswordHashText, PasswordError> {
    if password.is_empty() {
        return Err(PasswordError::Empty);
    }
    if password.len() > PASSWORD_BYTES_MAX {
        return Err(PasswordError::TooLong);
    }
    let hash =
        Argon2::default()
            .hash_password(password)
            .map_err(|error| PasswordError::Hashing {
                reason: error.to_string(),
            })?;
    PasswordHashText::new(hash.to_string()).map_err(|reason| PasswordError::Hashing { reason })
}

/// Checks `password` against a PHC string with the string's own parameters.
fn check_password(phc: &str, password: &[u8]) -> Result<(), VerifyError> {
    let hash = PasswordHash::new(phc).map_err(|error| VerifyError::Internal {
        reason: error.to_string(),
    })?;
    match Argon2::default().verify_password(password, &hash) {
        Ok(()) => Ok(()),
        Err(argon2::password_hash::Error::PasswordInvalid) => Err(VerifyError::WrongPassword),
        Err(error) => Err(VerifyError::Internal {
            reason: error.to_string(),
        }),
    }
}

/// Every device account. Invariant: names are unique and there are at most
/// [`USERS_MAX`] (checked when the configuration is loaded).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "Vec<User>")]
pub struct Users {
    users: Vec<User>,
    /// Position in `users` by name (the first entry of a name), so a logged-in user's
    /// account is found in constant time at every MAIL and RCPT.
    by_name: HashMap<String, usize>,
}

impl From<Vec<User>> for Users {
    fn from(users: Vec<User>) -> Self {
        let mut by_name = HashMap::with_capacity(users.len());
        for (index, user) in users.iter().enumerate() {
            by_name.entry(user.name.clone()).or_insert(index);
        }
        Self { users, by_name }
    }
}

impl Users {
    /// Builds the collection, refusing duplicate names and more than [`USERS_MAX`].
    pub fn new(users: Vec<User>) -> Result<Self, String> {
        let users = Self::from(users);
        users.check().map_err(|(_, message)| message)?;
        Ok(users)
    }

    /// The index of the first entry at fault, and why.
    pub(crate) fn check(&self) -> Result<(), (usize, String)> {
        if self.users.len() > USERS_MAX {
            return Err((USERS_MAX, format!("more than {USERS_MAX} [[user]] entries")));
        }
        let mut seen = std::collections::HashSet::new();
        for (index, user) in self.users.iter().enumerate() {
            if !seen.insert(user.name.as_str()) {
                return Err((index, format!("user {:?} is defined twice", user.name)));
            }
        }
        Ok(())
    }

    pub fn find(&self, name: &str) -> Option<&User> {
        self.by_name
            .get(name)
            .and_then(|&index| self.users.get(index))
    }

    pub fn iter(&self) -> std::slice::Iter<'_, User> {
        self.users.iter()
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub(crate) fn push_all(&mut self, more: Users) {
        for user in more.users {
            self.by_name
                .entry(user.name.clone())
                .or_insert(self.users.len());
            self.users.push(user);
        }
    }

    /// Checks a login. An unknown name is verified against a dummy hash, so it costs
    /// as much time as a known one.
    ///
    /// CPU-heavy: tens of milliseconds and 19 MiB with the default parameters. Call it
    /// on a worker thread, never on an event loop.
    pub fn verify(&self, name: &str, password: &[u8]) -> Result<&User, VerifyError> {
        if password.len() > PASSWORD_BYTES_MAX {
            return Err(VerifyError::PasswordTooLong);
        }
        match self.find(name) {
            Some(user) => check_password(user.password_hash.expose(), password).map(|()| user),
            None => {
                // Spend the time; the outcome is a failure whatever it says.
                let _ = check_password(DUMMY_HASH, password);
                Err(VerifyError::UnknownUser)
            }
        }
    }

    /// May `user` send with envelope sender `mail_from`? See [`User::sender_allowed`].
    pub fn sender_allowed(&self, user: &User, mail_from: &str) -> bool {
        user.sender_allowed(mail_from)
    }
}

impl<'a> IntoIterator for &'a Users {
    type Item = &'a User;
    type IntoIter = std::slice::Iter<'a, User>;
    fn into_iter(self) -> Self::IntoIter {
        self.users.iter()
    }
}

/// Checks that every user's `upstream` is known; points at the first that is not.
pub(crate) fn check_upstreams(
    users: &Users,
    known: impl Fn(&str) -> bool,
) -> Result<(), (crate::Place, String)> {
    for (index, user) in users.iter().enumerate() {
        if let Some(upstream) = &user.upstream
            && !known(upstream)
        {
            return Err((
                crate::Place::Entry {
                    table: "user",
                    index,
                    key: "upstream",
                },
                format!(
                    "user {:?} names upstream {upstream:?}, which is not an [[upstream]] (or \"mx\")",
                    user.name
                ),
            ));
        }
    }
    Ok(())
}

/// A users file: nothing but `[[user]]` entries.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UsersFile {
    #[serde(default, rename = "user")]
    pub(crate) users: Users,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, ConfigError, parse_users_text};
    use std::sync::OnceLock;

    const PASSWORD: &str = "correct horse battery staple";

    /// One hash for every test: hashing costs tens of ms.
    fn known_hash() -> &'static str {
        static HASH: OnceLock<String> = OnceLock::new();
        HASH.get_or_init(|| {
            hash_password(PASSWORD.as_bytes())
                .unwrap()
                .expose()
                .to_string()
        })
    }

    fn users_text(entries: &[(&str, &str)]) -> String {
        entries
            .iter()
            .map(|(name, extra)| {
                format!(
                    "[[user]]\nname = \"{name}\"\npassword_hash = \"{}\"\n{extra}\n",
                    known_hash()
                )
            })
            .collect()
    }

    use crate::tests::invalid as error_of;

    #[test]
    fn dummy_hash_is_valid_with_default_parameters() {
        let dummy = PasswordHashText::new(DUMMY_HASH.to_string()).unwrap();
        let params = Params::try_from(&PasswordHash::new(dummy.expose()).unwrap()).unwrap();
        let defaults = Params::default();
        assert_eq!(
            (params.m_cost(), params.t_cost(), params.p_cost()),
            (defaults.m_cost(), defaults.t_cost(), defaults.p_cost())
        );
        assert!(known_hash().starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
    }

    #[test]
    fn good_users_file_parses() {
        let text = users_text(&[
            (
                "printer",
                "allowed_senders = [\"scan@example.com\", \"@example.org\", \".example.net\"]\n\
                 allowed_recipient_domains = [\"example.com\"]\nupstream = \"mx\"",
            ),
            ("scanner", ""),
        ]);
        let users = parse_users_text(&text, "users.toml").unwrap();
        assert_eq!(users.len(), 2);
        let printer = users.find("printer").unwrap();
        assert_eq!(
            printer.allowed_senders,
            vec![
                SenderPattern::Address {
                    local: "scan".to_string(),
                    domain: "example.com".to_string()
                },
                SenderPattern::Domain("example.org".to_string()),
                SenderPattern::Subdomains(".example.net".to_string()),
            ]
        );
        assert_eq!(printer.upstream.as_deref(), Some("mx"));
        assert!(users.find("scanner").unwrap().allowed_senders.is_empty());
        assert!(users.find("Printer").is_none(), "names are case-sensitive");
        let debug = format!("{users:?}");
        assert!(
            !debug.contains(known_hash()),
            "Debug shows the hash: {debug}"
        );
        assert!(!debug.contains("argon2id"), "Debug shows the hash: {debug}");
    }

    #[test]
    fn bad_entries_name_their_line_and_never_the_hash() {
        let good = known_hash();
        // Same salt and output, other algorithms and limits.
        let tail = good.rsplitn(3, '$').take(2).collect::<Vec<_>>();
        let salt_and_output = format!("{}${}", tail[1], tail[0]);
        let cases: Vec<(String, usize, usize, &str)> = vec![
            (
                "[[user]]\nname = \"a\"\npassword_hash = \"$2b$12$abcdefghijklmnopqrstuv\"\n"
                    .to_string(),
                3,
                17,
                "not a PHC string",
            ),
            (
                format!(
                    "[[user]]\nname = \"a\"\npassword_hash = \"$argon2i$v=19$m=19456,t=2,p=1${salt_and_output}\"\n"
                ),
                3,
                17,
                "only argon2id",
            ),
            (
                format!(
                    "[[user]]\nname = \"a\"\npassword_hash = \"$argon2id$v=19$m=1048576,t=2,p=1${salt_and_output}\"\n"
                ),
                3,
                17,
                "at most 262144",
            ),
            (
                "[[user]]\nname = \"a\"\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1\"\n"
                    .to_string(),
                3,
                17,
                "lacks its salt",
            ),
            (
                format!("[[user]]\nname = \"\"\npassword_hash = \"{good}\"\n"),
                2,
                8,
                "1 to 255 bytes",
            ),
            (
                format!("[[user]]\nname = \"a\\tb\"\npassword_hash = \"{good}\"\n"),
                2,
                8,
                "control characters",
            ),
            (
                format!(
                    "[[user]]\nname = \"{}\"\npassword_hash = \"{good}\"\n",
                    "x".repeat(256)
                ),
                2,
                8,
                "1 to 255 bytes",
            ),
            (
                format!(
                    "[[user]]\nname = \"a\"\npassword_hash = \"{good}\"\nallowed_senders = [\"nobody\"]\n"
                ),
                4,
                19,
                "not an address",
            ),
            (
                format!("[[user]]\nname = \"a\"\npassword_hash = \"{good}\"\npassword = \"x\"\n"),
                4,
                1,
                "unknown field",
            ),
            (
                users_text(&[("a", ""), ("b", ""), ("a", "")]),
                10,
                1,
                "user \"a\" is defined twice",
            ),
        ];
        for (text, want_line, want_column, want_message) in cases {
            let (line, column, message) = error_of(parse_users_text(&text, "users.toml"));
            assert!(message.contains(want_message), "{text:?}: {message}");
            assert_eq!(
                (line, column),
                (want_line, want_column),
                "{text:?}: {message}"
            );
            assert!(!message.contains("$argon2"), "the hash in {message:?}");
            assert!(
                !message.contains(&salt_and_output),
                "the hash in {message:?}"
            );
        }
    }

    #[test]
    fn users_in_the_main_configuration() {
        let base = "[[listener]]\naddress = \"127.0.0.1:25\"\n\n";
        let text = format!("{base}{}", users_text(&[("dev", "upstream = \"mx\"")]));
        let config = Config::parse(&text, "t").unwrap();
        assert_eq!(
            config.users.find("dev").unwrap().upstream.as_deref(),
            Some("mx")
        );
        assert!(config.summary().contains("1 device account(s) for AUTH"));

        let text = format!("{base}{}", users_text(&[("dev", "upstream = \"ghost\"")]));
        let (line, column, message) = error_of(Config::parse(&text, "t"));
        assert_eq!((line, column), (7, 1), "{message}");
        assert!(message.contains("not an [[upstream]]"), "{message}");

        let text = format!("{base}{}", users_text(&[("dev", ""), ("dev", "")]));
        let (line, _, message) = error_of(Config::parse(&text, "t"));
        assert_eq!(line, 9, "{message}");
        assert!(message.contains("defined twice"), "{message}");
    }

    #[test]
    fn users_file_named_by_the_configuration() {
        let directory = std::env::temp_dir().join(format!("tsubame-users-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let users_path = directory.join("users.toml");
        let config_path = directory.join("tsubame.toml");
        let config_text = format!(
            "[[listener]]\naddress = \"127.0.0.1:25\"\n[auth]\nusers_file = \"{}\"\n\
             [[upstream]]\nname = \"relay\"\nkind = \"smtp\"\nhost = \"smtp.example.net\"\n\
             {}",
            users_path.display(),
            users_text(&[("inline", "")])
        );
        std::fs::write(&config_path, &config_text).unwrap();

        std::fs::write(&users_path, users_text(&[("file", "upstream = \"relay\"")])).unwrap();
        let config = Config::load(&config_path).unwrap();
        let names: Vec<&str> = config.users.iter().map(|user| user.name.as_str()).collect();
        assert_eq!(names, ["inline", "file"]);

        std::fs::write(&users_path, users_text(&[("file", "upstream = \"ghost\"")])).unwrap();
        let error = Config::load(&config_path).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("{}:4:1: ", users_path.display())),
            "{error}"
        );

        std::fs::write(&users_path, users_text(&[("x", ""), ("inline", "")])).unwrap();
        let error = Config::load(&config_path).unwrap_err().to_string();
        assert!(
            error.contains(":6:1: user \"inline\" is also defined in"),
            "{error}"
        );

        std::fs::remove_file(&users_path).unwrap();
        assert!(matches!(
            Config::load(&config_path),
            Err(ConfigError::Read { .. })
        ));
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn verify_right_wrong_and_unknown() {
        let users = parse_users_text(&users_text(&[("dev", "")]), "t").unwrap();
        assert_eq!(
            users.verify("dev", PASSWORD.as_bytes()).unwrap().name,
            "dev"
        );
        assert_eq!(
            users
                .verify("dev", b"correct horse battery stapler")
                .unwrap_err(),
            VerifyError::WrongPassword
        );
        assert_eq!(
            users.verify("dev", b"").unwrap_err(),
            VerifyError::WrongPassword
        );
        assert_eq!(
            users.verify("Dev", PASSWORD.as_bytes()).unwrap_err(),
            VerifyError::UnknownUser
        );
        assert_eq!(
            users
                .verify("dev", &[b'x'; PASSWORD_BYTES_MAX + 1])
                .unwrap_err(),
            VerifyError::PasswordTooLong
        );
    }

    /// An unknown name costs a verification too: not a quick "no".
    #[test]
    fn unknown_user_spends_comparable_time() {
        let users = parse_users_text(&users_text(&[("dev", "")]), "t").unwrap();
        // Interleaved, and the fastest of five each, so that a busy machine's pauses
        // (CI runs this beside other builds) do not decide. The parameters being equal is
        // checked exactly by dummy_hash_is_valid_with_default_parameters; this checks the
        // dummy hash is really computed.
        let once = |name: &str| {
            let start = std::time::Instant::now();
            let _ = users.verify(name, b"guess");
            start.elapsed()
        };
        let (mut known, mut unknown) = (std::time::Duration::MAX, std::time::Duration::MAX);
        for _ in 0..5 {
            known = known.min(once("dev"));
            unknown = unknown.min(once("nobody"));
        }
        assert!(
            unknown * 3 > known && known * 3 > unknown,
            "known {known:?}, unknown {unknown:?}"
        );
    }

    #[test]
    fn hash_password_refuses_empty_and_long() {
        assert_eq!(hash_password(b"").unwrap_err(), PasswordError::Empty);
        assert_eq!(
            hash_password(&[b'x'; PASSWORD_BYTES_MAX + 1]).unwrap_err(),
            PasswordError::TooLong
        );
    }

    #[test]
    fn sender_patterns() {
        let cases: &[(&str, &str, bool)] = &[
            ("scan@example.com", "scan@example.com", true),
            ("scan@example.com", "scan@EXAMPLE.com", true),
            ("scan@example.com", "Scan@example.com", false),
            ("scan@example.com", "scan@example.com.evil", false),
            ("scan@example.com", "xscan@example.com", false),
            ("@example.com", "anyone@example.com", true),
            ("@example.com", "anyone@Example.COM", true),
            ("@example.com", "anyone@sub.example.com", false),
            ("@example.com", "anyone@notexample.com", false),
            ("@example.com", "\"a@b\"@example.com", true),
            ("@example.com", "anyone@example.com@evil.org", false),
            (".example.com", "x@sub.example.com", true),
            (".example.com", "x@a.b.EXAMPLE.com", true),
            (".example.com", "x@example.com", false),
            (".example.com", "x@badexample.com", false),
            ("@example.com", "", false),
            ("@example.com", "no-at-sign", false),
        ];
        for (pattern, address, want) in cases {
            let parsed = SenderPattern::parse(pattern).unwrap();
            assert_eq!(parsed.matches(address), *want, "{pattern} vs {address}");
            assert_eq!(parsed.to_string(), *pattern);
        }
        for bad in [
            "", "nobody", "@", ".", "a@", "@a..b", "a b@c", "@x@y", "..x",
        ] {
            assert!(SenderPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
        let text = users_text(&[
            ("open", ""),
            (
                "shut",
                "allowed_senders = [\"@example.com\"]\nallowed_recipient_domains = [\".example.org\"]",
            ),
        ]);
        let users = parse_users_text(&text, "t").unwrap();
        let (open, shut) = (users.find("open").unwrap(), users.find("shut").unwrap());
        assert!(users.sender_allowed(open, "anyone@anywhere.test"));
        assert!(users.sender_allowed(open, ""));
        assert!(users.sender_allowed(shut, "a@example.com"));
        assert!(!users.sender_allowed(shut, "a@example.net"));
        assert!(
            !users.sender_allowed(shut, ""),
            "the null sender is not a pattern match"
        );
        assert!(open.recipient_allowed("x@anywhere.test"));
        assert!(shut.recipient_allowed("x@mail.example.org"));
        assert!(!shut.recipient_allowed("x@example.org"));
        assert!(!shut.recipient_allowed("x@example.com"));
    }
}
