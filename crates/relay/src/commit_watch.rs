//! Waiting for a particular spool record to be durable: the spool's commit notices,
//! kept for whoever needs to wait on one (the dispatcher, before it journals a failure
//! whose bounce must already be on disk).

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tsubame_spool::CommitNotice;

/// Failed commit ranges remembered; a sync failure seals a segment, so there are few.
const FAILED_RANGES_MAX: usize = 64;

#[derive(Debug, Default)]
struct State {
    /// Every sequence number up to this one has had its notice.
    through: u64,
    /// `(first, last)` sequence ranges whose sync failed.
    failed: Vec<(u64, u64)>,
}

#[derive(Debug, Default)]
pub(crate) struct CommitWatch {
    state: Mutex<State>,
    changed: Condvar,
}

impl CommitWatch {
    /// The spool's subscriber calls this from the committer thread.
    pub fn on_notice(&self, notice: &CommitNotice) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if notice.result.is_err() {
            let first = state.through + 1;
            if state.failed.len() == FAILED_RANGES_MAX {
                state.failed.remove(0);
            }
            state.failed.push((first, notice.through_sequence));
        }
        state.through = state.through.max(notice.through_sequence);
        drop(state);
        self.changed.notify_all();
    }

    /// True once the record with `sequence` is durable; false if its sync failed or no
    /// notice came within `timeout`.
    pub fn wait_durable(&self, sequence: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if state.through >= sequence {
                return !state
                    .failed
                    .iter()
                    .any(|&(first, last)| (first..=last).contains(&sequence));
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn notice(through_sequence: u64, ok: bool) -> CommitNotice {
        CommitNotice {
            through_sequence,
            result: if ok { Ok(()) } else { Err(Arc::from("EIO")) },
        }
    }

    #[test]
    fn durable_failed_and_not_yet() {
        let watch = CommitWatch::default();
        watch.on_notice(&notice(3, true));
        watch.on_notice(&notice(5, false));
        watch.on_notice(&notice(9, true));
        assert!(watch.wait_durable(2, Duration::ZERO));
        assert!(
            !watch.wait_durable(4, Duration::ZERO),
            "4 was in the failed batch 4..=5"
        );
        assert!(watch.wait_durable(7, Duration::ZERO));
        assert!(
            !watch.wait_durable(10, Duration::from_millis(5)),
            "no notice yet"
        );
    }

    #[test]
    fn a_waiter_wakes_on_the_notice() {
        let watch = Arc::new(CommitWatch::default());
        let waiter = {
            let watch = Arc::clone(&watch);
            std::thread::spawn(move || watch.wait_durable(4, Duration::from_secs(30)))
        };
        std::thread::sleep(Duration::from_millis(20));
        watch.on_notice(&notice(4, true));
        assert!(waiter.join().unwrap());
    }
}
