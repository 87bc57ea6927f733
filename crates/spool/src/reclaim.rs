//! Which segments reclaim may delete, and in what order (`spool-format/README.md`,
//! "Reclaim"). Bookkeeping only: no I/O, no clock; the writer feeds it appends, commit
//! results and deletions under its state mutex, and [`ReclaimTracker::next_round`] answers
//! which segments may go next.
//!
//! The format's rule, restated the way it is checked here: a segment may be deleted once
//! it is sealed, nothing appended to it awaits its sync, every message stored in it is
//! done, and every *other* segment holding a message that one of its journal records
//! names has already been deleted durably. The last condition also covers "the named
//! message is done", because a segment is only deleted once all of its messages are.
//! Segments are deleted in *rounds*: one round is every segment ready now, then one
//! directory `fsync`, and only then the next round, whose segments may hold the
//! message-done records of the messages the previous round deleted. So at every moment a
//! crash can interrupt, a message record still on disk has its message-done record on disk
//! too, and a done message never comes back.
//!
//! Memory: one [`TrackedMessage`] entry in a hash map and one id in its segment's list per
//! message stored in a live (tracked) segment, one entry per live segment, and one segment
//! number per (segment, other segment it depends on) pair, which is small because journal
//! records name messages of the same or recently active segments. Journal records cost
//! nothing beyond that. Everything about a segment goes when it is deleted.

#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};

use crate::MessageId;

/// The reclaim bookkeeping of one spool writer.
#[derive(Debug, Default)]
pub(crate) struct ReclaimTracker {
    /// Every segment reclaim may some day delete, by number: the readable segments recovery
    /// found and every segment this writer created, until its deletion is durable.
    segments: HashMap<u64, TrackedSegment>,
    /// Every message stored in a tracked segment. Invariant: `segment` is a key of
    /// `segments`, and `done` entries are counted out of its `undone_messages`.
    messages: HashMap<MessageId, TrackedMessage>,
    /// Message-done records appended and not yet covered by a commit notice, in sequence
    /// order. Bounded by the appends in flight between two commits.
    pending_done: VecDeque<(u64, MessageId)>,
    /// The highest sequence number a commit notice (successful or not) has covered: no
    /// dirty range of an append up to it is waiting for a sync any more.
    notified_through_sequence: u64,
}

#[derive(Debug)]
struct TrackedSegment {
    size_bytes: u64,
    /// `false` for a segment that must stay whatever its messages' state: damage without a
    /// complete copy in `quarantine/`, a record type this reader does not know, or a
    /// message id that another segment holds too.
    may_be_reclaimed: bool,
    /// The sequence number of the latest record this writer appended to it; 0 for a
    /// segment recovery found.
    last_sequence: u64,
    /// The messages stored in it, to forget them when it is deleted.
    messages: Vec<MessageId>,
    /// How many of `messages` are not done yet.
    undone_messages: usize,
    /// Other segments holding a message that a journal record in this one names, without
    /// duplicates. May still list segments deleted since; `next_round` prunes them.
    depends_on: Vec<u64>,
}

#[derive(Debug, Clone, Copy)]
struct TrackedMessage {
    segment: u64,
    /// A message-done record for it is durable (covered by a successful commit notice, or
    /// found by recovery).
    done: bool,
}

/// What a segment recovery found holds, for [`ReclaimTracker::from_recovery`].
#[derive(Debug, Default)]
pub(crate) struct RecoveredSegment {
    pub(crate) number: u64,
    pub(crate) size_bytes: u64,
    /// Its damage has a complete copy in `quarantine/` (or there is none), and it holds no
    /// record of an unknown type.
    pub(crate) may_be_reclaimed: bool,
    pub(crate) message_ids: Vec<MessageId>,
    /// Ids named by its journal records (duplicates allowed).
    pub(crate) journal_ids: Vec<MessageId>,
}

