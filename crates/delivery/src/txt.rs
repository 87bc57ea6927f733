//! One blocking TXT lookup, for operator commands (`tsubame dkim check`), with the same
//! resolver set-up as [`crate::mx`]: the system configuration, or one given server.
//!
//! Each call builds its own current-thread runtime and resolver and drops them at the
//! end: a command line tool looks up one name, so there is no cache worth keeping and
//! no thread to own.

use hickory_resolver::proto::rr::{Name, RData};

use crate::mx::{Negative, ResolverOptions, build_resolver, classify};

/// One TXT resource record: its character-strings, in order (RFC 1035 section 3.3.14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxtRecord {
    /// Each at most 255 bytes, as the wire format allows.
    pub strings: Vec<Vec<u8>>,
}

impl TxtRecord {
    /// The strings joined without separator, as DKIM (RFC 6376 section 3.6.2.2) and SPF
    /// read a record.
    pub fn joined(&self) -> Vec<u8> {
        self.strings.concat()
    }
}

/// The answer to a TXT query that got one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxtAnswer {
    /// NOERROR with at least one TXT record, in the order the server sent them.
    Records(Vec<TxtRecord>),
    /// NXDOMAIN: the name does not exist.
    NoSuchName,
    /// NOERROR without a TXT record (NODATA): the name exists with other records.
    NoRecords,
}

/// A TXT query that got no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxtError {
    #[error("{name:?} is not a valid DNS name: {reason}")]
    InvalidName { name: String, reason: String },
    /// SERVFAIL, REFUSED, a timeout or a network error: worth retrying later.
    #[error("DNS lookup of {name} failed: {reason}")]
    Failed { name: String, reason: String },
    /// The runtime or resolver could not start, or the call came from inside an async
    /// runtime, where it must not block.
    #[error("cannot start the DNS resolver: {reason}")]
    Start { reason: String },
}

/// Looks up the TXT records of `name` (taken as fully qualified, never expanded by a
/// search list). Blocks for at most about [`ResolverOptions::timeout`]; call it from a
/// plain thread.
pub fn lookup_txt(name: &str, options: &ResolverOptions) -> Result<TxtAnswer, TxtError> {
    let mut query_name = Name::from_ascii(name).map_err(|error| TxtError::InvalidName {
        name: name.to_string(),
        reason: error.to_string(),
    })?;
    query_name.set_fqdn(true);
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(TxtError::Start {
            reason: "lookup_txt blocks and was called inside an async runtime".to_string(),
        });
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|error| TxtError::Start {
            reason: format!("building the tokio runtime: {error}"),
        })?;
    // hickory spawns its background work on the current runtime: build it inside.
    let resolver = {
        let _entered = runtime.enter();
        build_resolver(options).map_err(|error| TxtError::Start {
            reason: error.to_string(),
        })?
    };
    let failed = |reason: String| TxtError::Failed {
        name: name.to_string(),
        reason,
    };
    let result = runtime
        .block_on(async {
            tokio::time::timeout(options.timeout, resolver.txt_lookup(query_name)).await
        })
        .map_err(|_| failed(format!("no answer within {:?}", options.timeout)))?;
    match result {
        Ok(lookup) => {
            // The answer may hold the CNAME records that led to the TXT records.
            let records: Vec<TxtRecord> = lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::TXT(txt) => Some(TxtRecord {
                        strings: txt.txt_data.iter().map(|string| string.to_vec()).collect(),
                    }),
                    _ => None,
                })
                .collect();
            if records.is_empty() {
                Ok(TxtAnswer::NoRecords)
            } else {
                Ok(TxtAnswer::Records(records))
            }
        }
        Err(error) => match classify(&error) {
            Negative::NoSuchName => Ok(TxtAnswer::NoSuchName),
            Negative::NoData => Ok(TxtAnswer::NoRecords),
            Negative::Failed(reason) => Err(failed(reason)),
        },
    }
}
