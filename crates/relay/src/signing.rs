//! DKIM signing and bulk-sender headers, once per message, off the event loops.
//!
//! ```text
//! event loops ──durable message──► signing pool ──added fields record──► spool
//!                                       │
//!                                       └──Accepted (with the record's location)──► dispatcher
//! ```
//!
//! A pool of `[delivery] signing_threads` threads takes each message once the spool has
//! made it durable, works out the header fields to put before it (List-Unsubscribe and
//! List-Unsubscribe-Post when its route asks for them and the message has none, then the
//! DKIM-Signature fields over those and the stored message), appends them to the spool
//! as an *added fields* record, and only then queues the message. Every attempt sends
//! the stored fields, so a retry, or a restart, never signs again: recovery finds the
//! record, and only messages without one pass through the pool again.
//!
//! The signature is not waited for to be synced before delivery: should the process die
//! before its commit, the message is signed again at the next start. That is a new
//! signature on a message that may already have been delivered with the old one, the
//! same duplicate any crash before a journal record's sync allows.
//!
//! Which settings apply: the `[[route]]` that routes the message's first recipient (a
//! message is signed once, not per route); mail that no route matches, or that an
//! account's own upstream takes, is signed by its From domain and gets no List-*
//! fields. The signing domain is the route's `dkim_domain`, else the most specific
//! `[[dkim]]` domain covering the From header's domain.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use tsubame_config::{Config, DkimConfig};
use tsubame_dkim::{SignedHeaders, Signer, SignerKey, SigningKey};
use tsubame_spool::{Spool, SpooledMessage};

use crate::dispatcher::{Command, Input};
use crate::inbox::{Inbox, Pop};
use crate::routing::{RouteInput, Router};

/// The header fields RFC 8058 section 4 asks to be signed with the one-click request.
const LIST_FIELDS: [&str; 2] = ["List-Unsubscribe", "List-Unsubscribe-Post"];

/// The field that asks for one-click unsubscription (RFC 8058 section 3.1).
const ONE_CLICK_FIELD: &[u8] = b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n";

/// How long an idle signing thread waits before it waits again: a push or the queue's
/// closing wakes it at once, so this only bounds one wait.
const IDLE_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Messages a signing thread takes from its queue at once.
const BATCH_MAX: usize = 64;

/// The signers of one `[[dkim]]` domain.
struct DomainSigners {
    /// Lower-case, without a final dot.
    domain: String,
    /// Signs the configured header list.
    plain: Signer,
    /// The same keys, with the List-* fields added to the list: for a message that has
    /// them (its own, or added here), since RFC 8058 section 4 wants them signed.
    listed: Signer,
}

/// What one `[[route]]` (or the default) asks for.
#[derive(Debug, Clone, Default)]
struct Profile {
    sign: bool,
    /// Index into `Signing::domains`: the route's `dkim_domain`.
    domain: Option<usize>,
    /// The complete List-Unsubscribe (and List-Unsubscribe-Post) fields to add.
    list_fields: Option<Vec<u8>>,
}

/// Everything the signing threads need; shared by them.
pub(crate) struct Signing {
    /// The `[[dkim]]` entries, and their signers in the same order.
    entries: Vec<DkimConfig>,
    domains: Vec<DomainSigners>,
    /// Per `[[route]]`, in order.
    routes: Vec<Profile>,
    default: Profile,
    router: Router,
}

