//! The durable queue of events and the devices' last snapshots. The only module that knows sled.
//!
//! One sled tree holds everything, so that one `Batch` commits events, snapshots and counters
//! atomically; `flush()` is the durability point. Events are stored in blocks (one per commit
//! and class, at most 1000 events): reading and deleting a backlog costs one sled operation per
//! block, not per event.
//!
//! Keys: `k`+first seq (block of kept events), `t`+first seq (block of telemetry, shed first),
//! `s`+device (snapshot), `m`+name (meta: next seq, byte and event counts), `c`+id and `v`+name
//! (small records: command outcomes, config versions).

mod reader;
mod writer;

pub use reader::Reader;
pub use writer::{Derived, Writer, WriterHandle};

use crate::event::{Body, Class, Event};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use tokio::sync::Notify;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled reported an error (disk full, I/O error, corruption).
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    /// The state directory could not be prepared.
    #[error("store directory {path}: {source}")]
    Dir {
        /// The directory.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// Where a stored event lives: its seq, class and the block that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventRef {
    /// Sequence number.
    pub seq: u64,
    /// Storage class.
    pub class: Class,
    /// First seq of the block (its key).
    pub block: u64,
    /// Position of the event in its block.
    pub index: u32,
    /// Events in the block.
    pub block_len: u32,
    /// Bytes of the block's key and value.
    pub block_bytes: u32,
}

/// Consecutive events of one block (positions `first..first + len`): what one publish
/// acknowledges, without a record per event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Storage class.
    pub class: Class,
    /// First seq of the block (its key).
    pub block: u64,
    /// Position of the first event in the block.
    pub first: u32,
    /// Events in the run.
    pub len: u32,
    /// Events in the block.
    pub block_len: u32,
    /// Bytes of the block's key and value.
    pub block_bytes: u32,
}

/// The runs of `events` (in any order; events of a block in increasing position stay one run).
pub fn runs<'a>(events: impl IntoIterator<Item = &'a EventRef>) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for e in events {
        push_run(&mut out, e);
    }
    out
}

/// Adds `e` to `runs`, extending a run of its block when it continues one.
pub fn push_run(runs: &mut Vec<Run>, e: &EventRef) {
    // A publish interleaves few blocks (one per class): look at the last runs only.
    let open = runs
        .iter_mut()
        .rev()
        .take(4)
        .find(|r| r.class == e.class && r.block == e.block && r.first + r.len == e.index);
    match open {
        Some(r) => r.len += 1,
        None => runs.push(Run {
            class: e.class,
            block: e.block,
            first: e.index,
            len: 1,
            block_len: e.block_len,
            block_bytes: e.block_bytes,
        }),
    }
}

/// An event as stored: where it is and its wire JSON (shared with its block, not copied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Location and identity.
    pub at: EventRef,
    block: sled::IVec,
    span: (usize, usize),
}

impl Stored {
    /// Sequence number.
    pub fn seq(&self) -> u64 {
        self.at.seq
    }

    /// Wire JSON of the event.
    pub fn json(&self) -> &[u8] {
        &self.block[self.span.0..self.span.1]
    }
}

/// Acknowledged positions of a partly acknowledged block.
#[derive(Debug, Default)]
struct Acked {
    bits: Vec<u64>,
    count: u32,
}

