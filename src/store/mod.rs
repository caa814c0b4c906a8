//! The durable queue of events and the devices' last snapshots. The only module that knows sled.
//!
//! Events are stored in blocks (one per commit and class, at most 1000 events): reading and
//! deleting a backlog costs one sled operation per block, not per event.
//!
//! Two sled trees: `blocks` holds the event blocks, `floorgate` everything small. A commit
//! changes both in one sled transaction, so events, snapshots and counters are committed
//! atomically; `flush()` is the durability point. They are apart because sled rewrites a whole
//! leaf every few updates of it: a counter or marker that shared a leaf with event blocks made
//! every few commits rewrite up to 16 blocks (megabytes, written out as blob files).
//!
//! Keys in `blocks`: `k`+first seq (block of kept events), `t`+first seq (block of telemetry,
//! shed first). In `floorgate`: `a`+block key (marker record: the blocks it lists are wholly
//! acknowledged),
//! `s`+device (snapshot), `m`+name (meta: next seq, byte and event counts), `c`+id and `v`+name
//! (small records: command outcomes, config versions). Versions before the blocks tree kept the
//! blocks in `floorgate` too; opening moves them (see `migrate_blocks`).
//!
//! Acknowledging is cheap, deleting is not: sled rewrites the node that holds a block, and
//! with blocks of up to 256 KiB a node is large. So the blocks one acknowledgement completes
//! only get a small marker record that lists them (up to 64 blocks or 2 MiB); the blocks
//! themselves are deleted by [`Store::reclaim`], whole records at a time, which the uplink
//! calls once a backlog is drained (or when too many wait, or when the bound needs the room).
//! Readers skip marked blocks, a restart loads the markers (17 bytes per block), so nothing
//! acknowledged is sent again.
//!
//! Packing: a floor commits a few events every 50 ms, so an uplink outage leaves a backlog of
//! tiny blocks, and reading, acknowledging and deleting cost sled work per block. While no
//! reader has been handed a class's blocks (above `Meta::unread`), the small ones are merged
//! by the commit that overflows one into blocks of up to 64 KiB (`Store::pack`).
//!
//! Tombstones: removing a key can make sled merge the emptied leaf into its neighbour and
//! write the merged leaf out (a blob file when it holds large blocks); during a drain that cost
//! a fifth of the rate. So while more than 10,000 events wait unacknowledged, a deleted block
//! leaves an empty value under its key. Every read skips it (and lists it, after a restart),
//! no counter includes it, and the shedding of a full store removes it. The first reclaim with
//! at most 10,000 events unacknowledged, or with 4096 tombstones listed, starts sweeping them:
//! each reclaim removes up to 256 listed keys with its batch, the oldest first; the leaves
//! behind the drain then hold only tombstones and merge cheaply (the one at the drain's
//! frontier may still be rewritten once).
//!
//! A disk that does not take writes. sled 0.34 does not survive an I/O error: after a write
//! failed, either every later write returns the same error, also once the disk has room again,
//! or the next flush (also the one in sled's `Drop`) waits forever. So:
//! - Before writing, the store checks the free space of its filesystem; below `min_free` it
//!   writes nothing (sled never sees a full disk). The group the writer wanted to commit is
//!   *held* in memory, and committed by [`Store::recover`] once there is room again.
//! - When sled itself fails a write (the disk filled faster than checked, read-only, I/O
//!   errors), the store is *failed*: the group is held, sled is never written, flushed or
//!   dropped again, and [`Unwritable::restart`] turns true once the directory takes writes
//!   again; the daemon then exits non-zero so that systemd restarts it. A restart opens what
//!   was committed; pollers derive what was held again from the committed snapshots.
//!
//! While a group is held, readers see only committed events (below the committed next seq)
//! and [`Store::snapshot`] answers from the held group, which is what pollers continue from.
//! Acknowledgements that cannot be written stay in memory and are written later.

mod reader;
mod writer;

pub use reader::Reader;
pub use writer::{Derived, Writer, WriterHandle};

use crate::event::{Body, Class, Event};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::io::Write as _;
use std::mem::ManuallyDrop;
use std::ops::Range;
use std::path::{Path, PathBuf};
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
    /// Less free space than `store.min_free`: nothing is written.
    #[error("disk full: {free_kib} KiB free in {path}, the store keeps {min_free_kib} KiB free (store.min_free)")]
    DiskFull {
        /// The state directory.
        path: String,
        /// Free KiB.
        free_kib: u64,
        /// `store.min_free` in KiB.
        min_free_kib: u64,
    },
    /// A group is held in memory and goes first (see [`Store::recover`]).
    #[error("store not writable ({0}); events are held in memory")]
    Held(String),
    /// sled failed a write (the error): no more writes until the daemon restarts.
    #[error("{0}; sled takes writes again only after a restart")]
    Failed(String),
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

/// Acknowledged positions of a block not yet deleted (partly acknowledged, or wholly
/// acknowledged while the disk did not take the delete).
#[derive(Debug)]
struct Acked {
    bits: Vec<u64>,
    count: u32,
    /// Events in the block.
    len: u32,
    /// Bytes of the block's key and value.
    bytes: u32,
    /// Once wholly acknowledged: the key of the marker record that lists the block.
    marker: MarkerKey,
}

impl Acked {
    fn new(len: u32, bytes: u32) -> Acked {
        Acked {
            bits: Vec::new(),
            count: 0,
            len,
            bytes,
            marker: [0; 10],
        }
    }
    /// Wholly acknowledged: once a block is, its bits are freed.
    fn complete(&self) -> bool {
        self.count >= self.len
    }
    /// A wholly acknowledged block, as loaded from the marker record `marker`.
    fn sealed(len: u32, bytes: u32, marker: MarkerKey) -> Acked {
        Acked {
            bits: Vec::new(),
            count: len,
            len,
            bytes,
            marker,
        }
    }
    fn contains(&self, i: u32) -> bool {
        self.complete()
            || self
                .bits
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
    /// Tombstones of blocks deleted while a backlog drained, known and not swept yet.
    pub tombstones: u64,
}

/// Counters persisted with every commit: they describe the blocks on disk.
#[derive(Debug, Default)]
struct Meta {
    /// Next seq to assign: every seq below it is committed (durable) or was dropped.
    next_seq: u64,
    bytes: u64,
    events: u64,
    telemetry: u64,
    dropped: u64,
    /// Blocks of which some events were acknowledged: the seqs acknowledged so far. In memory
    /// only while partly acknowledged: after a crash such a block is sent again (the cloud
    /// deduplicates by seq). Wholly acknowledged blocks stay here until they are deleted.
    partial: HashMap<(Class, u64), Acked>,
    /// Wholly acknowledged blocks not deleted yet, in the order they completed (each is listed
    /// in a marker record); [`Store::reclaim`] deletes them.
    complete: VecDeque<(Class, u64)>,
    /// Bytes of the blocks in `complete`.
    complete_bytes: u64,
    /// Marker records and how many of the blocks they list are still stored.
    markers: HashMap<MarkerKey, u32>,
    /// Per class ([`class_index`]): every block starting below this seq is wholly acknowledged
    /// or gone. Advanced lazily by [`Store::front`], so that reads skip the acknowledged front.
    front: [u64; 2],
    /// Per class: no reader has been handed a block starting at or above this seq, so
    /// [`Store::pack`] may merge such blocks.
    unread: [u64; 2],
    /// Per class: small unread blocks committed since the last pack.
    loose: [Loose; 2],
    partial_events: u64,
    partial_telemetry: u64,
    /// Keys of the tombstones known (left by this process, or met by a read since the start):
    /// what the next sweep removes.
    tombs: BTreeSet<[u8; 9]>,
    /// The group of a commit that could not be written.
    held: Option<Held>,
    /// sled failed a write: the error. sled is not written, flushed or dropped any more.
    failed: Option<String>,
    /// Failed, and the directory takes writes again: time to restart.
    restart: bool,
}

/// Small blocks of one class, committed one after the other and not read yet: what the next
/// pack merges.
#[derive(Debug, Default, Clone, Copy)]
struct Loose {
    /// First seq of the first of them.
    from: u64,
    /// First seq of the last of them.
    last: u64,
    blocks: u64,
    /// Bytes one block holding them all would have (header and entries).
    bytes: u64,
    events: u64,
}

/// A group whose commit could not be written, kept in memory.
#[derive(Debug)]
struct Held {
    events: Vec<Event>,
    snapshots: Vec<(String, Vec<u8>)>,
    since_ms: u64,
    error: String,
}

/// The store does not take writes: what `status`, metrics and the health message report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unwritable {
    /// Unix ms of the first commit that could not be written.
    pub since_ms: u64,
    /// Why, the last time it was tried.
    pub error: String,
    /// Events derived and held in memory, not committed.
    pub held_events: u64,
    /// sled failed a write: the store takes writes again only after a restart.
    pub failed: bool,
    /// Failed, and the directory takes writes again: the daemon restarts now.
    pub restart: bool,
}

