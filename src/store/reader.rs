//! Reading the backlog in seq order with every block parsed once.
//!
//! Events of the two classes live in separate blocks, so a reader merges two streams. Asking the
//! store for "the next N events from seq S" again and again would parse the front of a block
//! once per call and throw away what the other class read past N; the reader instead keeps a
//! cursor and a look-ahead queue per class, reads whole blocks, and merges the queues.

use super::{Store, StoreError, Stored};
use crate::event::Class;
use std::collections::VecDeque;

const CLASSES: [Class; 2] = [Class::Keep, Class::Telemetry];

/// A cursor over the unacknowledged events of a store, in seq order.
#[derive(Debug)]
pub struct Reader {
    queue: [VecDeque<Stored>; 2],
    /// Per class: the seq the next block read starts from.
    next: [u64; 2],
}

impl Reader {
    /// A reader starting at seq `from`.
    pub fn new(from: u64) -> Reader {
        Reader {
            queue: [VecDeque::new(), VecDeque::new()],
            next: [from; 2],
        }
    }

    /// Up to `max` further events in seq order. Events committed after an earlier call are
    /// found too (they have higher seqs than anything read before).
    pub fn read(&mut self, store: &Store, max: usize) -> Result<Vec<Stored>, StoreError> {
        let mut out = Vec::new();
        // A class whose queue is empty after a read has nothing more stored right now.
        let mut dry = [false; 2];
        while out.len() < max {
            for c in 0..2 {
                if self.queue[c].is_empty() && !dry[c] {
                    self.next[c] =
                        store.class_blocks(CLASSES[c], self.next[c], max, &mut self.queue[c])?;
                    dry[c] = self.queue[c].is_empty();
                }
            }
            let pick = match (self.queue[0].front(), self.queue[1].front()) {
                (Some(a), Some(b)) => usize::from(b.at.seq < a.at.seq),
                (Some(_), None) => 0,
                (None, Some(_)) => 1,
                (None, None) => break,
            };
            out.extend(self.queue[pick].pop_front());
        }
        Ok(out)
    }
}