/// One record as the tracker needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TrackedRecord {
    Message(MessageId),
    RecipientOutcome(MessageId),
    MessageDone(MessageId),
    /// Names a message like a recipient outcome and adds the same dependency (rule 3):
    /// otherwise its segment could go while the message is still queued, and after a
    /// restart the message would be sent without its added fields (its DKIM signature).
    AddedFields(MessageId),
}

/// A segment [`ReclaimTracker::next_round`] found ready to delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Deletable {
    pub(crate) number: u64,
    pub(crate) size_bytes: u64,
}

impl ReclaimTracker {
    /// Builds the tracker from recovery's findings. `done` holds every id a message-done
    /// record names in any segment. Messages found done count as done: they were read back
    /// from the files (see the format document on why that is safe even if the previous run
    /// died before syncing them).
    pub(crate) fn from_recovery(
        segments: Vec<RecoveredSegment>,
        done: &std::collections::HashSet<MessageId>,
    ) -> Self {
        let mut tracker = Self::default();
        let mut journal = Vec::with_capacity(segments.len());
        for recovered in segments {
            tracker.segments.insert(
                recovered.number,
                TrackedSegment {
                    size_bytes: recovered.size_bytes,
                    may_be_reclaimed: recovered.may_be_reclaimed,
                    last_sequence: 0,
                    messages: Vec::with_capacity(recovered.message_ids.len()),
                    undone_messages: 0,
                    depends_on: Vec::new(),
                },
            );
            for id in recovered.message_ids {
                tracker.add_recovered_message(recovered.number, id, done.contains(&id));
            }
            journal.push((recovered.number, recovered.journal_ids));
        }
        // Journal records may name messages of any segment, later ones included (a segment
        // created ahead can be numbered below one created after it), so all messages are
        // known before the first journal record is looked at.
        for (number, ids) in journal {
            for id in ids {
                tracker.add_journal_reference(number, id);
            }
        }
        tracker
    }

    fn add_recovered_message(&mut self, number: u64, id: MessageId, done: bool) {
        if let Some(other) = self.messages.get(&id).map(|message| message.segment) {
            // Ids are unique by construction, so a second copy means damage or a foreign
            // file. Which copy a journal record meant is unknowable: keep both segments
            // (and with them every segment whose journal names the id).
            for pinned in [other, number] {
                if let Some(segment) = self.segments.get_mut(&pinned) {
                    segment.may_be_reclaimed = false;
                }
            }
            return;
        }
        let Some(segment) = self.segments.get_mut(&number) else {
            return;
        };
        segment.messages.push(id);
        if !done {
            segment.undone_messages += 1;
        }
        self.messages.insert(
            id,
            TrackedMessage {
                segment: number,
                done,
            },
        );
    }

    /// Starts tracking a segment this writer just created (active, spare or dedicated).
    pub(crate) fn add_created_segment(&mut self, number: u64, size_bytes: u64) {
        self.segments.insert(
            number,
            TrackedSegment {
                size_bytes,
                may_be_reclaimed: true,
                last_sequence: 0,
                messages: Vec::new(),
                undone_messages: 0,
                depends_on: Vec::new(),
            },
        );
    }

    /// Stops tracking a segment that was removed without `next_round` (an empty active or
    /// spare segment removed at shutdown).
    pub(crate) fn forget_segment(&mut self, number: u64) {
        if let Some(segment) = self.segments.remove(&number) {
            for id in segment.messages {
                self.messages.remove(&id);
            }
        }
    }