impl std::fmt::Debug for Signing {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let domains: Vec<&str> = self.domains.iter().map(|d| d.domain.as_str()).collect();
        formatter
            .debug_struct("Signing")
            .field("domains", &domains)
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

/// The plain and the List-* signers of a `[[dkim]]` entry, each key file read once.
/// Also returns a line per key for `check-config`: its DNS name, algorithm, size and file.
fn build_signers(config: &DkimConfig) -> Result<(Signer, Signer, Vec<String>), String> {
    let mut pems = Vec::new();
    for key in config.key_list() {
        let pem = tsubame_dkim::read_key_pem(&key.key_file).map_err(|error| error.to_string())?;
        pems.push((key.selector, key.key_file, pem));
    }
    let mut described = Vec::with_capacity(pems.len());
    let default = SignedHeaders::default();
    let names: Vec<String> = config
        .headers
        .clone()
        .unwrap_or_else(|| default.names().to_vec());
    let canonicalization = match &config.canonicalization {
        Some(text) => text
            .parse()
            .map_err(|error: tsubame_dkim::Error| error.to_string())?,
        None => tsubame_dkim::Canonicalization::RELAXED,
    };
    let build = |names: &[String]| -> Result<Signer, String> {
        let mut keys = Vec::with_capacity(pems.len());
        for (selector, path, pem) in &pems {
            let key = SigningKey::from_pem(pem, &path.display().to_string())
                .map_err(|error| error.to_string())?;
            keys.push(SignerKey {
                selector: selector.clone(),
                key,
            });
        }
        let headers =
            SignedHeaders::new(names, config.over_sign).map_err(|error| error.to_string())?;
        Signer::with_canonicalization(&config.domain, keys, &headers, canonicalization)
            .map_err(|error| format!("dkim domain {:?}: {error}", config.domain))
    };
    let plain = build(&names)?;
    let mut listed_names = names.clone();
    listed_names.extend(LIST_FIELDS.map(String::from));
    let listed = build(&listed_names)?;
    for (selector, path, pem) in &pems {
        // `build` parsed every key already; this cannot fail now.
        if let Ok(key) = SigningKey::from_pem(pem, &path.display().to_string()) {
            described.push(format!(
                "{selector}._domainkey.{} ({}, {} bits, {})",
                config.domain,
                key.algorithm(),
                key.bits(),
                path.display()
            ));
        }
    }
    Ok((plain, listed, described))
}

impl Signing {
    /// Loads every `[[dkim]]` key. `None` when there is nothing to add to any message (no
    /// `[[dkim]]` entry and no route with `list_unsubscribe`). Errors name the domain and
    /// key file, never key material.
    pub fn load(config: &Config, router: Router) -> Result<Option<Self>, String> {
        let any_list = config
            .routes
            .iter()
            .any(|route| route.list_unsubscribe.is_some());
        // Nothing to add to any message: no pool, no record.
        if config.dkim.is_empty() && !any_list {
            return Ok(None);
        }
        Self::build(config, router).map(Some)
    }

    /// Loads every `[[dkim]]` key, even when there are none (a reload of a running
    /// pool: it then adds nothing to any message).
    pub fn build(config: &Config, router: Router) -> Result<Self, String> {
        let mut domains = Vec::with_capacity(config.dkim.len());
        for dkim in &config.dkim {
            let (plain, listed, _) = build_signers(dkim)?;
            domains.push(DomainSigners {
                domain: dkim.domain.trim_end_matches('.').to_ascii_lowercase(),
                plain,
                listed,
            });
        }
        let routes = config
            .routes
            .iter()
            .map(|route| Profile {
                sign: route.dkim,
                domain: route.dkim_domain.as_ref().and_then(|wanted| {
                    let wanted = wanted.trim_end_matches('.');
                    domains
                        .iter()
                        .position(|signers| signers.domain.eq_ignore_ascii_case(wanted))
                }),
                list_fields: route.list_unsubscribe.as_ref().map(|value| {
                    let mut fields = format!("List-Unsubscribe: {value}\r\n").into_bytes();
                    if route.list_unsubscribe_post {
                        fields.extend_from_slice(ONE_CLICK_FIELD);
                    }
                    fields
                }),
            })
            .collect();
        Ok(Signing {
            entries: config.dkim.clone(),
            domains,
            routes,
            default: Profile {
                sign: true,
                ..Profile::default()
            },
            router,
        })
    }

