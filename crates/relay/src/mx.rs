//! Direct delivery: the hosts to try for a recipient domain, from DNS (RFC 5321 §5.1),
//! in preference order.

use tsubame_delivery::mx::MxError;
use tsubame_queue::Outcome;

use crate::upstream::Upstream;
use tsubame_delivery::reply_class::UpstreamSignal;

use crate::worker::{GroupFailure, Target};

pub(crate) fn targets(
    upstream: &Upstream,
    domain: &str,
    port: u16,
) -> Result<Vec<Target>, GroupFailure> {
    let Some(resolver) = &upstream.resolver else {
        return Err(GroupFailure {
            outcome: Outcome::Deferred,
            detail: format!("upstream {:?} has no resolver", upstream.name()),
            status: "4.3.0",
            signal: UpstreamSignal::Normal,
        });
    };
    if domain.is_empty() {
        return Err(GroupFailure {
            outcome: Outcome::Failed,
            detail: "the recipient address has no domain to look up".to_string(),
            status: "5.1.3",
            signal: UpstreamSignal::Normal,
        });
    }
    match resolver.lookup(domain) {
        Ok(hosts) => Ok(hosts
            .iter()
            .map(|host| Target {
                name: host.name.clone(),
                addresses: host.socket_addresses(port).collect(),
            })
            .collect()),
        Err(error) => Err(GroupFailure {
            outcome: if error.is_permanent() {
                Outcome::Failed
            } else {
                Outcome::Deferred
            },
            status: error.status(),
            detail: describe(&error),
            signal: UpstreamSignal::Normal,
        }),
    }
}

fn describe(error: &MxError) -> String {
    error.to_string()
}