    /// Notes a record this writer appended to segment `number` with commit `sequence`.
    pub(crate) fn record_appended(&mut self, number: u64, record: TrackedRecord, sequence: u64) {
        if let Some(segment) = self.segments.get_mut(&number) {
            segment.last_sequence = segment.last_sequence.max(sequence);
        }
        match record {
            TrackedRecord::Message(id) => {
                if let Some(segment) = self.segments.get_mut(&number) {
                    segment.messages.push(id);
                    segment.undone_messages += 1;
                    self.messages.insert(
                        id,
                        TrackedMessage {
                            segment: number,
                            done: false,
                        },
                    );
                }
            }
            TrackedRecord::RecipientOutcome(id) | TrackedRecord::AddedFields(id) => {
                self.add_journal_reference(number, id)
            }
            TrackedRecord::MessageDone(id) => {
                self.add_journal_reference(number, id);
                self.pending_done.push_back((sequence, id));
            }
        }
    }

    /// A journal record in segment `number` names message `id`: the segment holding that
    /// message must be deleted first. An id of no tracked message names a message whose
    /// segment is gone (or was never readable), which holds nothing back.
    fn add_journal_reference(&mut self, number: u64, id: MessageId) {
        let Some(target) = self.messages.get(&id).map(|message| message.segment) else {
            return;
        };
        if target == number {
            // Covered by `undone_messages`, and deleted together with it.
            return;
        }
        if let Some(segment) = self.segments.get_mut(&number)
            && !segment.depends_on.contains(&target)
        {
            segment.depends_on.push(target);
        }
    }

    /// A commit notice covered every sequence up to `through_sequence`. If it reported
    /// success, the message-done records among them are durable and their messages done;
    /// if not, they prove nothing and are dropped (the caller decides whether to append them
    /// again).
    pub(crate) fn commit_completed(&mut self, through_sequence: u64, succeeded: bool) {
        while let Some(&(sequence, id)) = self.pending_done.front() {
            if sequence > through_sequence {
                break;
            }
            self.pending_done.pop_front();
            if succeeded {
                self.mark_done(id);
            }
        }
        self.notified_through_sequence = self.notified_through_sequence.max(through_sequence);
    }

    fn mark_done(&mut self, id: MessageId) {
        let Some(message) = self.messages.get_mut(&id) else {
            return;
        };
        if message.done {
            return;
        }
        message.done = true;
        if let Some(segment) = self.segments.get_mut(&message.segment) {
            segment.undone_messages = segment.undone_messages.saturating_sub(1);
        }
    }

    /// The segments that may be deleted now, as one round: none of them depends on another
    /// tracked segment, so they may be unlinked in any order, and the next round must wait
    /// until these deletions are durable and [`Self::segment_deleted`] was called for each.
    /// `open_segments` are the active and spare segments, which stay. In number order.
    pub(crate) fn next_round(&mut self, open_segments: &[u64]) -> Vec<Deletable> {
        // Counters first: when nothing is deletable this is all a pass costs.
        let candidates: Vec<u64> = self
            .segments
            .iter()
            .filter(|(number, segment)| {
                !open_segments.contains(number)
                    && segment.may_be_reclaimed
                    && segment.undone_messages == 0
                    && segment.last_sequence <= self.notified_through_sequence
            })
            .map(|(number, _)| *number)
            .collect();
        let mut round = Vec::new();
        for number in candidates {
            let Some(segment) = self.segments.get_mut(&number) else {
                continue;
            };
            let size_bytes = segment.size_bytes;
            let mut depends_on = std::mem::take(&mut segment.depends_on);
            // Within one writer session a deleted segment's number never comes back, so
            // dropping deleted segments from the list is final.
            depends_on.retain(|other| self.segments.contains_key(other));
            let ready = depends_on.is_empty();
            if let Some(segment) = self.segments.get_mut(&number) {
                segment.depends_on = depends_on;
            }
            if ready {
                round.push(Deletable { number, size_bytes });
            }
        }
        round.sort_unstable_by_key(|deletable| deletable.number);
        round
    }

    /// The deletion of segment `number` is durable: forget it and its messages.
    pub(crate) fn segment_deleted(&mut self, number: u64) {
        self.forget_segment(number);
    }

