//! Reading the backlog in seq order with every block parsed once.
//!
//! Events of the two classes live in separate blocks, so a reader merges two streams. Asking the
//! store for "the next N events from seq S" again and again would parse the front of a block
//! once per call and throw away what the other class read past N; the reader instead keeps, per
//! class, the blocks loaded so far and a position in the first of them, and merges the two
//! streams event by event. Visiting an event costs a header parse and no allocation.

use super::{EventRef, Store, StoreError, Stored};
use crate::event::Class;
use std::collections::VecDeque;

const CLASSES: [Class; 2] = [Class::Keep, Class::Telemetry];

/// A block loaded by the reader, with the positions acknowledged when it was loaded.
#[derive(Debug)]
pub(super) struct Loaded {
    pub(super) block: u64,
    pub(super) count: u32,
    pub(super) bytes: u32,
    pub(super) acked: Option<Vec<u64>>,
    pub(super) value: sled::IVec,
}

impl Loaded {
    fn acked(&self, index: u32) -> bool {
        self.acked.as_ref().is_some_and(|bits| {
            bits.get(index as usize / 64)
                .is_some_and(|w| w & (1 << (index % 64)) != 0)
        })
    }
}

/// The next event of a stream: seq, JSON span and position in the front block.
#[derive(Debug, Clone, Copy)]
struct Head {
    seq: u64,
    span: (usize, usize),
    index: u32,
}

/// One class: loaded blocks, the read position in the first, and where loading continues.
#[derive(Debug)]
struct Stream {
    class: Class,
    blocks: VecDeque<Loaded>,
    pos: usize,
    index: u32,
    head: Option<Head>,
    next: u64,
}

impl Stream {
    /// The next unacknowledged event with seq >= `from` among the loaded blocks.
    fn head(&mut self, from: u64) -> Option<Head> {
        while self.head.is_none() {
            let b = self.blocks.front()?;
            let v = &b.value[..];
            let at = self.pos.max(12);
            let parsed = v.get(at..at + 12).and_then(|h| {
                let seq = u64::from_be_bytes(h[..8].try_into().ok()?);
                let len = u32::from_be_bytes(h[8..].try_into().ok()?) as usize;
                let end = at + 12 + len;
                (end <= v.len()).then_some((seq, at + 12, end))
            });
            let Some((seq, start, end)) = parsed else {
                // End of the block (or a truncated one): on to the next.
                self.blocks.pop_front();
                self.pos = 0;
                self.index = 0;
                continue;
            };
            let index = self.index;
            self.pos = end;
            self.index += 1;
            if seq >= from && !b.acked(index) {
                self.head = Some(Head {
                    seq,
                    span: (start, end),
                    index,
                });
            }
        }
        self.head
    }
}

/// A cursor over the unacknowledged events of a store, in seq order.
#[derive(Debug)]
pub struct Reader {
    streams: [Stream; 2],
    from: u64,
}

impl Reader {
    /// A reader starting at seq `from`.
    pub fn new(from: u64) -> Reader {
        let stream = |class| Stream {
            class,
            blocks: VecDeque::new(),
            pos: 0,
            index: 0,
            head: None,
            next: from,
        };
        Reader {
            streams: CLASSES.map(stream),
            from,
        }
    }

    /// Visits up to `max` further events in seq order with their location, block and the span
    /// of their JSON in it; returns how many. Events committed after an earlier call are found
    /// too (they have higher seqs than anything read before).
    pub fn read_with(
        &mut self,
        store: &Store,
        max: usize,
        mut f: impl FnMut(EventRef, &sled::IVec, (usize, usize)),
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        // A class with no event after loading has nothing more stored right now.
        let mut dry = [false; 2];
        while n < max {
            for (s, dry) in self.streams.iter_mut().zip(dry.iter_mut()) {
                if s.head(self.from).is_none() && !*dry {
                    s.next = store.load_blocks(s.class, s.next, max - n, &mut s.blocks)?;
                    *dry = s.head(self.from).is_none();
                }
            }
            let pick = match (self.streams[0].head, self.streams[1].head) {
                (Some(a), Some(b)) => usize::from(b.seq < a.seq),
                (Some(_), None) => 0,
                (None, Some(_)) => 1,
                (None, None) => break,
            };
            let s = &mut self.streams[pick];
            let (Some(h), Some(b)) = (s.head.take(), s.blocks.front()) else {
                break;
            };
            let at = EventRef {
                seq: h.seq,
                class: s.class,
                block: b.block,
                index: h.index,
                block_len: b.count,
                block_bytes: b.bytes,
            };
            f(at, &b.value, h.span);
            n += 1;
        }
        Ok(n)
    }

    /// Up to `max` further events in seq order.
    pub fn read(&mut self, store: &Store, max: usize) -> Result<Vec<Stored>, StoreError> {
        let mut out = Vec::new();
        self.read_with(store, max, |at, block, span| {
            out.push(Stored {
                at,
                block: block.clone(),
                span,
            });
        })?;
        Ok(out)
    }
}
