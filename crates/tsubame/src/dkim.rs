//! `tsubame dkim keygen`: a new DKIM signing key and the DNS record that publishes it.
//!
//! The key file is written 0600 and atomically, and never replaced without --force; the
//! key itself is never printed. Standard output holds exactly two lines: the zone-file
//! record, then the bare TXT value (for DNS control panels), so scripts can take either.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use tsubame_dkim::{SigningKey, check_domain_and_selector, write_key_file};

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
    }
}
