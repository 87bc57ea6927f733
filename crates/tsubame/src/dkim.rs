//! `tsubame dkim keygen`: a new DKIM signing key and the DNS record that publishes it.
//! `tsubame dkim check`: whether DNS publishes a key file's public key.
//!
//! The key file is written 0600 and atomically, and never replaced without --force; the
//! key itself is never printed. Standard output holds exactly two lines: the zone-file
//! record, then the bare TXT value (for DNS control panels), so scripts can take either.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use tsubame_delivery::mx::ResolverOptions;
use tsubame_delivery::txt::{TxtAnswer, TxtRecord, lookup_txt};
use tsubame_dkim::{
    RecordVerdict, SigningKey, check_domain_and_selector, check_key_record, parse_key_record,
    write_key_file,
};

/// `dkim check` exit code when DNS gave no answer (SERVFAIL, timeout, network error):
/// the record may be fine, ask again later.
/// (2 is a usage error, 3 corruption found by `spool inspect`.)
const EXIT_DNS_FAILURE: u8 = 4;

#[derive(Debug, clap::Args)]
pub struct DkimArgs {
    #[command(subcommand)]
    command: DkimCommand,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum KeyAlgorithm {
    /// RSA-SHA256: every verifier knows it.
    Rsa,
    /// Ed25519-SHA256 (RFC 8463): short keys and signatures, not every verifier knows
    /// it yet, so sign with both for a dual signature.
    Ed25519,
}

#[derive(Debug, clap::Subcommand)]
enum DkimCommand {
    /// Generate a signing key, write it (PEM, mode 0600) and print its DNS TXT record.
    #[command(after_help = "Example:\n  \
        tsubame dkim keygen --domain example.com --selector s2026 --out /etc/tsubame/dkim/example.com.s2026.key\n\n\
        Publish the printed record, then name the key file in the configuration.")]
    Keygen {
        /// The signing domain (the `d=` tag), usually the From domain.
        #[arg(long, value_name = "DOMAIN")]
        domain: String,
        /// The selector (the `s=` tag); the record goes at SELECTOR._domainkey.DOMAIN.
        #[arg(long, value_name = "SELECTOR")]
        selector: String,
        #[arg(long, value_enum, default_value = "rsa")]
        algorithm: KeyAlgorithm,
        /// RSA key size in bits (2048, 3072 or 4096); ignored for Ed25519.
        #[arg(long, default_value_t = 2048, value_parser = parse_rsa_bits)]
        bits: u32,
        /// Where to write the key. Default: ./DOMAIN.SELECTOR.key
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Replace an existing key file.
        #[arg(long)]
        force: bool,
    },
    /// Look up the key record at SELECTOR._domainkey.DOMAIN and check that it publishes
    /// the public half of a key file (--key, or the one --config names for DOMAIN and
    /// SELECTOR). Exits 0 when it does, 1 when the record is
    /// missing, revoked, malformed, duplicated or publishes another key (the lines
    /// printed say which), 4 when DNS gave no answer (SERVFAIL, timeout).
    #[command(after_help = "Example:\n  \
        tsubame dkim check --domain example.com --selector s2026 --key /etc/tsubame/dkim/example.com.s2026.key\n  \
        tsubame dkim check --domain example.com --selector s2026 --config /etc/tsubame.toml --nameserver 192.0.2.53:53\n\n\
        The key file is read only to derive its public key; nothing secret is printed. \
        DNS caches may serve an old record for up to its TTL after a change.")]
    #[command(group(clap::ArgGroup::new("key_source").required(true).args(["key", "config"])))]
    Check {
        /// The signing domain (the `d=` tag).
        #[arg(long, value_name = "DOMAIN")]
        domain: String,
        /// The selector (the `s=` tag).
        #[arg(long, value_name = "SELECTOR")]
        selector: String,
        /// The private key file (PEM) whose public key the record should publish.
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Take the key file from this configuration's [[dkim]] entry for DOMAIN and
        /// SELECTOR, instead of --key.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Ask this DNS server (IP:PORT) instead of the system resolver
        /// (/etc/resolv.conf).
        #[arg(long, value_name = "IP:PORT")]
        nameserver: Option<SocketAddr>,
        /// Give up on DNS after this many seconds (exit 4).
        #[arg(long, value_name = "SECONDS", default_value_t = 30,
              value_parser = clap::value_parser!(u64).range(1..))]
        timeout_secs: u64,
    },
}

fn parse_rsa_bits(text: &str) -> Result<u32, String> {
    text.parse::<u32>()
        .ok()
        .filter(|bits| tsubame_dkim::RSA_BITS_ALLOWED.contains(bits))
        .ok_or_else(|| "RSA key size must be 2048, 3072 or 4096 bits".to_string())
}