impl Acked {
    fn contains(&self, i: u32) -> bool {
        self.bits
            .get(i as usize / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    /// Marks positions `first..first + len`; returns how many were not marked before.
    fn insert_run(&mut self, first: u32, len: u32) -> u32 {
        let end = first + len;
        let words = (end as usize).div_ceil(64);
        if self.bits.len() < words {
            self.bits.resize(words, 0);
        }
        let mut newly = 0;
        let mut i = first;
        while i < end {
            let w = i as usize / 64;
            let lo = i % 64;
            let hi = (end - (i - lo)).min(64); // exclusive, within this word
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            newly += (mask & !self.bits[w]).count_ones();
            self.bits[w] |= mask;
            i += hi - lo;
        }
        self.count += newly;
        newly
    }
}

/// Counters of the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Events held and not yet acknowledged.
    pub events: u64,
    /// Telemetry events among them.
    pub telemetry: u64,
    /// Bytes of the blocks on disk (keys and values).
    pub bytes: u64,
    /// Next seq to assign.
    pub next_seq: u64,
    /// Oldest seq held.
    pub oldest_seq: Option<u64>,
    /// Events dropped because the store was full, since start.
    pub dropped: u64,
}

/// Counters persisted with every commit: they describe the blocks on disk.
#[derive(Debug, Default)]
struct Meta {
    next_seq: u64,
    bytes: u64,
    events: u64,
    telemetry: u64,
    dropped: u64,
    /// Blocks of which some events were acknowledged: the seqs acknowledged so far. In memory
    /// only: after a crash the whole block is sent again (the cloud deduplicates by seq).
    partial: HashMap<(Class, u64), Acked>,
    partial_events: u64,
    partial_telemetry: u64,
}

/// The durable store.
#[derive(Debug)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    max_bytes: u64,
    meta: Mutex<Meta>,
    committed: Notify,
}

const M_NEXT: &[u8] = b"mnext_seq";
const M_BYTES: &[u8] = b"mbytes";
const M_EVENTS: &[u8] = b"mevents";
const M_TELEMETRY: &[u8] = b"mtelemetry";
/// Events per block at most (a commit larger than this is split).
const BLOCK_EVENTS: usize = 1000;
/// Bytes per block at most (bounds the memory of one read).
const BLOCK_BYTES: usize = 256 << 10;

fn prefix(class: Class) -> u8 {
    match class {
        Class::Keep => b'k',
        Class::Telemetry => b't',
    }
}

fn key(class: Class, seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix(class);
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if k.len() == 9 {
        b.copy_from_slice(&k[1..]);
    }
    u64::from_be_bytes(b)
}

/// An event with its seq and wire JSON.
type Encoded = (u64, Vec<u8>);

/// Block layout: `count: u32`, `last_seq: u64`, then per event `seq: u64`, `len: u32`, JSON.
fn encode_block(events: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let size = 12 + events.iter().map(|(_, j)| 12 + j.len()).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(events.len() as u32).to_be_bytes());
    out.extend_from_slice(&events.last().map_or(0, |e| e.0).to_be_bytes());
    for (seq, json) in events {
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&(json.len() as u32).to_be_bytes());
        out.extend_from_slice(json);
    }
    out
}

/// (count, last seq) of a block.
fn block_header(v: &[u8]) -> (u32, u64) {
    if v.len() < 12 {
        return (0, 0);
    }
    let mut c = [0u8; 4];
    c.copy_from_slice(&v[..4]);
    let mut l = [0u8; 8];
    l.copy_from_slice(&v[4..12]);
    (u32::from_be_bytes(c), u64::from_be_bytes(l))
}

/// The events of a block as (seq, start, end) of their JSON; a truncated block yields what is
/// complete.
fn block_events(v: &[u8]) -> impl Iterator<Item = (u64, usize, usize)> + '_ {
    let mut pos = 12usize;
    std::iter::from_fn(move || {
        if pos + 12 > v.len() {
            return None;
        }
        let mut s = [0u8; 8];
        s.copy_from_slice(&v[pos..pos + 8]);
        let mut l = [0u8; 4];
        l.copy_from_slice(&v[pos + 8..pos + 12]);
        let len = u32::from_be_bytes(l) as usize;
        let start = pos + 12;
        if start + len > v.len() {
            return None;
        }
        pos = start + len;
        Some((u64::from_be_bytes(s), start, start + len))
    })
}