    /// Checks the configured keys by loading them, as at start: `tsubame check-config`.
    /// Returns a line per signing domain.
    pub fn describe(config: &Config) -> Result<Vec<String>, String> {
        let mut lines = Vec::new();
        for dkim in &config.dkim {
            let (_, _, keys) = build_signers(dkim)?;
            lines.push(format!(
                "dkim {} (and its subdomains): signs with {}, c={}",
                dkim.domain,
                keys.join(" and "),
                dkim.canonicalization
                    .as_deref()
                    .unwrap_or("relaxed/relaxed")
            ));
        }
        Ok(lines)
    }

    fn profile(&self, message: &SpooledMessage) -> &Profile {
        let Some(first) = message.recipients.first() else {
            return &self.default;
        };
        let (_, rule) = self.router.route_and_rule(&RouteInput::of(message, first));
        rule.and_then(|index| self.routes.get(index))
            .unwrap_or(&self.default)
    }

    /// The signers for a message from `from_domain`, by the profile's rules.
    fn signers_for(&self, profile: &Profile, body: &[u8]) -> Option<&DomainSigners> {
        if !profile.sign {
            return None;
        }
        if let Some(index) = profile.domain {
            return self.domains.get(index);
        }
        let from = tsubame_dkim::from_domain(body)?;
        let index = tsubame_config::dkim::most_specific(&self.entries, &from)?;
        self.domains.get(index)
    }

