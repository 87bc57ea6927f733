//! The queues that feed the dispatcher and the workers: a mutex-protected deque and a
//! condition variable.
//!
//! Not crossbeam channels, measured: crossbeam's blocking receive spins and calls
//! `sched_yield` before it parks, and with twenty-odd delivery threads waiting on two
//! cores that cost about 7 % of the relay's CPU in the end-to-end benchmark (perf:
//! `__sched_yield` under `Channel::recv`). Here a waiter parks at once, and a push
//! wakes one only when someone is waiting.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct State<T> {
    items: VecDeque<T>,
    /// No more pushes are accepted; waiters end once the queue is empty.
    closed: bool,
    /// Threads blocked in `pop_timeout`.
    waiting: usize,
}

#[derive(Debug)]
pub(crate) struct Inbox<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

/// What `pop_timeout` found.
#[derive(Debug)]
pub(crate) enum Pop<T> {
    Item(T),
    Timeout,
    /// Closed and empty.
    Closed,
}

impl<T> Default for Inbox<T> {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                items: VecDeque::new(),
                closed: false,
                waiting: 0,
            }),
            ready: Condvar::new(),
        }
    }
}

impl<T> Inbox<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding the lock leaves the deque itself consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues an item; gives it back once the inbox is closed.
    pub fn push(&self, item: T) -> Result<(), T> {
        let mut state = self.lock();
        if state.closed {
            return Err(item);
        }
        state.items.push_back(item);
        let wake = state.waiting > 0;
        drop(state);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// The next item, waiting up to `timeout` for one.
    pub fn pop_timeout(&self, timeout: Duration) -> Pop<T> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(item) = state.items.pop_front() {
                return Pop::Item(item);
            }
            if state.closed {
                return Pop::Closed;
            }
            let now = Instant::now();
            if now >= deadline {
                return Pop::Timeout;
            }
            state.waiting += 1;
            let (next, _) = self
                .ready
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner);
            state = next;
            state.waiting -= 1;
        }
    }

    /// Moves up to `max` queued items into `out` without waiting.
    pub fn drain_into(&self, out: &mut Vec<T>, max: usize) {
        let mut state = self.lock();
        let count = state.items.len().min(max);
        out.extend(state.items.drain(..count));
    }

    /// Takes out every queued item `matches` picks, in order.
    pub fn take_where(&self, mut matches: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut state = self.lock();
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(state.items.len());
        for item in state.items.drain(..) {
            if matches(&item) {
                taken.push(item);
            } else {
                kept.push_back(item);
            }
        }
        state.items = kept;
        taken
    }

    /// Refuses further pushes and wakes every waiter; queued items can still be popped.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn items_come_out_in_order_and_closing_ends_waiters() {
        let inbox = Arc::new(Inbox::default());
        inbox.push(1).unwrap();
        inbox.push(2).unwrap();
        assert!(matches!(inbox.pop_timeout(Duration::ZERO), Pop::Item(1)));
        inbox.push(5).unwrap();
        inbox.push(6).unwrap();
        assert_eq!(inbox.take_where(|item| *item == 5), vec![5]);
        let mut drained = Vec::new();
        inbox.drain_into(&mut drained, 10);
        assert_eq!(drained, vec![2, 6]);
        assert!(matches!(
            inbox.pop_timeout(Duration::from_millis(1)),
            Pop::Timeout
        ));
        let waiter = {
            let inbox = Arc::clone(&inbox);
            std::thread::spawn(move || {
                matches!(inbox.pop_timeout(Duration::from_secs(30)), Pop::Closed)
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        inbox.close();
        assert!(
            waiter.join().unwrap(),
            "a waiter must end when the inbox closes"
        );
        assert_eq!(inbox.push(3), Err(3));
    }

    #[test]
    fn a_push_wakes_a_waiter() {
        let inbox: Arc<Inbox<u32>> = Arc::new(Inbox::default());
        let waiter = {
            let inbox = Arc::clone(&inbox);
            std::thread::spawn(move || match inbox.pop_timeout(Duration::from_secs(30)) {
                Pop::Item(item) => item,
                other => panic!("{other:?}"),
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        inbox.push(7).unwrap();
        assert_eq!(waiter.join().unwrap(), 7);
    }
}