/// Appends the events of block `(k, v)` of `class` with seq >= `from` that are not
/// acknowledged yet to `out`, up to `max` in all.
fn push_events(
    class: Class,
    k: &[u8],
    v: &sled::IVec,
    from: u64,
    meta: &Meta,
    max: usize,
    out: &mut Vec<Stored>,
) {
    let block = seq_of(k);
    let (count, last) = block_header(v);
    if last < from {
        return;
    }
    let acked = meta.partial.get(&(class, block));
    for (index, (seq, start, end)) in block_events(v).enumerate() {
        let index = index as u32;
        if seq < from || acked.is_some_and(|a| a.contains(index)) {
            continue;
        }
        if out.len() >= max {
            break;
        }
        out.push(Stored {
            at: EventRef {
                seq,
                class,
                block,
                index,
                block_len: count,
                block_bytes: (k.len() + v.len()) as u32,
            },
            block: v.clone(),
            span: (start, end),
        });
    }
}

fn read_u64(tree: &sled::Tree, k: &[u8]) -> Result<u64, StoreError> {
    Ok(tree
        .get(k)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_be_bytes))
}

fn lock(m: &Mutex<Meta>) -> std::sync::MutexGuard<'_, Meta> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Events dropped by one commit: (count, first seq, last seq).
#[derive(Debug, Default)]
struct Dropped(Option<(u64, u64, u64)>);

impl Dropped {
    fn add(&mut self, n: u64, first: u64, last: u64) {
        self.0 = Some(match self.0 {
            None => (n, first, last),
            Some((c, a, b)) => (c + n, a.min(first), b.max(last)),
        });
    }
}