/// What [`Store::recover`] committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Events of the held group, now committed.
    pub events: u64,
    /// How long the store did not take writes.
    pub unwritable_ms: u64,
}

/// The open database and its two trees.
#[derive(Debug)]
struct Sled {
    db: sled::Db,
    /// Everything small: counters, markers, snapshots, records.
    records: sled::Tree,
    /// The event blocks.
    blocks: sled::Tree,
    /// The state directory, to sync its file system (see [`Sled::flush`]).
    fs: std::fs::File,
}

/// Changes to both trees, applied together by [`Sled::apply`].
#[derive(Debug, Default)]
struct Change {
    records: sled::Batch,
    blocks: sled::Batch,
    /// Keys of the blocks [`delete_marked`] deleted: the caller removes them or leaves
    /// tombstones (see [`tomb`]).
    deleted: Vec<[u8; 9]>,
}

impl Change {
    /// Sets the persisted counters: bytes, events and telemetry events stored.
    fn counters(&mut self, bytes: u64, events: u64, telemetry: u64) {
        self.records.insert(M_BYTES, &bytes.to_be_bytes());
        self.records.insert(M_EVENTS, &events.to_be_bytes());
        self.records.insert(M_TELEMETRY, &telemetry.to_be_bytes());
    }
}

impl Sled {
    /// Makes everything written so far durable. sled 0.34's `flush` is not enough on its own:
    /// on Linux it writes its log with `sync_file_range`, which leaves the file's size and
    /// block mapping (and the directory entries of files it creates) in the file system's
    /// journal, and it does not sync the blob files it writes for large leaves at all. After
    /// an ext4 error (the same as a power cut for this), a store created a second before was
    /// gone entirely. So the state directory's file system is synced as well (`syncfs`).
    fn flush(&self) -> Result<(), sled::Error> {
        self.db.flush()?;
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: syncfs only takes a file descriptor this struct owns.
            if unsafe { libc::syncfs(self.fs.as_raw_fd()) } != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        #[cfg(not(target_os = "linux"))]
        self.fs.sync_all()?;
        Ok(())
    }

    /// Applies `change` atomically: one sled transaction over both trees, which sled logs and
    /// recovers like one batch.
    fn apply(&self, change: &Change) -> Result<(), StoreError> {
        debug_assert!(
            change.deleted.is_empty(),
            "the caller removes or tombstones the deleted blocks first"
        );
        use sled::transaction::TransactionError;
        use sled::Transactional as _;
        (&self.records, &self.blocks)
            .transaction(|(records, blocks)| {
                records.apply_batch(&change.records)?;
                blocks.apply_batch(&change.blocks)?;
                Ok::<(), sled::transaction::ConflictableTransactionError<std::convert::Infallible>>(
                    (),
                )
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => StoreError::Sled(e),
                TransactionError::Abort(never) => match never {},
            })
    }
}

/// The durable store.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    /// Never dropped once sled failed a write (its drop may wait forever).
    sled: ManuallyDrop<Sled>,
    max_bytes: u64,
    min_free: u64,
    /// Size of a packed block: [`PACK_BYTES`], at most 1/32 of `max_bytes` (smaller in tests).
    pack_bytes: usize,
    /// Unacknowledged events above which deleted blocks leave tombstones, and tombstones kept
    /// at most ([`TOMBSTONE_BACKLOG`], [`TOMBSTONES_MAX`]; smaller in tests).
    tomb_backlog: u64,
    tombs_max: usize,
    meta: Mutex<Meta>,
    committed: Notify,
}

impl Drop for Store {
    fn drop(&mut self) {
        if lock(&self.meta).failed.is_none() {
            // SAFETY: dropped once, here, and not used afterwards.
            unsafe { ManuallyDrop::drop(&mut self.sled) }
        }
    }
}

const M_NEXT: &[u8] = b"mnext_seq";
const M_BYTES: &[u8] = b"mbytes";
const M_EVENTS: &[u8] = b"mevents";
const M_TELEMETRY: &[u8] = b"mtelemetry";
/// Prefix of the markers of wholly acknowledged blocks.
const A_PREFIX: u8 = b'a';
/// Events per block at most (a commit larger than this is split).
const BLOCK_EVENTS: usize = 1000;
/// Bytes per block at most (bounds the memory of one read).
const BLOCK_BYTES: usize = 256 << 10;
/// Unread small blocks are merged into blocks of up to this many bytes (see [`Store::pack`]).
const PACK_BYTES: usize = 64 << 10;
/// While more events than this wait unacknowledged (a backlog drains), a deleted block leaves
/// a tombstone (see [`Store::reclaim`]).
const TOMBSTONE_BACKLOG: u64 = 10_000;
/// Tombstones at most; beyond, the next reclaim sweeps them (removes their keys).
const TOMBSTONES_MAX: usize = 4096;
/// Tombstones swept per reclaim at most. Removing keys makes sled merge the emptied leaves
/// and write them out; sweeping a whole drain's tombstones in one batch took about 7 MiB for
/// 10 ms at the end of a 1 M drain, the process's peak.
const SWEEP_CHUNK: usize = 256;
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

