//! Opening a session with an upstream address, as its configuration says.

use std::net::SocketAddr;

use tsubame_delivery::{DeliveryError, UpstreamConnection};

use crate::upstream::Upstream;

pub(crate) fn open(
    upstream: &Upstream,
    server_name: &str,
    address: SocketAddr,
) -> Result<UpstreamConnection, DeliveryError> {
    let _ = server_name;
    UpstreamConnection::connect_with_tls(
        address,
        &upstream.helo_name,
        upstream.config.tls_mode(),
        upstream.timeouts,
    )
}