impl Store {
    /// Opens (or creates) the store in `dir` with a small page cache. Start-up reads a few
    /// counters only; it never scans the backlog.
    pub fn open(dir: &Path, cache_bytes: u64, max_bytes: u64) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        let db = sled::Config::new()
            .path(dir.join("store"))
            .cache_capacity(cache_bytes)
            .flush_every_ms(None)
            .mode(sled::Mode::LowSpace)
            .open()?;
        let tree = db.open_tree("floorgate")?;
        let meta = Meta {
            next_seq: read_u64(&tree, M_NEXT)?.max(1),
            bytes: read_u64(&tree, M_BYTES)?,
            events: read_u64(&tree, M_EVENTS)?,
            telemetry: read_u64(&tree, M_TELEMETRY)?,
            ..Meta::default()
        };
        Ok(Store {
            db,
            tree,
            max_bytes,
            meta: Mutex::new(meta),
            committed: Notify::new(),
        })
    }

    /// Waits until a commit added events.
    pub async fn committed(&self) {
        self.committed.notified().await;
    }

    /// Commits events and device snapshots atomically and durably. Returns the seqs assigned.
    /// When the store would exceed its bound, the oldest telemetry is dropped first, then the
    /// oldest other events, and a `gap` event reporting the drop is committed in the same batch.
    pub fn commit<E: std::borrow::Borrow<Event>>(
        &self,
        events: &[E],
        snapshots: &[(String, Vec<u8>)],
    ) -> Result<std::ops::Range<u64>, StoreError> {
        let mut meta = lock(&self.meta);
        let first = meta.next_seq;
        let mut seq = first;
        let mut by_class: [(Class, Vec<Encoded>); 2] =
            [(Class::Telemetry, Vec::new()), (Class::Keep, Vec::new())];
        for e in events {
            let e = e.borrow();
            let slot = usize::from(e.class() == Class::Keep);
            by_class[slot].1.push((seq, e.encode(seq)));
            seq += 1;
        }
        // New blocks, per class, oldest first.
        let mut blocks: Vec<(Class, [u8; 9], Vec<u8>, u32)> = Vec::new();
        for (class, list) in &by_class {
            let mut rest = list.as_slice();
            while !rest.is_empty() {
                let mut n = 0;
                let mut bytes = 12;
                while n < rest.len()
                    && n < BLOCK_EVENTS
                    && (n == 0 || bytes + 12 + rest[n].1.len() <= BLOCK_BYTES)
                {
                    bytes += 12 + rest[n].1.len();
                    n += 1;
                }
                let (chunk, tail) = rest.split_at(n);
                rest = tail;
                let k = key(*class, chunk[0].0);
                blocks.push((*class, k, encode_block(chunk), chunk.len() as u32));
            }
        }
        let size = |k: &[u8], v: &[u8]| (k.len() + v.len()) as u64;
        let mut bytes = meta.bytes + blocks.iter().map(|(_, k, v, _)| size(k, v)).sum::<u64>();
        let mut n_events = meta.events + events.len() as u64;
        let mut n_tel = meta.telemetry + by_class[0].1.len() as u64;
        let mut batch = sled::Batch::default();
        let mut dropped = Dropped::default();
        if bytes > self.max_bytes {
            // Shed to 90 % of the bound so that a full store does not drop on every commit.
            let target = self.max_bytes / 10 * 9;
            for class in [Class::Telemetry, Class::Keep] {
                for item in self.tree.scan_prefix([prefix(class)]) {
                    if bytes <= target {
                        break;
                    }
                    let (k, v) = item?;
                    let (count, last) = block_header(&v);
                    let first_seq = seq_of(&k);
                    bytes -= size(&k, &v);
                    let acked = meta.partial.remove(&(class, first_seq));
                    let already = acked.as_ref().map_or(0, |a| a.count as u64);
                    // Events of the block still unacknowledged are the ones lost.
                    let lost = count as u64 - already;
                    n_events -= count as u64;
                    meta.partial_events -= already;
                    if class == Class::Telemetry {
                        n_tel -= count as u64;
                        meta.partial_telemetry -= already;
                    }
                    if lost > 0 {
                        dropped.add(lost, first_seq, last);
                    }
                    batch.remove(k);
                }
                for b in blocks.iter_mut().filter(|b| b.0 == class) {
                    if bytes <= target {
                        break;
                    }
                    let (count, last) = block_header(&b.2);
                    bytes -= size(&b.1, &b.2);
                    n_events -= count as u64;
                    if class == Class::Telemetry {
                        n_tel -= count as u64;
                    }
                    dropped.add(count as u64, seq_of(&b.1), last);
                    b.3 = 0; // marks the block as dropped
                }
            }
            blocks.retain(|b| b.3 > 0);
        }
        if let Some((n, first_seq, last_seq)) = dropped.0 {
            meta.dropped += n;
            let e = Event::now(
                None,
                Body::Gap {
                    dropped: n,
                    first_seq,
                    last_seq,
                },
            );
            let k = key(Class::Keep, seq);
            let v = encode_block(&[(seq, e.encode(seq))]);
            bytes += size(&k, &v);
            n_events += 1;
            blocks.push((Class::Keep, k, v, 1));
            seq += 1;
            tracing::warn!(
                dropped = n,
                first_seq,
                last_seq,
                "store full: dropped oldest events"
            );
        }
        for (_, k, v, _) in &blocks {
            batch.insert(&k[..], v.as_slice());
        }
        for (device, snap) in snapshots {
            let mut k = Vec::with_capacity(device.len() + 1);
            k.push(b's');
            k.extend_from_slice(device.as_bytes());
            batch.insert(k, snap.as_slice());
        }
        batch.insert(M_NEXT, &seq.to_be_bytes());
        batch.insert(M_BYTES, &bytes.to_be_bytes());
        batch.insert(M_EVENTS, &n_events.to_be_bytes());
        batch.insert(M_TELEMETRY, &n_tel.to_be_bytes());
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        meta.next_seq = seq;
        meta.bytes = bytes;
        meta.events = n_events;
        meta.telemetry = n_tel;
        drop(meta);
        if seq > first {
            self.committed.notify_one();
        }
        Ok(first..seq)
    }

    /// Appends a `gap` event reporting events removed outside the bound (e.g. a purge).
    pub fn commit_gap(
        &self,
        dropped: u64,
        first_seq: u64,
        last_seq: u64,
    ) -> Result<(), StoreError> {
        let e = Event::now(
            None,
            Body::Gap {
                dropped,
                first_seq,
                last_seq,
            },
        );
        self.commit(&[e], &[]).map(|_| ())
    }

    /// The last committed snapshot of a device.
    pub fn snapshot(&self, device: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut k = vec![b's'];
        k.extend_from_slice(device.as_bytes());
        Ok(self.tree.get(k)?.map(|v| v.to_vec()))
    }

    /// Unacknowledged events of one class with seq >= `from`, in seq order, at most `max`.
    fn class_from(
        &self,
        class: Class,
        from: u64,
        max: usize,
        meta: &Meta,
        out: &mut Vec<Stored>,
    ) -> Result<(), StoreError> {
        for item in self
            .tree
            .range(self.first_block(class, from)?..key(class, u64::MAX))
        {
            if out.len() >= max {
                break;
            }
            let (k, v) = item?;
            push_events(class, &k, &v, from, meta, max, out);
        }
        Ok(())
    }

    /// Key of the first block that may hold `from` (a block may start before it).
    fn first_block(&self, class: Class, from: u64) -> Result<[u8; 9], StoreError> {
        let lo = key(class, from);
        if let Some(item) = self.tree.range(key(class, 0)..=lo).next_back() {
            let (k, v) = item?;
            if block_header(&v).1 >= from {
                let mut start = lo;
                start.copy_from_slice(&k);
                return Ok(start);
            }
        }
        Ok(lo)
    }

    /// Appends whole blocks of `class` holding events with seq >= `from` to `out`, until they
    /// hold at least `min` unacknowledged events. Returns the seq after the last block loaded
    /// (where the next call continues), or `from` when there was no block.
    fn load_blocks(
        &self,
        class: Class,
        from: u64,
        min: usize,
        out: &mut std::collections::VecDeque<reader::Loaded>,
    ) -> Result<u64, StoreError> {
        let meta = lock(&self.meta);
        let mut next = from;
        let mut added = 0usize;
        for item in self
            .tree
            .range(self.first_block(class, from)?..key(class, u64::MAX))
        {
            let (k, v) = item?;
            let (count, last) = block_header(&v);
            next = next.max(last + 1);
            if last < from {
                continue;
            }
            let block = seq_of(&k);
            let acked = meta.partial.get(&(class, block));
            added += (count - acked.map_or(0, |a| a.count.min(count))) as usize;
            out.push_back(reader::Loaded {
                block,
                count,
                bytes: (k.len() + v.len()) as u32,
                acked: acked.map(|a| a.bits.clone()),
                value: v,
            });
            if added >= min {
                break;
            }
        }
        Ok(next)
    }

    /// Up to `max` unacknowledged events with seq >= `from`, in seq order.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<Stored>, StoreError> {
        let meta = lock(&self.meta);
        let mut keep = Vec::new();
        let mut tel = Vec::new();
        self.class_from(Class::Keep, from, max, &meta, &mut keep)?;
        self.class_from(Class::Telemetry, from, max, &meta, &mut tel)?;
        drop(meta);
        if tel.is_empty() {
            return Ok(keep);
        }
        if keep.is_empty() {
            return Ok(tel);
        }
        let mut out = Vec::with_capacity(max.min(keep.len() + tel.len()));
        let (mut a, mut b) = (keep.into_iter().peekable(), tel.into_iter().peekable());
        while out.len() < max {
            let take_a = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) => x.at.seq < y.at.seq,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let next = if take_a { a.next() } else { b.next() };
            out.extend(next);
        }
        Ok(out)
    }

    /// Records PUBACKed events; a block is deleted once all its events are acknowledged.
    /// Events already dropped are skipped. Not flushed here: a crash before the next flush only
    /// causes a redelivery of the same seqs.
    pub fn ack(&self, events: &[EventRef]) -> Result<(), StoreError> {
        self.ack_runs(&runs(events))
    }

    /// [`Store::ack`] for runs of events.
    pub fn ack_runs(&self, runs: &[Run]) -> Result<(), StoreError> {
        let mut meta = lock(&self.meta);
        let mut batch = sled::Batch::default();
        let mut removed: Vec<(Class, u64)> = Vec::new();
        for r in runs {
            let id = (r.class, r.block);
            let k = key(r.class, r.block);
            if removed.contains(&id)
                || (!meta.partial.contains_key(&id) && !self.tree.contains_key(k)?)
            {
                continue; // dropped (store full), purged or completed meanwhile
            }
            let set = meta.partial.entry(id).or_default();
            let newly = set.insert_run(r.first, r.len.min(r.block_len - r.first.min(r.block_len)));
            let newly = u64::from(newly);
            let complete = set.count >= r.block_len;
            meta.partial_events += newly;
            if r.class == Class::Telemetry {
                meta.partial_telemetry += newly;
            }
            if complete {
                // The block exists: a drop would have removed its entry from `partial`.
                let set = meta.partial.remove(&id).unwrap_or_default();
                let n = u64::from(set.count);
                meta.bytes = meta.bytes.saturating_sub(u64::from(r.block_bytes));
                meta.events = meta.events.saturating_sub(n);
                meta.partial_events -= n;
                if r.class == Class::Telemetry {
                    meta.telemetry = meta.telemetry.saturating_sub(n);
                    meta.partial_telemetry -= n;
                }
                batch.remove(&k[..]);
                removed.push(id);
            }
        }
        if !removed.is_empty() {
            batch.insert(M_BYTES, &meta.bytes.to_be_bytes());
            batch.insert(M_EVENTS, &meta.events.to_be_bytes());
            batch.insert(M_TELEMETRY, &meta.telemetry.to_be_bytes());
            self.tree.apply_batch(batch)?;
        }
        Ok(())
    }

    /// Removes every stored event; returns (count, first seq, last seq) of what was removed.
    pub fn purge(&self) -> Result<Option<(u64, u64, u64)>, StoreError> {
        let all = self.read_from(0, usize::MAX)?;
        if all.is_empty() {
            return Ok(None);
        }
        let first = all.first().map_or(0, |s| s.at.seq);
        let last = all.last().map_or(0, |s| s.at.seq);
        let n = all.len() as u64;
        self.ack(&all.iter().map(|s| s.at).collect::<Vec<_>>())?;
        self.flush()?;
        Ok(Some((n, first, last)))
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        let meta = lock(&self.meta);
        let oldest = |class: Class| -> Option<u64> {
            let (k, v) = self.tree.scan_prefix([prefix(class)]).next()?.ok()?;
            let acked = meta.partial.get(&(class, seq_of(&k)));
            let first = block_events(&v)
                .enumerate()
                .find(|(i, _)| acked.is_none_or(|a| !a.contains(*i as u32)))
                .map(|(_, (s, _, _))| s);
            first
        };
        let oldest_seq = match (oldest(Class::Keep), oldest(Class::Telemetry)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Stats {
            events: meta.events - meta.partial_events,
            telemetry: meta.telemetry - meta.partial_telemetry,
            bytes: meta.bytes,
            next_seq: meta.next_seq,
            oldest_seq,
            dropped: meta.dropped,
        }
    }

    /// Reads a small record (command outcomes, config versions) by key.
    pub fn get_record(&self, space: u8, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut k = vec![space];
        k.extend_from_slice(name.as_bytes());
        Ok(self.tree.get(k)?.map(|v| v.to_vec()))
    }

    /// Writes a small record durably.
    pub fn put_record(&self, space: u8, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut k = vec![space];
        k.extend_from_slice(name.as_bytes());
        self.tree.insert(k, value)?;
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