    /// How many segments are tracked (for tests and logs).
    #[cfg(test)]
    pub(crate) fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// How many messages are tracked (for tests).
    #[cfg(test)]
    pub(crate) fn message_count(&self) -> usize {
        self.messages.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn id(n: u64) -> MessageId {
        MessageId(n)
    }

    /// Runs rounds to the end, as reclaim does, and returns them.
    fn all_rounds(tracker: &mut ReclaimTracker, open: &[u64]) -> Vec<Vec<u64>> {
        let mut rounds = Vec::new();
        loop {
            let round = tracker.next_round(open);
            if round.is_empty() {
                return rounds;
            }
            for deletable in &round {
                tracker.segment_deleted(deletable.number);
            }
            rounds.push(round.iter().map(|deletable| deletable.number).collect());
        }
    }

    fn recovered(number: u64, messages: &[u64], journal: &[u64]) -> RecoveredSegment {
        RecoveredSegment {
            number,
            size_bytes: 4096,
            may_be_reclaimed: true,
            message_ids: messages.iter().copied().map(id).collect(),
            journal_ids: journal.iter().copied().map(id).collect(),
        }
    }

    #[test]
    fn dependencies_order_the_rounds() {
        // 1 holds messages 1 and 2; 2 holds 3 and the done records of 1 and 2; 3 holds the
        // done record of 3. 3 depends on 2, which depends on 1.
        let done: HashSet<MessageId> = [1, 2, 3].map(id).into();
        let mut tracker = ReclaimTracker::from_recovery(
            vec![
                recovered(1, &[1, 2], &[]),
                recovered(2, &[3], &[1, 2]),
                recovered(3, &[], &[3]),
            ],
            &done,
        );
        assert_eq!(
            all_rounds(&mut tracker, &[]),
            vec![vec![1], vec![2], vec![3]]
        );
        assert_eq!(tracker.segment_count(), 0);
        assert_eq!(tracker.message_count(), 0);
    }

    #[test]
    fn an_undone_message_keeps_its_segment_and_every_segment_that_names_it_or_depends_on_one() {
        // Message 2 in segment 1 is not done. Segment 2 names message 2 (a deferred outcome),
        // segment 3 names message 3 of segment 2, segment 4 names only message 9 of itself.
        let done: HashSet<MessageId> = [1, 3, 4, 9].map(id).into();
        let mut tracker = ReclaimTracker::from_recovery(
            vec![
                recovered(1, &[1, 2], &[]),
                recovered(2, &[3], &[1, 2]),
                recovered(3, &[4], &[3]),
                recovered(4, &[9], &[9, 4]),
            ],
            &done,
        );
        // 4 names message 4 of segment 3, so it waits for 3 as well.
        assert_eq!(all_rounds(&mut tracker, &[]), Vec::<Vec<u64>>::new());
        tracker.mark_done(id(2));
        assert_eq!(
            all_rounds(&mut tracker, &[]),
            vec![vec![1], vec![2], vec![3], vec![4]]
        );
    }

    #[test]
    fn a_later_numbered_segment_can_be_a_dependency() {
        // A dedicated segment 7 holds a big message; the spare 6, activated after it was
        // created, holds its done record. Deleting in number order would drop the done
        // record while the message is still there.
        let done: HashSet<MessageId> = [70].map(id).into();
        let mut tracker = ReclaimTracker::from_recovery(
            vec![recovered(6, &[], &[70]), recovered(7, &[70], &[])],
            &done,
        );
        assert_eq!(all_rounds(&mut tracker, &[]), vec![vec![7], vec![6]]);
    }

    #[test]
    fn journal_records_of_gone_messages_hold_nothing_back() {
        let mut tracker =
            ReclaimTracker::from_recovery(vec![recovered(5, &[], &[1, 2, 3])], &HashSet::new());
        assert_eq!(all_rounds(&mut tracker, &[]), vec![vec![5]]);
    }

    #[test]
    fn pinned_segments_stay_and_so_do_their_dependents() {
        let done: HashSet<MessageId> = [1, 2].map(id).into();
        let mut damaged = recovered(1, &[1], &[]);
        damaged.may_be_reclaimed = false;
        let mut tracker = ReclaimTracker::from_recovery(
            vec![damaged, recovered(2, &[2], &[1, 2]), recovered(3, &[], &[])],
            &done,
        );
        assert_eq!(all_rounds(&mut tracker, &[]), vec![vec![3]]);
    }

    #[test]
    fn a_duplicated_message_id_pins_both_copies() {
        let done: HashSet<MessageId> = [1].map(id).into();
        let mut tracker = ReclaimTracker::from_recovery(
            vec![
                recovered(1, &[1], &[]),
                recovered(2, &[1], &[]),
                recovered(3, &[], &[1]),
            ],
            &done,
        );
        assert_eq!(all_rounds(&mut tracker, &[]), Vec::<Vec<u64>>::new());
    }

    #[test]
    fn a_cycle_is_never_ready() {
        // Not something one writer produces (journal records only name messages of the
        // same or an earlier active segment, or of a dedicated one, which holds no journal),
        // but if the files say so, neither order is safe: both stay.
        let done: HashSet<MessageId> = [1, 2].map(id).into();
        let mut tracker = ReclaimTracker::from_recovery(
            vec![recovered(1, &[1], &[2]), recovered(2, &[2], &[1])],
            &done,
        );
        assert_eq!(all_rounds(&mut tracker, &[]), Vec::<Vec<u64>>::new());
    }

    #[test]
    fn done_counts_only_after_a_successful_commit() {
        let mut tracker = ReclaimTracker::default();
        tracker.add_created_segment(1, 4096);
        tracker.add_created_segment(2, 4096);
        tracker.record_appended(1, TrackedRecord::Message(id(1)), 1);
        tracker.record_appended(2, TrackedRecord::RecipientOutcome(id(1)), 2);
        tracker.record_appended(2, TrackedRecord::MessageDone(id(1)), 3);
        // Segment 2 is active; segment 1 waits for its done record's commit.
        assert!(tracker.next_round(&[2]).is_empty());
        tracker.commit_completed(2, true);
        assert!(tracker.next_round(&[2]).is_empty());
        // A failed commit proves nothing.
        tracker.commit_completed(3, false);
        assert!(tracker.next_round(&[2]).is_empty());
        tracker.record_appended(2, TrackedRecord::MessageDone(id(1)), 4);
        tracker.commit_completed(4, true);
        assert_eq!(
            tracker.next_round(&[2]),
            vec![Deletable {
                number: 1,
                size_bytes: 4096
            }]
        );
    }

    #[test]
    fn a_segment_with_an_unsynced_append_waits() {
        let mut tracker = ReclaimTracker::default();
        tracker.add_created_segment(1, 4096);
        tracker.add_created_segment(2, 4096);
        tracker.record_appended(1, TrackedRecord::Message(id(1)), 1);
        tracker.record_appended(2, TrackedRecord::MessageDone(id(1)), 2);
        tracker.commit_completed(2, true);
        // A stray outcome for a done message lands in segment 1 (say, sealed meanwhile).
        tracker.record_appended(1, TrackedRecord::RecipientOutcome(id(1)), 3);
        assert!(tracker.next_round(&[2]).is_empty());
        tracker.commit_completed(3, true);
        assert_eq!(all_rounds(&mut tracker, &[2]), vec![vec![1]]);
    }

    #[test]
    fn open_segments_stay() {
        let mut tracker = ReclaimTracker::default();
        tracker.add_created_segment(1, 4096);
        tracker.add_created_segment(2, 8192);
        assert!(tracker.next_round(&[1, 2]).is_empty());
        assert_eq!(
            tracker.next_round(&[2]),
            vec![Deletable {
                number: 1,
                size_bytes: 4096
            }]
        );
    }
}