/// The key of the marker record that lists the blocks one acknowledgement completed, the first
/// of them `(class, block)`: `a` + that block's key. Its value lists each block with its event
/// count and bytes, what the accounting needs when it is deleted (see [`marker_entries`]).
fn marker(class: Class, block: u64) -> MarkerKey {
    let mut k = [0u8; 10];
    k[0] = A_PREFIX;
    k[1..].copy_from_slice(&key(class, block));
    k
}

/// Key of a marker record: `a` + the key of the first block it lists.
type MarkerKey = [u8; 10];

/// Bytes per block listed in a marker record: class prefix, block (first seq), events, bytes.
const MARKER_ENTRY: usize = 17;
/// Blocks a marker record lists at most: its blocks are deleted in one transaction, which holds
/// them in memory meanwhile (sled reads what a transaction removes) and the store lock.
const MARKER_RECORD_BLOCKS: usize = 64;
/// Bytes of blocks a marker record lists at most (a record holds one block beyond it at most).
const MARKER_RECORD_BYTES: u64 = 2 << 20;

/// Appends the entry of the wholly acknowledged block `(class, block)` to a marker record.
fn marker_entry(out: &mut Vec<u8>, class: Class, block: u64, a: &Acked) {
    out.push(prefix(class));
    out.extend_from_slice(&block.to_be_bytes());
    out.extend_from_slice(&a.len.to_be_bytes());
    out.extend_from_slice(&a.bytes.to_be_bytes());
}

/// The blocks a marker record lists: (class, block, events, bytes). A record of 8 bytes (as
/// versions before grouped records wrote them) lists the one block its key names.
fn marker_entries(k: &[u8], v: &[u8]) -> Vec<(Class, u64, u32, u32)> {
    let class_of = |p: Option<&u8>| match p {
        Some(b'k') => Some(Class::Keep),
        Some(b't') => Some(Class::Telemetry),
        _ => None,
    };
    let u32_at = |b: &[u8], i: usize| {
        b.get(i..i + 4)
            .and_then(|x| x.try_into().ok())
            .map(u32::from_be_bytes)
    };
    if v.len() == 8 {
        let (Some(class), Some(len), Some(bytes)) =
            (class_of(k.get(1)), u32_at(v, 0), u32_at(v, 4))
        else {
            return Vec::new();
        };
        return vec![(class, seq_of(k.get(1..).unwrap_or_default()), len, bytes)];
    }
    v.chunks_exact(MARKER_ENTRY)
        .filter_map(|e| {
            let class = class_of(e.first())?;
            let block = u64::from_be_bytes(e[1..9].try_into().ok()?);
            Some((class, block, u32_at(e, 9)?, u32_at(e, 13)?))
        })
        .collect()
}

/// Takes the wholly acknowledged block `a` out of its marker record: the record is deleted with
/// the last block it lists. `gone` counts what this change takes out of each record; it is
/// applied to `meta.markers` once the change is written ([`forget_listed`]).
fn unlist(meta: &Meta, a: &Acked, change: &mut Change, gone: &mut HashMap<MarkerKey, u32>) {
    let n = gone.entry(a.marker).or_insert(0);
    *n += 1;
    if meta
        .markers
        .get(&a.marker)
        .is_none_or(|listed| *listed <= *n)
    {
        change.records.remove(&a.marker[..]);
    }
}

/// Applies what a written change took out of marker records.
fn forget_listed(meta: &mut Meta, gone: HashMap<MarkerKey, u32>) {
    for (k, n) in gone {
        if let Some(listed) = meta.markers.get_mut(&k) {
            *listed = listed.saturating_sub(n);
            if *listed == 0 {
                meta.markers.remove(&k);
            }
        }
    }
}

/// Deletes the marked block `id`: lists its key in `change.deleted` (the caller removes it or
/// leaves a tombstone), adds the deletion of its marker record with the last block it lists to
/// `change`, and takes it out of the counters (bytes, events, telemetry);
/// returns its events, or `None` when it is gone from `partial` already (dropped by the bound).
/// A listed block that is gone (deleted by an older version, or a record half deleted) is only
/// unlisted: the counters no longer hold it.
fn delete_marked(
    blocks: &sled::Tree,
    meta: &Meta,
    id: &(Class, u64),
    change: &mut Change,
    gone: &mut HashMap<MarkerKey, u32>,
    (bytes, events, telemetry): (&mut u64, &mut u64, &mut u64),
) -> Result<Option<u64>, StoreError> {
    let Some(a) = meta.partial.get(id) else {
        return Ok(None);
    };
    let n = u64::from(a.count);
    unlist(meta, a, change, gone);
    if !live(blocks, id.0, id.1)? {
        return Ok(Some(n));
    }
    *bytes = bytes.saturating_sub(u64::from(a.bytes));
    *events = events.saturating_sub(n);
    if id.0 == Class::Telemetry {
        *telemetry = telemetry.saturating_sub(n);
    }
    change.deleted.push(key(id.0, id.1));
    Ok(Some(n))
}

/// Whether a stored value is a tombstone: an empty value where a block was deleted while a
/// backlog drained (see the module documentation). Removing a key can make sled merge its
/// leaf into the neighbour and write the result out, which with leaves of large blocks costs a
/// fifth of a drain's rate; a tombstone keeps the leaf's keys. Every read skips tombstones and
/// they are counted in no counter; [`Store::reclaim`] sweeps the listed ones.
fn tomb(v: &[u8]) -> bool {
    v.is_empty()
}

/// Whether the block `(class, seq)` is stored (not deleted, not a tombstone).
fn live(blocks: &sled::Tree, class: Class, seq: u64) -> Result<bool, StoreError> {
    Ok(blocks.get(key(class, seq))?.is_some_and(|v| !tomb(&v)))
}

/// Notes that blocks of `class` below seq `next` were handed to a reader: packing leaves them
/// alone from now on. A loose run handed whole is over (live traffic: nothing to pack). One
/// handed in part continues after the handed blocks (a status query that reads the oldest
/// event must not stop an outage's packing); its counts then overstate it, which only makes
/// the next pack come early, and the pack counts what is left exactly.
fn handed(meta: &mut Meta, class: Class, next: u64) {
    let i = class_index(class);
    if next > meta.unread[i] {
        meta.unread[i] = next;
        let loose = &mut meta.loose[i];
        if loose.blocks > 0 && loose.last < next {
            *loose = Loose::default();
        } else if loose.blocks > 0 && loose.from < next {
            loose.from = next;
        }
    }
}