pub fn run(args: DkimArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        DkimCommand::Keygen {
            domain,
            selector,
            algorithm,
            bits,
            out,
            force,
        } => {
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            check_domain_and_selector(&domain, &selector)?;
            let path = out.unwrap_or_else(|| PathBuf::from(format!("{domain}.{selector}.key")));
            if !force && path.exists() {
                anyhow::bail!(
                    "{} already exists; pass --force to replace it",
                    path.display()
                );
            }
            let pem = match algorithm {
                KeyAlgorithm::Rsa => tsubame_dkim::generate_rsa_pem(bits)?,
                KeyAlgorithm::Ed25519 => tsubame_dkim::generate_ed25519_pem()?,
            };
            // Load what was generated, as `serve` will, before writing it anywhere.
            let key = SigningKey::from_pem(&pem, "generated key")
                .context("the generated key does not load")?;
            write_key_file(&path, &pem, force)?;
            eprintln!(
                "tsubame: wrote {} ({}, {} bits, mode 0600); publish this record:",
                path.display(),
                key.algorithm(),
                key.bits()
            );
            println!("{}", key.dns_txt_record(&domain, &selector));
            println!("{}", key.dns_txt_value());
            Ok(ExitCode::SUCCESS)
        }
        DkimCommand::Check {
            domain,
            selector,
            key,
            config,
            nameserver,
            timeout_secs,
        } => {
            let key = match (key, config) {
                (Some(key), _) => key,
                (None, Some(config)) => configured_key_file(&config, &domain, &selector)?,
                (None, None) => anyhow::bail!("--key FILE or --config FILE is needed"),
            };
            check(
                &domain,
                &selector,
                &key,
                &ResolverOptions {
                    nameserver,
                    timeout: Duration::from_secs(timeout_secs),
                },
            )
        }
    }
}

/// The key file of the configuration's `[[dkim]]` entry for `domain` and `selector`.
fn configured_key_file(
    config_path: &Path,
    domain: &str,
    selector: &str,
) -> anyhow::Result<PathBuf> {
    let config = tsubame_config::Config::load(config_path)?;
    let domain = domain.trim_end_matches('.');
    let Some(entry) = config.dkim.iter().find(|entry| {
        entry
            .domain
            .trim_end_matches('.')
            .eq_ignore_ascii_case(domain)
    }) else {
        anyhow::bail!(
            "{} has no [[dkim]] entry for domain {domain}",
            config_path.display()
        );
    };
    let keys = entry.key_list();
    match keys.iter().find(|key| key.selector == selector) {
        Some(key) => Ok(key.key_file.clone()),
        None => {
            let selectors: Vec<&str> = keys.iter().map(|key| key.selector.as_str()).collect();
            anyhow::bail!(
                "{}: the [[dkim]] entry for {domain} has no selector {selector} (it has: {})",
                config_path.display(),
                selectors.join(", ")
            )
        }
    }
}

fn check(
    domain: &str,
    selector: &str,
    key_path: &Path,
    resolver: &ResolverOptions,
) -> anyhow::Result<ExitCode> {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    check_domain_and_selector(&domain, selector)?;
    let key = SigningKey::from_pem_file(key_path)?;
    let file = key_path.display();
    let name = format!("{selector}._domainkey.{domain}");
    let failure = |lines: &[String]| {
        for line in lines {
            println!("{line}");
        }
        println!("expected record for {file}:");
        println!("  {}", key.dns_txt_record(&domain, selector));
        Ok(ExitCode::from(crate::EXIT_ERROR))
    };
    let records = match lookup_txt(&name, resolver) {
        Ok(TxtAnswer::Records(records)) => records,
        Ok(TxtAnswer::NoSuchName) => {
            return failure(&[format!(
                "{name}: no such name (NXDOMAIN): no DKIM record is published for selector {selector}"
            )]);
        }
        Ok(TxtAnswer::NoRecords) => {
            return failure(&[format!(
                "{name}: the name exists but has no TXT record: no DKIM record is published"
            )]);
        }
        Err(error) => {
            eprintln!("tsubame: {error}; the record could not be checked, try again later");
            return Ok(ExitCode::from(EXIT_DNS_FAILURE));
        }
    };
    for record in &records {
        println!("{name}: TXT record found: {}", describe(record));
    }
    let [only] = records.as_slice() else {
        return failure(&[format!(
            "{name}: more than one DKIM record ({} TXT records): verifiers use any one of them (RFC 6376 section 3.6.2.2), so publish exactly one",
            records.len()
        )]);
    };
    let joined = only.joined();
    let record = match parse_key_record(&joined) {
        Ok(record) => record,
        Err(error) => {
            return failure(&[format!("{name}: syntax error in the record: {error}")]);
        }
    };
    if record.testing {
        println!(
            "{name}: warning: t=y: the domain is testing DKIM, and verifiers may treat its signatures as absent (RFC 6376 section 3.6.1)"
        );
    }
    match check_key_record(&key, &record) {
        RecordVerdict::Matches => {
            println!(
                "{name}: matches the key in {file} ({}, {} bits)",
                key.algorithm(),
                key.bits()
            );
            Ok(ExitCode::SUCCESS)
        }
        RecordVerdict::KeyTypeMismatch { record_key_type } => failure(&[format!(
            "{name}: key type mismatch: the record has k={record_key_type}, {file} is a {} key",
            key.algorithm().key_type()
        )]),
        RecordVerdict::Revoked => failure(&[format!(
            "{name}: the key is revoked: p= is empty (RFC 6376 section 3.6.1), so every signature with this selector fails"
        )]),
        RecordVerdict::HashNotAllowed => failure(&[format!(
            "{name}: the record's h= does not allow sha256, the only hash tsubame signs with"
        )]),
        RecordVerdict::DifferentKey => failure(&[format!(
            "{name}: different public key: p= does not match the key in {file}"
        )]),
    }
}

/// One line about a TXT record: its text (escaped, so a hostile record cannot drive the
/// terminal), its length and how many strings it came in.
fn describe(record: &TxtRecord) -> String {
    let joined = record.joined();
    format!(
        "{:?} ({} bytes in {} string{})",
        String::from_utf8_lossy(&joined),
        joined.len(),
        record.strings.len(),
        if record.strings.len() == 1 { "" } else { "s" }
    )
}
