//! Opening a session with an upstream address as its configuration says: TLS mode,
//! the certificate name to check, credentials.

use std::net::SocketAddr;

use tsubame_config::TlsMode;
use tsubame_delivery::{ConnectOptions, Credentials, DeliveryError, UpstreamConnection};

use crate::upstream::Upstream;

/// `server_name` is the name the certificate must match: the configured host of a
/// smarthost, the MX host name for direct delivery. `credentials`: what
/// [`Upstream::credentials`] gave for the session's account.
pub(crate) fn open(
    upstream: &Upstream,
    server_name: &str,
    address: SocketAddr,
    credentials: Option<&Credentials>,
) -> Result<UpstreamConnection, DeliveryError> {
    let options = ConnectOptions {
        helo_name: &upstream.helo_name,
        tls: upstream.tls.mode(),
        server_name,
        tls_config: upstream.tls.config(),
        credentials,
        timeouts: upstream.timeouts,
    };
    match UpstreamConnection::open(address, &options) {
        // Opportunistic TLS that fails in the handshake: plain text is what the mode
        // allows (RFC 7435), as Postfix's `may` level does. Never with credentials,
        // which only ever travel encrypted.
        Err(DeliveryError::TlsHandshake { .. })
            if upstream.tls.mode() == TlsMode::Opportunistic && credentials.is_none() =>
        {
            tracing::info!(
                upstream = upstream.name(),
                %address,
                "TLS handshake failed; opportunistic TLS falls back to plain text"
            );
            let plain = ConnectOptions {
                tls: TlsMode::None,
                tls_config: None,
                ..options
            };
            UpstreamConnection::open(address, &plain)
        }
        other => other,
    }
}