    /// The header fields to put before `body` (the stored message) for `message`: empty
    /// when there is nothing to add.
    pub fn fields_for(
        &self,
        message: &SpooledMessage,
        body: &[u8],
    ) -> Result<Vec<u8>, tsubame_dkim::Error> {
        let profile = self.profile(message);
        let has_own = LIST_FIELDS
            .iter()
            .any(|name| tsubame_dkim::has_header(body, name));
        // A bounce (from <>) is no list mail: it never gets List-* fields.
        let list_fields: &[u8] = match &profile.list_fields {
            Some(fields) if !has_own && !message.mail_from.is_empty() => fields,
            _ => &[],
        };
        let Some(signers) = self.signers_for(profile, body) else {
            return Ok(list_fields.to_vec());
        };
        // RFC 8058 section 4: the one-click fields must be signed, ours or the message's.
        let signer = if has_own || !list_fields.is_empty() {
            &signers.listed
        } else {
            &signers.plain
        };
        let mut fields = signer.sign_parts(&[list_fields, body])?;
        fields.extend_from_slice(list_fields);
        Ok(fields)
    }
}

/// What deserves a warning at start: a route that sends for a sender domain no
/// `[[dkim]]` entry covers, whose mail goes out unsigned; and a route asking for one-click
/// unsubscription that cannot sign, which receivers then ignore (RFC 8058 section 4).
/// (The From domains of mail that no route names are known only when it arrives; with no
/// `[[dkim]]` entry at all, nothing is signed and only the second warning applies.)
pub(crate) fn coverage_warnings(config: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    for (index, route) in config.routes.iter().enumerate() {
        let name = format!("route {} (to upstream {:?})", index + 1, route.upstream);
        if route.list_unsubscribe_post && (!route.dkim || config.dkim.is_empty()) {
            warnings.push(format!(
                "{name} adds List-Unsubscribe-Post but does not sign: receivers honour one-click unsubscription only in a DKIM-signed message"
            ));
        }
        if config.dkim.is_empty() || !route.dkim || route.dkim_domain.is_some() {
            continue;
        }
        for pattern in &route.sender_domains {
            let domain = pattern.trim_start_matches('.');
            if config.dkim_for(domain).is_none() {
                warnings.push(format!(
                    "{name} sends mail from {pattern:?}, which no [[dkim]] domain covers: that mail is sent unsigned (receivers such as Gmail expect DKIM from bulk senders)"
                ));
            }
        }
    }
    warnings
}

/// A message for the pool: fresh from the server, or found by recovery.
#[derive(Debug)]
pub(crate) struct Task {
    pub message: SpooledMessage,
    pub recovered: bool,
}

/// The signing threads and their queue.
#[derive(Debug)]
pub(crate) struct SigningPool {
    queue: Arc<Inbox<Task>>,
    /// What the threads sign with; a reload replaces it (key rotation, new routes).
    /// Each thread takes the current one per batch.
    current: Arc<RwLock<Arc<Signing>>>,
    /// Set by `stop`: threads finish the message they are on, not their batch.
    stopping: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl SigningPool {
    pub fn start(
        signing: Signing,
        threads: usize,
        spool: Spool,
        dispatcher: Arc<Inbox<Input>>,
    ) -> std::io::Result<Self> {
        let domains: Vec<String> = signing.domains.iter().map(|d| d.domain.clone()).collect();
        let current = Arc::new(RwLock::new(Arc::new(signing)));
        let queue: Arc<Inbox<Task>> = Arc::new(Inbox::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let count = if threads == 0 {
            std::thread::available_parallelism().map_or(1, usize::from)
        } else {
            threads
        };
        let mut handles = Vec::with_capacity(count);
        for number in 0..count {
            let current = Arc::clone(&current);
            let queue = Arc::clone(&queue);
            let spool = spool.clone();
            let dispatcher = Arc::clone(&dispatcher);
            let stopping = Arc::clone(&stopping);
            handles.push(
                std::thread::Builder::new()
                    .name(format!("sign-{number}"))
                    .spawn(move || run(&current, &queue, &spool, &dispatcher, &stopping))?,
            );
        }
        tracing::info!(threads = count, ?domains, "DKIM signing pool started");
        Ok(Self {
            queue,
            current,
            stopping,
            threads: handles,
        })
    }

    pub fn queue(&self) -> Arc<Inbox<Task>> {
        Arc::clone(&self.queue)
    }

    /// Where a reload puts the new keys and profiles (see [`SigningPool::current`]).
    pub fn current(&self) -> Arc<RwLock<Arc<Signing>>> {
        Arc::clone(&self.current)
    }

    /// No more messages: those waiting are left in the spool (the next start signs and
    /// queues them); the threads finish the message they are on.
    pub fn stop(mut self) {
        self.stopping.store(true, Ordering::Release);
        let mut unsigned = Vec::new();
        self.queue.drain_into(&mut unsigned, usize::MAX);
        if !unsigned.is_empty() {
            tracing::info!(
                messages = unsigned.len(),
                "messages not yet signed stay in the spool for the next start"
            );
        }
        self.queue.close();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn run(
    current: &RwLock<Arc<Signing>>,
    queue: &Inbox<Task>,
    spool: &Spool,
    dispatcher: &Inbox<Input>,
    stopping: &AtomicBool,
) {
    let mut batch = Vec::with_capacity(BATCH_MAX);
    loop {
        match queue.pop_timeout(IDLE_WAIT) {
            Pop::Item(task) => batch.push(task),
            Pop::Timeout => continue,
            Pop::Closed => return,
        }
        queue.drain_into(&mut batch, BATCH_MAX - 1);
        let signing = Arc::clone(&current.read().unwrap_or_else(PoisonError::into_inner));
        let signing = &*signing;
        for task in batch.drain(..) {
            let Task {
                mut message,
                recovered,
            } = task;
            if stopping.load(Ordering::Acquire) {
                // Shutting down: the rest of the batch stays in the spool for the next start.
                return;
            }
            // A bug in signing must not strand a message that was acknowledged: it is
            // sent unsigned instead.
            let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                prepare(signing, spool, &mut message)
            }));
            let in_memory = match prepared {
                Ok(in_memory) => in_memory,
                Err(_) => {
                    tracing::error!(id = %message.id, "signing panicked; the message is sent unsigned");
                    message.added_fields = None;
                    None
                }
            };
            let command = if recovered {
                Command::Recovered(message, in_memory)
            } else {
                Command::Accepted(message, in_memory)
            };
            // Fails only once the dispatcher has stopped: the message stays in the spool
            // and is queued (and, its fields not stored, signed again) at the next start.
            let _ = dispatcher.push(Input::Command(command));
        }
    }
}

/// Works out and stores a message's added fields, setting `message.added_fields`.
/// Returns the fields when they could not be stored (they then travel with the message
/// in memory, so that this run still sends them). A message that cannot be signed is
/// sent as it is, and the log says why.
fn prepare(signing: &Signing, spool: &Spool, message: &mut SpooledMessage) -> Option<Arc<[u8]>> {
    let body = match spool.body(message.id, message.location) {
        Ok(body) => body,
        Err(error) => {
            // The worker will read the body again and defer the message if this persists.
            tracing::error!(id = %message.id, %error, "cannot read the message to sign it");
            return None;
        }
    };
    let fields = match signing.fields_for(message, &body) {
        Ok(fields) => fields,
        Err(error) => {
            tracing::warn!(id = %message.id, %error, "message not signed; it is sent unsigned");
            return None;
        }
    };
    drop(body);
    // Even nothing is stored (an empty record), so that a restart does not look at the
    // message again.
    // The fields are ASCII (a signature, and List-* values checked at load), which the
    // spool's text holds; anything else would travel in memory only.
    let stored = std::str::from_utf8(&fields)
        .map_err(|_| "the fields are not UTF-8".to_string())
        .and_then(|text| {
            spool
                .append_added_fields(message.id, crate::now_unix_ms(), text)
                .map_err(|error| error.to_string())
        });
    match stored {
        Ok((location, _sequence)) => {
            message.added_fields = Some(location);
            None
        }
        Err(error) => {
            tracing::warn!(id = %message.id, %error, "cannot store the DKIM signature in the spool; this run sends it from memory, a restart signs again");
            Some(Arc::from(fields))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use tsubame_spool::{MessageId, MessageState, RecipientState, RecordLocation};

    fn message(from: &str, recipients: &[&str]) -> SpooledMessage {
        SpooledMessage {
            id: MessageId(1),
            location: RecordLocation {
                segment: 1,
                offset_bytes: 64,
            },
            received_at_unix_ms: 0,
            client_address: "127.0.0.1:1000".to_string(),
            helo: "client".to_string(),
            authenticated_user: None,
            mail_from: from.to_string(),
            mail_parameters: String::new(),
            recipients: recipients.iter().map(|r| (*r).to_string()).collect(),
            body_size_bytes: 0,
            state: MessageState::Queued,
            recipient_states: vec![RecipientState::default(); recipients.len()],
            added_fields: None,
        }
    }

    fn signing(directory: &std::path::Path, routes: &str) -> Signing {
        let mut config = String::from("[[listener]]\naddress = \"127.0.0.1:2525\"\n");
        for domain in ["a.example", "b.example"] {
            let path = directory.join(format!("{domain}.key"));
            tsubame_dkim::write_key_file(
                &path,
                &tsubame_dkim::generate_ed25519_pem().unwrap(),
                true,
            )
            .unwrap();
            config.push_str(&format!(
                "[[dkim]]\ndomain = \"{domain}\"\nselector = \"s\"\nkey_file = \"{}\"\n",
                path.display()
            ));
        }
        config.push_str(routes);
        let config = Config::parse(&config, "test.toml").unwrap();
        let router = Router::new(&config, |name| (name == "mx").then_some(0));
        Signing::load(&config, router).unwrap().unwrap()
    }

    fn signing_domains(fields: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(fields)
            .split("DKIM-Signature:")
            .skip(1)
            .filter_map(|field| {
                let at = field.find(" d=")?;
                let rest = field.get(at + 3..)?;
                Some(rest.split(';').next()?.to_string())
            })
            .collect()
    }

    /// Whether the signature's `h=` lists List-Unsubscribe and List-Unsubscribe-Post.
    fn signed_list_fields(fields: &str) -> [bool; 2] {
        let unfolded: String = fields.split("\r\n").map(str::trim).collect();
        let listed = unfolded
            .split(';')
            .find_map(|tag| tag.trim().strip_prefix("h="))
            .unwrap_or_default()
            .to_ascii_lowercase();
        let has = |name: &str| listed.split(':').any(|listed| listed.trim() == name);
        [has("list-unsubscribe"), has("list-unsubscribe-post")]
    }

    const BODY: &[u8] = b"From: x@b.example\r\nTo: r@example.net\r\nSubject: s\r\n\r\nhi\r\n";

    #[test]
    fn the_first_recipients_route_decides_and_the_from_domain_picks_the_key() {
        let directory = tempfile::tempdir().unwrap();
        let signing = signing(
            directory.path(),
            "[[route]]\nrecipient_domains = [\"override.example\"]\nupstream = \"mx\"\ndkim_domain = \"a.example\"\n\
             [[route]]\nrecipient_domains = [\"unsigned.example\"]\nupstream = \"mx\"\ndkim = false\n\
             [[route]]\nrecipient_domains = [\"list.example\"]\nupstream = \"mx\"\n\
             list_unsubscribe = \"<https://b.example/u>\"\nlist_unsubscribe_post = true\n",
        );
        let by_from = signing
            .fields_for(&message("x@b.example", &["r@example.net"]), BODY)
            .unwrap();
        assert_eq!(signing_domains(&by_from), ["b.example"]);
        let by_from = by_from.clone();
        let overridden = signing
            .fields_for(
                &message("x@b.example", &["r@override.example", "r@unsigned.example"]),
                BODY,
            )
            .unwrap();
        assert_eq!(signing_domains(&overridden), ["a.example"]);
        let unsigned = signing
            .fields_for(
                &message("x@b.example", &["r@unsigned.example", "r@override.example"]),
                BODY,
            )
            .unwrap();
        assert!(unsigned.is_empty());
        let listed = signing
            .fields_for(&message("x@b.example", &["r@list.example"]), BODY)
            .unwrap();
        let text = String::from_utf8(listed).unwrap();
        assert!(text.ends_with(
            "List-Unsubscribe: <https://b.example/u>\r\n\
             List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        ));
        assert_eq!(signed_list_fields(&text), [true, true], "{text}");
        // A message with its own one-click fields: nothing added, both signed (RFC 8058
        // section 4), whatever the route.
        let own = b"From: x@b.example\r\nList-Unsubscribe: <https://b.example/own>\r\n\
                    List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\nhi\r\n";
        for recipient in ["r@list.example", "r@example.net"] {
            let fields = signing
                .fields_for(&message("x@b.example", &[recipient]), own)
                .unwrap();
            let text = String::from_utf8(fields).unwrap();
            let added: Vec<&str> = text
                .split("\r\n")
                .filter(|line| line.starts_with("List-"))
                .collect();
            assert!(added.is_empty(), "{text}");
            assert_eq!(signed_list_fields(&text), [true, true], "{text}");
        }
        // Without them, the plain list: neither is signed.
        assert_eq!(
            signed_list_fields(&String::from_utf8(by_from).unwrap()),
            [false, false]
        );
        // A bounce (from <>) never gets list fields, whatever its route.
        let bounce = signing
            .fields_for(&message("", &["r@list.example"]), BODY)
            .unwrap();
        let bounce = String::from_utf8(bounce).unwrap();
        assert!(
            !bounce.split("\r\n").any(|line| line.starts_with("List-")),
            "{bounce}"
        );
        // No From domain with a key: nothing to add.
        let unkeyed = b"From: x@c.example\r\n\r\nhi\r\n";
        assert!(
            signing
                .fields_for(&message("x@c.example", &["r@example.net"]), unkeyed)
                .unwrap()
                .is_empty()
        );
    }
}