fn class_index(class: Class) -> usize {
    match class {
        Class::Keep => 0,
        Class::Telemetry => 1,
    }
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

/// Whether a block holds events, its entries fill it exactly and agree with its header
/// (packing merges only such blocks: a truncated one would hide the events after it in the
/// merged block, an empty one would give it a last seq of 0).
fn intact(v: &[u8]) -> bool {
    let (count, last) = block_header(v);
    let (mut n, mut end, mut seq) = (0u32, 12usize, 0u64);
    for (s, _, e) in block_events(v) {
        n += 1;
        end = e;
        seq = s;
    }
    v.len() >= 12 && n > 0 && n == count && end == v.len() && seq == last
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

/// Blocks per transaction when [`migrate_blocks`] moves them.
const MIGRATE_CHUNK: usize = 64;

/// Moves the blocks that a version before the blocks tree kept among the records into the
/// blocks tree, a chunk per transaction (a block is in exactly one tree at any time), flushed
/// chunk by chunk, so that an open that is stopped half-way (a start-up timeout on slow flash)
/// keeps its progress; returns how many moved. Runs at every open, so blocks that such a
/// version wrote after a downgrade move too; with nothing to move it costs two lookups.
fn migrate_blocks(sled: &Sled, dir: &Path) -> Result<u64, StoreError> {
    let older = [Class::Keep, Class::Telemetry]
        .iter()
        .any(|c| sled.records.scan_prefix([prefix(*c)]).next().is_some());
    if !older {
        return Ok(0);
    }
    // sled does not survive a full disk (see the module documentation): without the default
    // free space the blocks stay where they are, unread, until an open with room moves them.
    if free_bytes(dir).is_ok_and(|free| free < DEFAULT_MIN_FREE) {
        tracing::warn!(dir = %dir.display(), "store: blocks of an older layout not moved yet, the disk is almost full");
        return Ok(0);
    }
    let mut moved = 0;
    for class in [Class::Keep, Class::Telemetry] {
        loop {
            let mut change = Change::default();
            let mut n = 0;
            for item in sled
                .records
                .scan_prefix([prefix(class)])
                .take(MIGRATE_CHUNK)
            {
                let (k, v) = item?;
                if k.len() == 9 {
                    change.records.remove(k.clone());
                    change.blocks.insert(k, v);
                    n += 1;
                }
            }
            if n == 0 {
                break;
            }
            sled.apply(&change)?;
            sled.flush()?;
            moved += n;
        }
    }
    if moved > 0 {
        tracing::info!(
            blocks = moved,
            "store: moved blocks of an older layout to the blocks tree"
        );
    }
    Ok(moved)
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

/// Free space kept on the store's filesystem unless configured (`store.min_free`).
pub const DEFAULT_MIN_FREE: u64 = 8 << 20;
/// Bytes written (and removed) to see whether a directory takes writes again.
const PROBE_BYTES: usize = 1 << 20;

/// Bytes available to this user on the filesystem of `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a zeroed plain C struct that statvfs(3) fills, and a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Writes, syncs and removes `PROBE_BYTES` in `dir`.
fn probe(dir: &Path) -> std::io::Result<()> {
    let path = dir.join(".write-probe");
    let written = std::fs::File::create(&path).and_then(|mut f| {
        f.write_all(&vec![0u8; PROBE_BYTES])?;
        f.sync_all()
    });
    let _ = std::fs::remove_file(&path);
    written
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
    /// counters only; it never scans the backlog. The store keeps [`DEFAULT_MIN_FREE`] free
    /// unless told otherwise ([`Store::with_min_free`]).
    pub fn open(dir: &Path, cache_bytes: u64, max_bytes: u64) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        // An I/O error opening the store names the directory (read-only, permissions).
        let in_dir = |e: sled::Error| match e {
            sled::Error::Io(source) => StoreError::Dir {
                path: dir.display().to_string(),
                source,
            },
            other => StoreError::Sled(other),
        };
        let db = sled::Config::new()
            .path(dir.join("store"))
            .cache_capacity(cache_bytes)
            .flush_every_ms(None)
            .mode(sled::Mode::LowSpace)
            .open()
            .map_err(in_dir)?;
        let tree = db.open_tree("floorgate")?;
        let sled = Sled {
            records: tree.clone(),
            blocks: db.open_tree("blocks")?,
            db,
            fs: std::fs::File::open(dir).map_err(|source| StoreError::Dir {
                path: dir.display().to_string(),
                source,
            })?,
        };
        migrate_blocks(&sled, dir)?;
        let mut meta = Meta {
            next_seq: read_u64(&tree, M_NEXT)?.max(1),
            bytes: read_u64(&tree, M_BYTES)?,
            events: read_u64(&tree, M_EVENTS)?,
            telemetry: read_u64(&tree, M_TELEMETRY)?,
            ..Meta::default()
        };
        // What a version before packing committed is not packed (it may have been read).
        meta.unread = [meta.next_seq; 2];
        // Wholly acknowledged blocks not deleted before the stop: a few bytes each.
        for item in tree.scan_prefix([A_PREFIX]) {
            let (k, v) = item?;
            let Ok(record) = MarkerKey::try_from(k.as_ref()) else {
                continue;
            };
            let mut listed = 0;
            for (class, block, len, bytes) in marker_entries(&k, &v) {
                let id = (class, block);
                if meta.partial.contains_key(&id) {
                    continue;
                }
                meta.partial_events += u64::from(len);
                if class == Class::Telemetry {
                    meta.partial_telemetry += u64::from(len);
                }
                meta.partial.insert(id, Acked::sealed(len, bytes, record));
                meta.complete.push_back(id);
                meta.complete_bytes += u64::from(bytes);
                listed += 1;
            }
            if listed > 0 {
                meta.markers.insert(record, listed);
            }
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            sled: ManuallyDrop::new(sled),
            max_bytes,
            min_free: DEFAULT_MIN_FREE,
            // A packed block stays a small share of the bound, so that the bound sheds in
            // small steps also when `max_bytes` is small.
            pack_bytes: PACK_BYTES.min(usize::try_from(max_bytes / 32).unwrap_or(PACK_BYTES)),
            tomb_backlog: TOMBSTONE_BACKLOG,
            tombs_max: TOMBSTONES_MAX,
            meta: Mutex::new(meta),
            committed: Notify::new(),
        })
    }

    /// Free space to keep on the store's filesystem; below it nothing is written. 0 turns the
    /// check off (then a full disk makes sled fail, which takes a restart).
    pub fn with_min_free(mut self, bytes: u64) -> Store {
        self.min_free = bytes;
        self
    }

    /// Packs into blocks of `bytes` instead of [`PACK_BYTES`], so that tests pack often.
    #[cfg(test)]
    fn with_pack_bytes(mut self, bytes: usize) -> Store {
        self.pack_bytes = bytes;
        self
    }

    /// Leaves tombstones while more than `events` wait unacknowledged, `max` at most, so that
    /// tests see them.
    #[cfg(test)]
    fn with_tombstones(mut self, events: u64, max: usize) -> Store {
        self.tomb_backlog = events;
        self.tombs_max = max;
        self
    }

    /// Waits until a commit added events.
    pub async fn committed(&self) {
        self.committed.notified().await;
    }

    /// Whether sled may be written now: not failed, and `min_free` is free.
    fn writable(&self, meta: &Meta) -> Result<(), StoreError> {
        if let Some(error) = &meta.failed {
            return Err(StoreError::Failed(error.clone()));
        }
        if self.min_free == 0 {
            return Ok(());
        }
        let path = || self.dir.display().to_string();
        let free = free_bytes(&self.dir).map_err(|source| StoreError::Dir {
            path: path(),
            source,
        })?;
        if free < self.min_free {
            return Err(StoreError::DiskFull {
                path: path(),
                free_kib: free >> 10,
                min_free_kib: self.min_free >> 10,
            });
        }
        Ok(())
    }

    /// Runs a sled write; an error fails the store for good (see the module documentation).
    fn write<R>(
        &self,
        meta: &mut Meta,
        f: impl FnOnce(&mut Meta) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.writable(meta)?;
        f(meta).inspect_err(|error| {
            if matches!(error, StoreError::Sled(_)) {
                meta.failed = Some(error.to_string());
            }
        })
    }

    /// Commits events and device snapshots atomically and durably. Returns the seqs assigned.
    /// When the store would exceed its bound, the oldest telemetry is dropped first, then the
    /// oldest other events, and a `gap` event reporting the drop is committed in the same batch.
    /// Refused while a group is held (see [`Store::commit_group`]).
    pub fn commit<E: std::borrow::Borrow<Event>>(
        &self,
        events: &[E],
        snapshots: &[(String, Vec<u8>)],
    ) -> Result<Range<u64>, StoreError> {
        let mut meta = lock(&self.meta);
        if let Some(h) = &meta.held {
            return Err(StoreError::Held(h.error.clone()));
        }
        let r = self.write(&mut meta, |m| self.commit_locked(m, events, snapshots))?;
        self.pack_loose(&mut meta);
        drop(meta);
        self.notify(&r);
        Ok(r)
    }

    /// The writer's commit of a group. When it cannot be written the group is held in memory:
    /// later commits are refused, [`Store::snapshot`] answers from the held group, and
    /// [`Store::recover`] commits it once the disk takes writes again.
    pub fn commit_group(
        &self,
        events: Vec<Event>,
        snapshots: Vec<(String, Vec<u8>)>,
    ) -> Result<Range<u64>, StoreError> {
        let mut meta = lock(&self.meta);
        if let Some(h) = &meta.held {
            return Err(StoreError::Held(h.error.clone()));
        }
        match self.write(&mut meta, |m| self.commit_locked(m, &events, &snapshots)) {
            Ok(r) => {
                self.pack_loose(&mut meta);
                drop(meta);
                self.notify(&r);
                Ok(r)
            }
            Err(error) => {
                meta.held = Some(Held {
                    events,
                    snapshots,
                    since_ms: crate::event::now_ms(),
                    error: error.to_string(),
                });
                Err(error)
            }
        }
    }

    /// Commits the held group, if any, when the disk has room again; the group stays held
    /// otherwise. A failed store is not written: once its directory takes writes again,
    /// [`Unwritable::restart`] turns true and this keeps returning the error.
    pub fn recover(&self) -> Result<Option<Recovered>, StoreError> {
        let mut meta = lock(&self.meta);
        let Some(mut held) = meta.held.take() else {
            return Ok(None);
        };
        if meta.failed.is_some() && !meta.restart {
            meta.restart = probe(&self.dir).is_ok();
        }
        match self.write(&mut meta, |m| {
            self.commit_locked(m, &held.events, &held.snapshots)
        }) {
            Ok(r) => {
                drop(meta);
                self.notify(&r);
                Ok(Some(Recovered {
                    events: held.events.len() as u64,
                    unwritable_ms: crate::event::now_ms().saturating_sub(held.since_ms),
                }))
            }
            Err(error) => {
                if let Some(failed) = &meta.failed {
                    held.error.clone_from(failed);
                } else {
                    held.error = error.to_string();
                }
                meta.held = Some(held);
                Err(error)
            }
        }
    }

    /// Set while a group is held (the store does not take writes).
    pub fn unwritable(&self) -> Option<Unwritable> {
        let meta = lock(&self.meta);
        meta.held.as_ref().map(|h| Unwritable {
            since_ms: h.since_ms,
            error: h.error.clone(),
            held_events: h.events.len() as u64,
            failed: meta.failed.is_some(),
            restart: meta.restart,
        })
    }

    fn notify(&self, committed: &Range<u64>) {
        if !committed.is_empty() {
            self.committed.notify_one();
        }
    }

    /// Commits under the meta lock; `meta` changes only when the commit is durable.
    fn commit_locked<E: std::borrow::Borrow<Event>>(
        &self,
        meta: &mut Meta,
        events: &[E],
        snapshots: &[(String, Vec<u8>)],
    ) -> Result<Range<u64>, StoreError> {
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
        let mut change = Change::default();
        let mut gone = HashMap::new();
        let mut dropped = Dropped::default();
        // Partly acknowledged blocks dropped here: (id, events already acknowledged).
        let mut forget: Vec<((Class, u64), u64)> = Vec::new();
        // Tombstones the shedding removed.
        let mut swept = Vec::new();
        if bytes > self.max_bytes {
            // Shed to 90 % of the bound so that a full store does not drop on every commit.
            let target = self.max_bytes / 10 * 9;
            // Wholly acknowledged blocks go first: deleting them loses nothing. Whole marker
            // records only, so that no record lists a block that is gone.
            let mut reclaimed = HashSet::new();
            let mut last: Option<MarkerKey> = None;
            for id in &meta.complete {
                let record = meta.partial.get(id).map(|a| a.marker);
                if bytes <= target && (last.is_none() || record != last) {
                    break;
                }
                last = record;
                let counts = (&mut bytes, &mut n_events, &mut n_tel);
                if let Some(n) =
                    delete_marked(&self.sled.blocks, meta, id, &mut change, &mut gone, counts)?
                {
                    forget.push((*id, n));
                    reclaimed.insert(*id);
                }
            }
            for k in std::mem::take(&mut change.deleted) {
                change.blocks.remove(&k[..]);
            }
            for class in [Class::Telemetry, Class::Keep] {
                for item in self.sled.blocks.scan_prefix([prefix(class)]) {
                    if bytes <= target {
                        break;
                    }
                    let (k, v) = item?;
                    if tomb(&v) {
                        swept.push(key(class, seq_of(&k)));
                        change.blocks.remove(k);
                        continue;
                    }
                    let (count, last) = block_header(&v);
                    let first_seq = seq_of(&k);
                    if reclaimed.contains(&(class, first_seq)) {
                        continue;
                    }
                    bytes -= size(&k, &v);
                    let partly = meta.partial.get(&(class, first_seq));
                    if let Some(a) = partly.filter(|a| a.complete()) {
                        unlist(meta, a, &mut change, &mut gone);
                    }
                    let acked = partly.map(|a| a.count as u64);
                    if let Some(n) = acked {
                        forget.push(((class, first_seq), n));
                    }
                    // Events of the block still unacknowledged are the ones lost.
                    let lost = count as u64 - acked.unwrap_or(0);
                    n_events -= count as u64;
                    if class == Class::Telemetry {
                        n_tel -= count as u64;
                    }
                    if lost > 0 {
                        dropped.add(lost, first_seq, last);
                    }
                    change.blocks.remove(k);
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
        }
        for (_, k, v, _) in &blocks {
            change.blocks.insert(&k[..], v.as_slice());
        }
        for (device, snap) in snapshots {
            let mut k = Vec::with_capacity(device.len() + 1);
            k.push(b's');
            k.extend_from_slice(device.as_bytes());
            change.records.insert(k, snap.as_slice());
        }
        change.records.insert(M_NEXT, &seq.to_be_bytes());
        change.counters(bytes, n_events, n_tel);
        self.sled.apply(&change)?;
        self.sled.flush()?;
        forget_listed(meta, gone);
        for k in swept {
            meta.tombs.remove(&k);
        }
        let forgot = !forget.is_empty();
        for ((class, block), already) in forget {
            meta.partial.remove(&(class, block));
            meta.partial_events -= already;
            if class == Class::Telemetry {
                meta.partial_telemetry -= already;
            }
        }
        if forgot {
            let Meta {
                complete, partial, ..
            } = meta;
            complete.retain(|id| partial.contains_key(id));
            meta.complete_bytes = meta
                .complete
                .iter()
                .filter_map(|id| meta.partial.get(id))
                .map(|a| u64::from(a.bytes))
                .sum();
        }
        if let Some((n, first_seq, last_seq)) = dropped.0 {
            meta.dropped += n;
            tracing::warn!(
                dropped = n,
                first_seq,
                last_seq,
                "store full: dropped oldest events"
            );
        }
        for (class, k, v, count) in &blocks {
            let i = class_index(*class);
            let first = seq_of(k);
            if first < meta.unread[i] {
                continue;
            }
            if v.len() > self.pack_bytes / 2 {
                // Large already; the small blocks before it stay as they are, so that a pack
                // reads only small blocks.
                meta.loose[i] = Loose::default();
                continue;
            }
            let loose = &mut meta.loose[i];
            if loose.blocks == 0 {
                loose.from = first;
                loose.bytes = 12;
            }
            loose.last = first;
            loose.blocks += 1;
            loose.bytes += (v.len() - 12) as u64;
            loose.events += u64::from(*count);
        }
        meta.next_seq = seq;
        meta.bytes = bytes;
        meta.events = n_events;
        meta.telemetry = n_tel;
        Ok(first..seq)
    }

    /// Packs the classes whose loose blocks overflow a packed block. Packing is an
    /// optimisation: when it cannot be written the blocks stay as they are.
    fn pack_loose(&self, meta: &mut Meta) {
        for class in [Class::Telemetry, Class::Keep] {
            let loose = meta.loose[class_index(class)];
            // Measured like a packed block: a run that would not overflow one waits.
            if loose.bytes <= self.pack_bytes as u64 && loose.events <= BLOCK_EVENTS as u64 {
                continue;
            }
            if let Err(error) = self.write(meta, |m| self.pack(m, class)) {
                tracing::debug!(%error, "small blocks not merged");
                meta.loose[class_index(class)] = Loose::default();
            }
        }
    }

    /// Merges consecutive unread blocks of `class`, from its loose blocks on, into blocks of up
    /// to [`PACK_BYTES`] and [`BLOCK_EVENTS`], in one transaction; what does not fill a block
    /// stays loose for the next pack.
    ///
    /// Why: a floor commits every 50 ms, a few events at a time, and while the uplink is down
    /// those commits pile up as tiny blocks. Reading, acknowledging and deleting cost sled
    /// work per block, so a backlog of tiny blocks drains many times slower than the same
    /// events in large blocks (measured: 0.19 M events/s with 5 events per block against 2.5 M
    /// with 500). Packing only touches blocks no reader has been handed (`meta.unread`), so no
    /// [`EventRef`] names a block that packing removes, and none of them has acknowledgements.
    /// Not flushed: the next commit's flush makes it durable, and a crash before it keeps the
    /// small blocks, which hold the same events.
    fn pack(&self, meta: &mut Meta, class: Class) -> Result<(), StoreError> {
        let i = class_index(class);
        let from = meta.loose[i].from.max(meta.unread[i]);
        meta.loose[i] = Loose::default();
        let end = key(class, meta.next_seq);
        let start = key(class, from);
        if start >= end {
            return Ok(());
        }
        let mut change = Change::default();
        let mut merged_blocks = 0usize;
        let mut bytes = meta.bytes;
        let mut group: Vec<(sled::IVec, sled::IVec)> = Vec::new();
        let mut group_bytes = 0usize;
        let mut group_events = 0u32;
        // Merges `group` (its events and size as one block already counted) into one block.
        let mut merge = |group: &mut Vec<(sled::IVec, sled::IVec)>,
                         count: u32,
                         size: usize,
                         bytes: &mut u64| {
            if group.len() > 1 {
                let last = group.last().map_or(0, |(_, v)| block_header(v).1);
                let mut merged = Vec::with_capacity(size);
                merged.extend_from_slice(&count.to_be_bytes());
                merged.extend_from_slice(&last.to_be_bytes());
                for (k, v) in group.iter() {
                    merged.extend_from_slice(&v[12..]);
                    *bytes -= (k.len() + v.len()) as u64;
                    change.blocks.remove(k.clone());
                }
                *bytes += (group[0].0.len() + merged.len()) as u64;
                change.blocks.insert(group[0].0.clone(), merged);
                merged_blocks += group.len();
            }
            group.clear();
        };
        for item in self.sled.blocks.range(start..end) {
            let (k, v) = item?;
            let (count, _) = block_header(&v);
            if !intact(&v) || meta.partial.contains_key(&(class, seq_of(&k))) {
                // Not expected above `unread`; left alone.
                merge(&mut group, group_events, group_bytes, &mut bytes);
                continue;
            }
            let fits = group_bytes + v.len() - 12 <= self.pack_bytes
                && group_events as usize + count as usize <= BLOCK_EVENTS;
            if !fits {
                merge(&mut group, group_events, group_bytes, &mut bytes);
            }
            if group.is_empty() {
                group_bytes = 12;
                group_events = 0;
            }
            group_bytes += v.len() - 12;
            group_events += count;
            group.push((k, v));
        }
        // The last group did not fill a block: it stays loose.
        if let Some((k, _)) = group.first() {
            meta.loose[i] = Loose {
                from: seq_of(k),
                last: group.last().map_or(0, |(k, _)| seq_of(k)),
                blocks: group.len() as u64,
                bytes: group_bytes as u64,
                events: u64::from(group_events),
            };
        }
        if merged_blocks == 0 {
            return Ok(());
        }
        change.counters(bytes, meta.events, meta.telemetry);
        self.sled.apply(&change)?;
        meta.bytes = bytes;
        crate::metrics::STORE_PACKED.add(merged_blocks as u64);
        Ok(())
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

    /// The last snapshot of a device: from the held group while one is held (pollers continue
    /// from it), else the last committed one.
    pub fn snapshot(&self, device: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let meta = lock(&self.meta);
        if let Some(h) = &meta.held {
            if let Some((_, snap)) = h.snapshots.iter().rev().find(|(d, _)| d == device) {
                return Ok(Some(snap.clone()));
            }
        }
        let mut k = vec![b's'];
        k.extend_from_slice(device.as_bytes());
        Ok(self.sled.records.get(k)?.map(|v| v.to_vec()))
    }

    /// Unacknowledged committed events of one class with seq >= `from`, in seq order, at most
    /// `max`.
    fn class_from(
        &self,
        class: Class,
        from: u64,
        max: usize,
        meta: &mut Meta,
        out: &mut Vec<Stored>,
    ) -> Result<(), StoreError> {
        let from = from.max(self.front(meta, class)?);
        let start = self.first_block(class, from)?;
        // A commit that failed may have left blocks in sled's memory: only committed seqs.
        let end = key(class, meta.next_seq);
        if start >= end {
            return Ok(());
        }
        for item in self.sled.blocks.range(start..end) {
            if out.len() >= max {
                break;
            }
            let (k, v) = item?;
            if tomb(&v) {
                meta.tombs.insert(key(class, seq_of(&k)));
                continue;
            }
            push_events(class, &k, &v, from, meta, max, out);
            handed(meta, class, block_header(&v).1 + 1);
        }
        Ok(())
    }

    /// The seq from which `class` may hold unacknowledged events: moves the class's front past
    /// the wholly acknowledged blocks at its start (each block is passed once).
    fn front(&self, meta: &mut Meta, class: Class) -> Result<u64, StoreError> {
        let i = class_index(class);
        let start = key(class, meta.front[i]);
        let end = key(class, meta.next_seq);
        if (meta.complete.is_empty() && meta.tombs.is_empty()) || start >= end {
            return Ok(meta.front[i]);
        }
        for item in self.sled.blocks.range(start..end) {
            let (k, v) = item?;
            if tomb(&v) {
                meta.tombs.insert(key(class, seq_of(&k)));
                meta.front[i] = meta.front[i].max(seq_of(&k) + 1);
                continue;
            }
            if !meta
                .partial
                .get(&(class, seq_of(&k)))
                .is_some_and(Acked::complete)
            {
                break;
            }
            meta.front[i] = meta.front[i].max(block_header(&v).1 + 1);
        }
        Ok(meta.front[i])
    }

    /// Key of the first block that may hold `from` (a block may start before it).
    fn first_block(&self, class: Class, from: u64) -> Result<[u8; 9], StoreError> {
        let lo = key(class, from);
        if let Some(item) = self.sled.blocks.range(key(class, 0)..=lo).next_back() {
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
        let mut meta = lock(&self.meta);
        let mut next = from;
        let from = from.max(self.front(&mut meta, class)?);
        let mut added = 0usize;
        let start = self.first_block(class, from)?;
        // A commit that failed may have left blocks in sled's memory: only committed seqs.
        let end = key(class, meta.next_seq);
        if start >= end {
            return Ok(next);
        }
        for item in self.sled.blocks.range(start..end) {
            let (k, v) = item?;
            if tomb(&v) {
                meta.tombs.insert(key(class, seq_of(&k)));
                continue;
            }
            let (count, last) = block_header(&v);
            next = next.max(last + 1);
            if last < from {
                continue;
            }
            let block = seq_of(&k);
            let acked = meta.partial.get(&(class, block));
            if acked.is_some_and(Acked::complete) {
                continue;
            }
            added += (count - acked.map_or(0, |a| a.count.min(count))) as usize;
            out.push_back(reader::Loaded {
                block,
                count,
                bytes: (k.len() + v.len()) as u32,
                acked: acked.map(|a| a.bits.clone()),
                value: v,
            });
            // Per block: an error further on must not leave a loaded block packable.
            handed(&mut meta, class, last + 1);
            if added >= min {
                break;
            }
        }
        handed(&mut meta, class, next);
        Ok(next)
    }

    /// Up to `max` unacknowledged events with seq >= `from`, in seq order.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<Stored>, StoreError> {
        let mut meta = lock(&self.meta);
        let mut keep = Vec::new();
        let mut tel = Vec::new();
        self.class_from(Class::Keep, from, max, &mut meta, &mut keep)?;
        self.class_from(Class::Telemetry, from, max, &mut meta, &mut tel)?;
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

    /// Records PUBACKed events and deletes the blocks they complete (see [`Store::ack_runs`]).
    pub fn ack(&self, events: &[EventRef]) -> Result<(), StoreError> {
        self.ack_runs(&runs(events))?;
        loop {
            match self.reclaim(usize::MAX) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                // Below `min_free`: the blocks stay marked and are deleted later.
                Err(StoreError::DiskFull { .. }) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Records PUBACKed runs of events. Events already dropped are skipped. A block whose
    /// events are all acknowledged gets a marker record and waits for [`Store::reclaim`].
    /// Not flushed here: a crash before the next flush only causes a redelivery of the same
    /// seqs, as does a marker the disk did not take.
    pub fn ack_runs(&self, runs: &[Run]) -> Result<(), StoreError> {
        let mut meta = lock(&self.meta);
        let mut sealed = Vec::new();
        for r in runs {
            let id = (r.class, r.block);
            if !meta.partial.contains_key(&id) && !live(&self.sled.blocks, r.class, r.block)? {
                continue; // dropped (store full) or purged meanwhile
            }
            let set = meta
                .partial
                .entry(id)
                .or_insert_with(|| Acked::new(r.block_len, r.block_bytes));
            if set.complete() {
                continue;
            }
            let newly = set.insert_run(r.first, r.len.min(r.block_len - r.first.min(r.block_len)));
            if set.complete() {
                set.bits = Vec::new();
                sealed.push(id);
            }
            let newly = u64::from(newly);
            meta.partial_events += newly;
            if r.class == Class::Telemetry {
                meta.partial_telemetry += newly;
            }
        }
        // One record lists the blocks this acknowledgement completed: one plain insert (not a
        // batch: sled writes out its log buffer for every batch) for many small blocks. A
        // record is deleted with all its blocks at once, so it lists a bounded amount.
        let mut rest = sealed.as_slice();
        while let Some(&(class, block)) = rest.first() {
            let record = marker(class, block);
            let mut v = Vec::new();
            let (mut n, mut listed, mut bytes) = (0, 0u32, 0u64);
            while let Some(id) = rest.get(n) {
                if n == MARKER_RECORD_BLOCKS || (n > 0 && bytes >= MARKER_RECORD_BYTES) {
                    break;
                }
                if let Some(a) = meta.partial.get_mut(id) {
                    a.marker = record;
                    bytes += u64::from(a.bytes);
                    marker_entry(&mut v, id.0, id.1, a);
                    listed += 1;
                }
                n += 1;
            }
            let result = self.write(&mut meta, |_| {
                self.sled.records.insert(&record[..], v)?;
                Ok(())
            });
            if let Err(error) = result {
                tracing::debug!(%error, "acknowledgement markers not written; a restart would send those blocks again");
            }
            meta.markers.insert(record, listed);
            meta.complete.extend(&rest[..n]);
            meta.complete_bytes += bytes;
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Wholly acknowledged blocks waiting to be deleted.
    pub fn reclaimable(&self) -> usize {
        lock(&self.meta).complete.len()
    }

    /// Work [`Store::reclaim`] has waiting: wholly acknowledged blocks to delete, plus the
    /// tombstones to sweep once no backlog drains (or too many are kept).
    pub fn reclaim_waiting(&self) -> usize {
        self.waiting(&lock(&self.meta))
    }

    fn waiting(&self, meta: &Meta) -> usize {
        let sweep = if self.sweeping(meta) {
            meta.tombs.len()
        } else {
            0
        };
        meta.complete.len() + sweep
    }

    /// Whether deleted blocks leave no tombstone and the known ones are swept: no backlog of
    /// more than [`TOMBSTONE_BACKLOG`] events waits, or [`TOMBSTONES_MAX`] are kept.
    fn sweeping(&self, meta: &Meta) -> bool {
        let backlog = meta.events.saturating_sub(meta.partial_events);
        backlog <= self.tomb_backlog || meta.tombs.len() >= self.tombs_max
    }

    /// Bytes of the wholly acknowledged blocks waiting to be deleted.
    pub fn reclaimable_bytes(&self) -> u64 {
        lock(&self.meta).complete_bytes
    }

    /// Deletes up to `max` wholly acknowledged blocks (the longest acknowledged first) with
    /// their markers, in one batch; returns how much work still waits
    /// ([`Store::reclaim_waiting`]). Not flushed: a crash before the next flush leaves them
    /// marked, and they are deleted after the restart. While more than 10,000 events wait
    /// unacknowledged the blocks leave tombstones (see the module documentation); otherwise up
    /// to 256 of the tombstones known are swept in the same batch (`SWEEP_CHUNK`).
    pub fn reclaim(&self, max: usize) -> Result<usize, StoreError> {
        let mut meta = lock(&self.meta);
        self.reclaim_locked(&mut meta, max)?;
        let waiting = self.waiting(&meta);
        drop(meta);
        // sled frees a leaf it replaced through crossbeam-epoch, which first collects up to 64
        // such frees in the replacing thread's own bag; a replaced leaf still holds the blocks
        // just deleted (up to a megabyte each). Handing the bag to the global collector now lets
        // them go within a few epochs instead of whenever the bag fills: peak RSS while a
        // restarted 1 M backlog drains measured 21–29 MiB (median 23.4, 14 runs) instead of
        // 23–31 (median 29.9, 5 runs).
        crossbeam_epoch::pin().flush();
        Ok(waiting)
    }

    fn reclaim_locked(&self, meta: &mut Meta, max: usize) -> Result<(), StoreError> {
        // Whole marker records only (the blocks of one record are next to each other in
        // `complete`), so that no record lists a block that is gone.
        let record = |i: usize| {
            meta.complete
                .get(i)
                .and_then(|id| meta.partial.get(id))
                .map(|a| a.marker)
        };
        let mut take = max.min(meta.complete.len());
        while take > 0 && take < meta.complete.len() && record(take) == record(take - 1) {
            take += 1;
        }
        // While a backlog drains, the deleted blocks leave tombstones; otherwise their keys go,
        // and so do the oldest tombstones known (see [`tomb`]).
        let tombstones = !self.sweeping(meta);
        if take == 0 && (tombstones || meta.tombs.is_empty()) {
            return Ok(());
        }
        let (mut bytes, mut n_events, mut n_tel) = (meta.bytes, meta.events, meta.telemetry);
        let mut change = Change::default();
        let mut gone = HashMap::new();
        for id in meta.complete.iter().take(take) {
            let counts = (&mut bytes, &mut n_events, &mut n_tel);
            delete_marked(&self.sled.blocks, meta, id, &mut change, &mut gone, counts)?;
        }
        let deleted = std::mem::take(&mut change.deleted);
        for k in &deleted {
            if tombstones {
                change.blocks.insert(&k[..], &[][..]);
            } else {
                change.blocks.remove(&k[..]);
            }
        }
        let swept: Vec<[u8; 9]> = if tombstones {
            Vec::new()
        } else {
            meta.tombs.iter().take(SWEEP_CHUNK).copied().collect()
        };
        for k in &swept {
            change.blocks.remove(&k[..]);
        }
        change.counters(bytes, n_events, n_tel);
        self.write(meta, |_| self.sled.apply(&change))?;
        forget_listed(meta, gone);
        if tombstones {
            meta.tombs.extend(deleted);
        } else {
            crate::metrics::STORE_TOMBSTONES_SWEPT.add(swept.len() as u64);
            for k in &swept {
                meta.tombs.remove(k);
            }
        }
        for id in meta.complete.drain(..take).collect::<Vec<_>>() {
            if let Some(a) = meta.partial.remove(&id) {
                meta.complete_bytes -= u64::from(a.bytes);
                let n = u64::from(a.count);
                meta.partial_events -= n;
                if id.0 == Class::Telemetry {
                    meta.partial_telemetry -= n;
                }
            }
        }
        meta.bytes = bytes;
        meta.events = n_events;
        meta.telemetry = n_tel;
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

    /// Makes everything written so far durable. Below `min_free` it writes nothing: what is
    /// not flushed then are acknowledgements, whose loss only means a redelivery.
    pub fn flush(&self) -> Result<(), StoreError> {
        let mut meta = lock(&self.meta);
        match self.write(&mut meta, |_| {
            self.sled.flush()?;
            Ok(())
        }) {
            Err(StoreError::DiskFull { .. }) => Ok(()),
            other => other,
        }
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        let mut meta = lock(&self.meta);
        let mut oldest = |class| self.oldest(&mut meta, class).ok().flatten();
        let oldest_seq = match (oldest(Class::Keep), oldest(Class::Telemetry)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Stats {
            // Saturating: markers left by an older version count until they are reclaimed.
            events: meta.events.saturating_sub(meta.partial_events),
            telemetry: meta.telemetry.saturating_sub(meta.partial_telemetry),
            bytes: meta.bytes,
            next_seq: meta.next_seq,
            oldest_seq,
            dropped: meta.dropped,
            tombstones: meta.tombs.len() as u64,
        }
    }

    /// The oldest unacknowledged seq of `class`.
    fn oldest(&self, meta: &mut Meta, class: Class) -> Result<Option<u64>, StoreError> {
        let from = self.front(meta, class)?;
        let start = self.first_block(class, from)?;
        let mut blocks = self.sled.blocks.range(start..key(class, meta.next_seq));
        let (k, v) = loop {
            match blocks.next().transpose()? {
                None => return Ok(None),
                // Gone: listed for the sweep, and the front moves past it (nothing live lies
                // between the front and a tombstone met first), so the next call skips it.
                Some((k, v)) if tomb(&v) => {
                    let seq = seq_of(&k);
                    meta.tombs.insert(key(class, seq));
                    let i = class_index(class);
                    meta.front[i] = meta.front[i].max(seq + 1);
                }
                Some(item) => break item,
            }
        };
        let acked = meta.partial.get(&(class, seq_of(&k)));
        let first = block_events(&v)
            .enumerate()
            .find(|(i, (seq, _, _))| *seq >= from && acked.is_none_or(|a| !a.contains(*i as u32)))
            .map(|(_, (seq, _, _))| seq);
        Ok(first)
    }

    /// Reads a small record (command outcomes, config versions) by key.
    pub fn get_record(&self, space: u8, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut k = vec![space];
        k.extend_from_slice(name.as_bytes());
        Ok(self.sled.records.get(k)?.map(|v| v.to_vec()))
    }

    /// Writes a small record durably.
    pub fn put_record(&self, space: u8, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut k = vec![space];
        k.extend_from_slice(name.as_bytes());
        let mut meta = lock(&self.meta);
        self.write(&mut meta, |_| {
            self.sled.records.insert(k, value)?;
            self.sled.flush()?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests;
