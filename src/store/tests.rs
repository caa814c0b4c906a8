//! Store behaviour: seq assignment, durability across reopen, the bound, acknowledgements.

use super::*;
use crate::device::codec::Value;
use std::collections::BTreeMap;

fn telemetry(i: u64) -> Event {
    let mut values = BTreeMap::new();
    values.insert("t".to_string(), Value::UInt(i));
    Event {
        ts: i,
        clock_synced: true,
        device: Some("d".into()),
        body: Body::Telemetry { values },
    }
}

fn counter(i: u64) -> Event {
    Event {
        ts: i,
        clock_synced: true,
        device: Some("d".into()),
        body: Body::Counter {
            point: "c".into(),
            delta: 1,
            total: i,
            reset: false,
        },
    }
}

#[test]
fn seqs_increase_and_are_never_reused_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = {
        let s = Store::open(dir.path(), 1 << 20, 1 << 30).expect("open");
        let r = s.commit(&[counter(1), counter(2)], &[]).expect("commit");
        assert_eq!(r, 1..3);
        let all = refs(&s.read_from(0, 10).expect("read"));
        s.ack(&all).expect("ack");
        r
    };
    let s = Store::open(dir.path(), 1 << 20, 1 << 30).expect("reopen");
    let r = s.commit(&[counter(3)], &[]).expect("commit");
    assert_eq!(
        r.start, first.end,
        "seq continues after reopen even when the store is empty"
    );
    assert_eq!(s.stats().events, 1);
}

#[test]
fn snapshot_is_committed_with_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = Store::open(dir.path(), 1 << 20, 1 << 30).expect("open");
        s.commit(&[counter(1)], &[("d".into(), b"snap-1".to_vec())])
            .expect("commit");
    }
    let s = Store::open(dir.path(), 1 << 20, 1 << 30).expect("reopen");
    assert_eq!(s.snapshot("d").expect("get"), Some(b"snap-1".to_vec()));
    assert_eq!(s.stats().events, 1);
}

#[test]
fn read_from_merges_classes_in_seq_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(dir.path(), 1 << 20, 1 << 30).expect("open");
    s.commit(&[telemetry(1), counter(2), telemetry(3), counter(4)], &[])
        .expect("commit");
    let seqs: Vec<u64> = s
        .read_from(0, 10)
        .expect("read")
        .iter()
        .map(|e| e.seq())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    let seqs: Vec<u64> = s
        .read_from(3, 10)
        .expect("read")
        .iter()
        .map(|e| e.seq())
        .collect();
    assert_eq!(seqs, vec![3, 4]);
    assert_eq!(s.read_from(0, 2).expect("read").len(), 2);
}

#[test]
fn full_store_drops_oldest_telemetry_first_and_reports_the_gap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(dir.path(), 1 << 20, 64 << 10).expect("open");
    let mut kept = 0;
    for round in 0..120u64 {
        let batch: Vec<Event> = (0..20)
            .map(|i| {
                if i == 0 {
                    counter(round)
                } else {
                    telemetry(round * 100 + i)
                }
            })
            .collect();
        kept += 1;
        s.commit(&batch, &[]).expect("commit");
    }
    let stats = s.stats();
    assert!(
        stats.bytes <= 64 << 10,
        "bound holds: {} bytes",
        stats.bytes
    );
    assert!(stats.dropped > 0, "something was dropped");
    let all = s.read_from(0, usize::MAX).expect("read");
    let counters = all
        .iter()
        .filter(|e| String::from_utf8_lossy(e.json()).contains("\"kind\":\"counter\""))
        .count();
    assert_eq!(
        counters, kept,
        "no counter event was dropped while telemetry was available"
    );
    let gaps: Vec<serde_json::Value> = all
        .iter()
        .filter_map(|e| serde_json::from_slice::<serde_json::Value>(e.json()).ok())
        .filter(|v| v["kind"] == "gap")
        .collect();
    let reported: u64 = gaps
        .iter()
        .map(|g| g["dropped"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        reported, stats.dropped,
        "every drop is reported by a gap event"
    );
    let held: std::collections::HashSet<u64> = all.iter().map(|e| e.seq()).collect();
    for g in &gaps {
        let (a, b) = (
            g["first_seq"].as_u64().unwrap_or(0),
            g["last_seq"].as_u64().unwrap_or(0),
        );
        assert!(a <= b);
        assert!(
            !held.contains(&a) && !held.contains(&b),
            "gap bounds name dropped events"
        );
    }
}

#[test]
fn ack_deletes_and_ignores_already_dropped_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(dir.path(), 1 << 20, 1 << 30).expect("open");
    s.commit(&[counter(1), telemetry(2)], &[]).expect("commit");
    let all = s.read_from(0, 10).expect("read");
    s.ack(&[all[0].at]).expect("ack");
    s.ack(&[all[0].at]).expect("ack twice");
    let st = s.stats();
    assert_eq!(st.events, 1);
    assert_eq!(st.telemetry, 1);
    let left = s.read_from(0, 10).expect("read");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].seq(), 2);
    s.ack(&[left[0].at]).expect("ack");
    assert_eq!(s.stats().bytes, 0);
}

#[test]
fn a_block_is_deleted_only_when_all_its_events_are_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = Store::open(dir.path(), 1 << 20, 1 << 30).expect("open");
        s.commit(&[counter(1), counter(2), counter(3)], &[])
            .expect("commit");
        let all = s.read_from(0, 10).expect("read");
        assert_eq!(all.len(), 3);
        s.ack(&[all[0].at, all[2].at]).expect("partial ack");
        let left: Vec<u64> = s
            .read_from(0, 10)
            .expect("read")
            .iter()
            .map(|e| e.seq())
            .collect();
        assert_eq!(left, vec![2], "acknowledged events are not read again");
        assert_eq!(s.stats().events, 1);
        s.flush().expect("flush");
    }
    // A crash forgets partial acknowledgements: the whole block is delivered again.
    let s = Store::open(dir.path(), 1 << 20, 1 << 30).expect("reopen");
    let again = s.read_from(0, 10).expect("read");
    assert_eq!(again.len(), 3);
    s.ack(&again.iter().map(|e| e.at).collect::<Vec<_>>())
        .expect("ack");
    assert_eq!(s.stats().events, 0);
    assert_eq!(s.stats().bytes, 0);
    assert!(s.read_from(0, 10).expect("read").is_empty());
}

#[test]
fn read_from_starts_inside_a_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(dir.path(), 1 << 20, 1 << 30).expect("open");
    let events: Vec<Event> = (0..2500)
        .map(|i| if i % 3 == 0 { telemetry(i) } else { counter(i) })
        .collect();
    s.commit(&events, &[]).expect("commit");
    let got: Vec<u64> = s
        .read_from(1234, 5)
        .expect("read")
        .iter()
        .map(|e| e.seq())
        .collect();
    assert_eq!(got, vec![1234, 1235, 1236, 1237, 1238]);
    let mut cursor = 0;
    let mut n = 0;
    loop {
        let b = s.read_from(cursor, 100).expect("read");
        let Some(l) = b.last() else { break };
        assert!(b.windows(2).all(|w| w[0].seq() < w[1].seq()));
        cursor = l.seq() + 1;
        n += b.len();
    }
    assert_eq!(n, 2500);
}

/// The events of one commit (true: telemetry), numbered on from `i`.
fn numbered(commit: &[bool], i: &mut u64) -> Vec<Event> {
    commit
        .iter()
        .map(|&t| {
            *i += 1;
            if t {
                telemetry(*i)
            } else {
                counter(*i)
            }
        })
        .collect()
}

/// A commit schedule: (events of a commit, telemetry or counter for each).
fn mixed(commits: &[Vec<bool>], s: &Store) {
    let mut i = 0;
    for c in commits {
        s.commit(&numbered(c, &mut i), &[]).expect("commit");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// The reader yields exactly the unacknowledged events in seq order, whatever the read sizes,
    /// also when events are committed and acknowledged between reads.
    #[test]
    fn reader_yields_every_unacked_event_once_in_seq_order(
        first in proptest::collection::vec(proptest::collection::vec(proptest::bool::ANY, 1..40), 1..12),
        later in proptest::collection::vec(proptest::collection::vec(proptest::bool::ANY, 1..40), 0..6),
        sizes in proptest::collection::vec(1usize..50, 1..20),
        ack_every in 1usize..5,
        reclaim_first in 0usize..4,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path(), 1 << 20, 1 << 30).expect("open");
        mixed(&first, &s);
        // Some events acknowledged before the reader starts (partial blocks).
        let pre: Vec<EventRef> = s.read_from(0, usize::MAX).expect("read").iter()
            .map(|e| e.at).step_by(ack_every + 1).collect();
        // Wholly acknowledged blocks wait for reclaim (some of them deleted already).
        s.ack_runs(&runs(&pre)).expect("ack");
        s.reclaim(reclaim_first).expect("reclaim");
        let expected_first: Vec<u64> = s.read_from(0, usize::MAX).expect("read").iter().map(Stored::seq).collect();
        let mut reader = Reader::new(0);
        let mut got = Vec::new();
        let mut sizes = sizes.iter().cycle();
        let mut added_later = false;
        loop {
            let n = *sizes.next().expect("cycle");
            let batch = reader.read(&s, n).expect("read");
            proptest::prop_assert!(batch.len() <= n);
            if batch.is_empty() {
                if added_later || later.is_empty() {
                    break;
                }
                mixed(&later, &s);
                added_later = true;
                continue;
            }
            got.extend(batch.iter().map(Stored::seq));
        }
        proptest::prop_assert!(got.windows(2).all(|w| w[0] < w[1]), "seq order: {:?}", got);
        proptest::prop_assert_eq!(&got[..expected_first.len()], &expected_first[..]);
        let all_now: Vec<u64> = s.read_from(0, usize::MAX).expect("read").iter().map(Stored::seq).collect();
        proptest::prop_assert_eq!(got, all_now);
    }

    /// Acknowledging runs is the same as acknowledging the events one by one: the same blocks
    /// go, the same counters remain.
    #[test]
    fn acking_runs_equals_acking_events(
        commits in proptest::collection::vec(proptest::collection::vec(proptest::bool::ANY, 1..150), 1..6),
        picks in proptest::collection::vec(proptest::bool::ANY, 1..400),
    ) {
        let (a, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
        let sa = Store::open(a.path(), 1 << 20, 1 << 30).expect("open");
        let sb = Store::open(b.path(), 1 << 20, 1 << 30).expect("open");
        mixed(&commits, &sa);
        mixed(&commits, &sb);
        let all: Vec<EventRef> = sa.read_from(0, usize::MAX).expect("read").iter().map(|e| e.at).collect();
        let chosen: Vec<EventRef> = all.iter().zip(picks.iter().cycle()).filter(|(_, p)| **p).map(|(e, _)| *e).collect();
        for chunk in chosen.chunks(7) {
            sa.ack_runs(&runs(chunk)).expect("ack runs");
            for e in chunk {
                sb.ack_runs(&[Run { class: e.class, block: e.block, first: e.index, len: 1, block_len: e.block_len, block_bytes: e.block_bytes }]).expect("ack one");
            }
        }
        // A redelivered PUBACK acknowledges nothing new.
        sa.ack_runs(&runs(&chosen[..chosen.len() / 2])).expect("ack again");
        proptest::prop_assert_eq!(sa.stats(), sb.stats());
        let left = |s: &Store| s.read_from(0, usize::MAX).expect("read").iter().map(Stored::seq).collect::<Vec<_>>();
        proptest::prop_assert_eq!(left(&sa), left(&sb));
        let model: Vec<u64> = all.iter().filter(|e| !chosen.contains(e)).map(|e| e.seq).collect();
        proptest::prop_assert_eq!(left(&sa), model);
        // Acknowledging everything empties both.
        sa.ack(&all).expect("ack all");
        proptest::prop_assert_eq!(sa.stats().events, 0);
        proptest::prop_assert_eq!(sa.stats().bytes, 0);
    }
}

/// Opens the store in `dir` again. sled's I/O threads let go of the directory lock a moment
/// after the previous instance was dropped.
fn reopen(dir: &std::path::Path) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match Store::open(dir, 1 << 20, 1 << 30) {
            Ok(s) => return s,
            Err(e) if std::time::Instant::now() > deadline => panic!("reopen: {e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

fn refs(events: &[Stored]) -> Vec<EventRef> {
    events.iter().map(|e| e.at).collect()
}

fn seqs(events: &[Stored]) -> Vec<u64> {
    events.iter().map(Stored::seq).collect()
}

#[test]
fn acknowledged_blocks_are_skipped_deleted_by_reclaim_and_not_sent_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (bytes_all, second) = {
        let s = Store::open(dir.path(), 1 << 20, 1 << 30).expect("open");
        s.commit(&[counter(1), counter(2), telemetry(3)], &[])
            .expect("commit");
        s.commit(&[counter(4), counter(5)], &[]).expect("commit");
        let bytes_all = s.stats().bytes;
        let all = s.read_from(0, 10).expect("read");
        // The first commit's blocks wholly, one event of the second.
        let acked: Vec<EventRef> = all.iter().take(4).map(|e| e.at).collect();
        s.ack_runs(&runs(&acked)).expect("ack");
        assert_eq!(s.reclaimable(), 2, "two blocks wholly acknowledged");
        let st = s.stats();
        assert_eq!(st.events, 1);
        assert_eq!(st.bytes, bytes_all, "nothing deleted yet");
        assert_eq!(st.oldest_seq, Some(5));
        let left: Vec<u64> = seqs(&s.read_from(0, 10).expect("read"));
        assert_eq!(left, vec![5]);
        let mut reader = Reader::new(0);
        let read: Vec<u64> = seqs(&reader.read(&s, 10).expect("read"));
        assert_eq!(read, vec![5]);
        s.flush().expect("flush");
        (bytes_all, all[3].at.block_bytes as u64)
    };
    // After a restart the marked blocks stay acknowledged; the partly acknowledged block is
    // sent again whole.
    let s = reopen(dir.path());
    assert_eq!(s.reclaimable(), 2);
    let st = s.stats();
    assert_eq!(st.events, 2);
    assert_eq!(st.oldest_seq, Some(4));
    assert_eq!(st.bytes, bytes_all);
    let left: Vec<u64> = seqs(&s.read_from(0, 10).expect("read"));
    assert_eq!(left, vec![4, 5]);
    assert_eq!(
        s.reclaim(1).expect("reclaim"),
        0,
        "one acknowledgement completed both blocks: they are deleted together"
    );
    let st = s.stats();
    assert_eq!(st.bytes, second, "only the unacknowledged block is left");
    assert_eq!(st.events, 2);
    s.flush().expect("flush");
    drop(s);
    let s = reopen(dir.path());
    assert_eq!(s.reclaimable(), 0, "markers are deleted with their blocks");
    assert_eq!(s.stats().bytes, second);
    assert_eq!(s.stats().events, 2);
}

#[test]
fn a_marker_an_older_version_left_without_its_block_is_dropped_without_touching_the_counters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let last_block_bytes = {
        let s = Store::open(dir.path(), 1 << 20, 1 << 30).expect("open");
        s.commit(&[counter(1), counter(2)], &[]).expect("commit");
        s.commit(&[counter(3)], &[]).expect("commit");
        let all = refs(&s.read_from(0, 10).expect("read"));
        s.ack_runs(&runs(&all[..2])).expect("ack");
        // What an older version does: delete the block and count it out, keep the marker.
        let mut change = Change::default();
        change.blocks.remove(&key(all[0].class, all[0].block)[..]);
        change.records.insert(M_EVENTS, &1u64.to_be_bytes());
        change
            .records
            .insert(M_BYTES, &u64::from(all[2].block_bytes).to_be_bytes());
        s.sled.apply(&change).expect("apply");
        s.flush().expect("flush");
        u64::from(all[2].block_bytes)
    };
    let s = reopen(dir.path());
    assert_eq!(s.reclaimable(), 1);
    assert_eq!(s.reclaim(usize::MAX).expect("reclaim"), 0);
    let st = s.stats();
    assert_eq!(st.events, 1);
    assert_eq!(st.bytes, last_block_bytes);
    assert_eq!(seqs(&s.read_from(0, 10).expect("read")), vec![3]);
    s.flush().expect("flush");
    drop(s);
    let s = reopen(dir.path());
    assert_eq!(s.reclaimable(), 0, "the orphaned marker is gone");
    assert_eq!(s.stats().events, 1);
}

#[test]
fn the_bound_deletes_acknowledged_blocks_before_dropping_anything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(dir.path(), 1 << 20, 16 << 10).expect("open");
    let batch =
        |round: u64| -> Vec<Event> { (0..20).map(|i| telemetry(round * 100 + i)).collect() };
    let mut round = 0;
    // Fill to just under the bound, everything acknowledged but not deleted.
    while s.stats().bytes < 12 << 10 {
        s.commit(&batch(round), &[]).expect("commit");
        round += 1;
    }
    // Everything acknowledged but the oldest commit, which a plain oldest-first shed would
    // drop.
    let all = refs(&s.read_from(0, usize::MAX).expect("read"));
    let acked: Vec<EventRef> = all.iter().filter(|e| e.seq > 20).copied().collect();
    s.ack_runs(&runs(&acked)).expect("ack");
    assert!(s.reclaimable() > 0);
    // Beyond the bound: the acknowledged blocks make the room, nothing is lost.
    for _ in 0..4 {
        s.commit(&batch(round), &[]).expect("commit");
        round += 1;
    }
    let st = s.stats();
    assert!(st.bytes <= 16 << 10, "bound holds: {}", st.bytes);
    assert_eq!(st.dropped, 0, "no unacknowledged event was dropped");
    assert_eq!(st.events, 100);
    let left = s.read_from(0, usize::MAX).expect("read");
    assert_eq!(left.len(), 100);
    assert_eq!(left[0].seq(), 1, "the oldest unacknowledged commit is kept");
    assert!(
        s.reclaimable() < all.len(),
        "acknowledged blocks were deleted"
    );
    // The bound deletes whole marker records: after a restart no record lists a deleted
    // block, and the counters are exact.
    let waiting = s.reclaimable();
    s.flush().expect("flush");
    drop(s);
    let s = reopen(dir.path());
    assert_eq!(s.reclaimable(), waiting);
    assert_eq!(s.stats().events, 100);
    assert_eq!(s.read_from(0, usize::MAX).expect("read").len(), 100);
}

#[test]
fn runs_follow_blocks_and_positions() {
    let r = |class, block, index| EventRef {
        seq: 0,
        class,
        block,
        index,
        block_len: 10,
        block_bytes: 100,
    };
    let got = runs(&[
        r(Class::Keep, 1, 0),
        r(Class::Telemetry, 2, 0),
        r(Class::Keep, 1, 1),
        r(Class::Telemetry, 2, 1),
        r(Class::Telemetry, 2, 3),
    ]);
    let spans: Vec<(Class, u64, u32, u32)> = got
        .iter()
        .map(|r| (r.class, r.block, r.first, r.len))
        .collect();
    assert_eq!(
        spans,
        [
            (Class::Keep, 1, 0, 2),
            (Class::Telemetry, 2, 0, 2),
            (Class::Telemetry, 2, 3, 1)
        ]
    );
}

/// A store of a version that kept the blocks among the records: opening moves them to the
/// blocks tree, and every event, acknowledgement and counter is as it was.
#[test]
fn blocks_an_older_version_kept_among_the_records_are_moved_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (before, stats) = {
        let s = Store::open(dir.path(), 1 << 20, 1 << 30).expect("open");
        // 150 commits: more blocks than one migration chunk, of both classes.
        for i in 0..150 {
            s.commit(&[counter(2 * i), telemetry(2 * i + 1)], &[])
                .expect("commit");
        }
        let all = refs(&s.read_from(0, usize::MAX).expect("read"));
        s.ack_runs(&runs(&all[..5])).expect("ack");
        let before = seqs(&s.read_from(0, usize::MAX).expect("read"));
        // The older layout: every block in the records tree.
        let mut change = Change::default();
        for item in s.sled.blocks.iter() {
            let (k, v) = item.expect("block");
            change.blocks.remove(k.clone());
            change.records.insert(k, v);
        }
        s.sled.apply(&change).expect("apply");
        assert!(s.sled.blocks.is_empty());
        s.flush().expect("flush");
        (before, s.stats())
    };
    assert_eq!(before.len(), 295);
    let s = reopen(dir.path());
    assert_eq!(s.sled.blocks.len(), 300);
    for class in [Class::Keep, Class::Telemetry] {
        assert_eq!(s.sled.records.scan_prefix([prefix(class)]).count(), 0);
    }
    assert_eq!(seqs(&s.read_from(0, usize::MAX).expect("read")), before);
    let after = s.stats();
    assert_eq!(
        (after.events, after.bytes, after.telemetry),
        (stats.events, stats.bytes, stats.telemetry)
    );
    // Nothing left to move: opening again moves nothing.
    assert_eq!(migrate_blocks(&s.sled, dir.path()).expect("migrate"), 0);
}

fn marker_records(s: &Store) -> usize {
    s.sled.records.scan_prefix([A_PREFIX]).count()
}

/// One acknowledgement that completes several blocks writes one marker record listing them;
/// deleting goes by whole records, so a restart finds every listed block still stored, with
/// exact counters, and a record goes with the blocks it lists.
#[test]
fn one_marker_record_lists_the_blocks_of_an_acknowledgement_and_goes_with_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (bytes_left, events_left) = {
        let s = Store::open(dir.path(), 1 << 20, 1 << 30).expect("open");
        for i in 0..4 {
            s.commit(&[counter(2 * i), telemetry(2 * i + 1)], &[])
                .expect("commit");
        }
        let all = refs(&s.read_from(0, 10).expect("read"));
        // Two acknowledgements of three blocks each; two blocks stay unacknowledged.
        s.ack_runs(&runs(&all[..3])).expect("ack");
        s.ack_runs(&runs(&all[3..6])).expect("ack");
        assert_eq!(s.reclaimable(), 6);
        let acked_bytes =
            |refs: &[EventRef]| -> u64 { refs.iter().map(|e| u64::from(e.block_bytes)).sum() };
        assert_eq!(s.reclaimable_bytes(), acked_bytes(&all[..6]));
        assert_eq!(marker_records(&s), 2, "one record per acknowledgement");
        assert_eq!(
            s.reclaim(1).expect("reclaim"),
            3,
            "a chunk ends with the last block of a record"
        );
        assert_eq!(marker_records(&s), 1);
        assert_eq!(s.reclaimable_bytes(), acked_bytes(&all[3..6]));
        s.flush().expect("flush");
        let st = s.stats();
        assert_eq!(st.events, 2);
        (st.bytes, st.events)
    };
    let s = reopen(dir.path());
    assert_eq!(s.reclaimable(), 3);
    let waiting = s.reclaimable_bytes();
    let st = s.stats();
    assert_eq!((st.events, st.bytes), (events_left, bytes_left));
    assert_eq!(seqs(&s.read_from(0, 10).expect("read")), vec![7, 8]);
    assert_eq!(s.reclaim(usize::MAX).expect("reclaim"), 0);
    assert_eq!(marker_records(&s), 0, "the record went with its blocks");
    assert_eq!(s.reclaimable_bytes(), 0);
    assert!(waiting > 0 && waiting == bytes_left - s.stats().bytes);
    let st = s.stats();
    assert_eq!((st.events, st.telemetry), (2, 1));
    let last_two: u64 = refs(&s.read_from(0, 10).expect("read"))
        .iter()
        .map(|e| u64::from(e.block_bytes))
        .sum();
    assert_eq!(
        st.bytes, last_two,
        "only the unacknowledged blocks are left"
    );
}

/// A marker of a version before grouped records (8 bytes: the block its key names) is honoured.
#[test]
fn a_single_block_marker_of_an_older_version_is_honoured() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = Store::open(dir.path(), 1 << 20, 1 << 30).expect("open");
        s.commit(&[counter(1), counter(2)], &[]).expect("commit");
        s.commit(&[counter(3)], &[]).expect("commit");
        let first = s.read_from(0, 1).expect("read")[0].at;
        let mut v = [0u8; 8];
        v[..4].copy_from_slice(&first.block_len.to_be_bytes());
        v[4..].copy_from_slice(&first.block_bytes.to_be_bytes());
        s.sled
            .records
            .insert(&marker(first.class, first.block)[..], &v[..])
            .expect("insert");
        s.flush().expect("flush");
    }
    let s = reopen(dir.path());
    assert_eq!(s.reclaimable(), 1);
    assert_eq!(seqs(&s.read_from(0, 10).expect("read")), vec![3]);
    assert_eq!(s.stats().events, 1);
    assert_eq!(s.reclaim(usize::MAX).expect("reclaim"), 0);
    assert_eq!(s.stats().events, 1);
    assert_eq!(marker_records(&s), 0);
}

/// A marker record lists at most 64 blocks, so that deleting one (a transaction under the store
/// lock) stays small however many blocks one acknowledgement completes.
#[test]
fn a_marker_record_lists_a_bounded_number_of_blocks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(dir.path(), 1 << 20, 1 << 30).expect("open");
    for i in 0..100 {
        s.commit(&[counter(i)], &[]).expect("commit");
    }
    let all = refs(&s.read_from(0, usize::MAX).expect("read"));
    s.ack_runs(&runs(&all)).expect("ack");
    assert_eq!(marker_records(&s), 2);
    assert_eq!(
        s.reclaim(1).expect("reclaim"),
        36,
        "one record of 64 blocks deleted"
    );
    assert_eq!(s.reclaim(1).expect("reclaim"), 0);
    assert_eq!(marker_records(&s), 0);
    assert_eq!(s.stats().bytes, 0);
}

/// Blocks and bytes as stored in the blocks tree (tombstones not counted).
fn stored_blocks(s: &Store) -> (usize, u64) {
    s.sled.blocks.iter().fold((0, 0), |(n, bytes), item| {
        let (k, v) = item.expect("block");
        if tomb(&v) {
            return (n, bytes);
        }
        (n + 1, bytes + (k.len() + v.len()) as u64)
    })
}

/// Tombstones in the blocks tree.
fn tombstones(s: &Store) -> usize {
    s.sled
        .blocks
        .iter()
        .filter(|item| tomb(&item.as_ref().expect("block").1))
        .count()
}

/// The small blocks of `class` from seq `from` on (what packing has not merged), measured as
/// one block holding their events would be (the measure of a packed block's size).
fn loose_bytes(s: &Store, class: Class, from: u64) -> u64 {
    12 + s
        .sled
        .blocks
        .scan_prefix([prefix(class)])
        .map(|item| item.expect("block"))
        .filter(|(k, v)| seq_of(k) >= from && v.len() <= s.pack_bytes / 2)
        .map(|(_, v)| (v.len() - 12) as u64)
        .sum::<u64>()
}

/// Commits of a few events while no reader reads (an uplink outage; status queries read the
/// oldest event) are merged into large blocks; every event stays, with its seq and JSON, and
/// the counters stay exact.
#[test]
fn unread_small_blocks_are_packed_into_large_ones_with_every_event_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events: Vec<Event> = (1..=3000)
        .map(|i| if i % 2 == 0 { telemetry(i) } else { counter(i) })
        .collect();
    {
        let s = Store::open(dir.path(), 1 << 20, 1 << 30).expect("open");
        for (n, chunk) in events.chunks(3).enumerate() {
            s.commit(chunk, &[]).expect("commit");
            if n % 20 == 19 {
                // A status query reads the oldest event: packing goes on after it.
                assert_eq!(s.read_from(0, 1).expect("read")[0].seq(), 1);
            }
        }
        let (blocks, bytes) = stored_blocks(&s);
        assert!(blocks < 1000, "2000 small blocks, {blocks} after packing");
        for class in [Class::Keep, Class::Telemetry] {
            assert!(
                loose_bytes(&s, class, 3) <= PACK_BYTES as u64,
                "{class:?}: at most one block's worth of small blocks is not packed yet"
            );
        }
        for class in [Class::Keep, Class::Telemetry] {
            // The first block was handed to the status query; after it, small blocks are only
            // those after the last packed block.
            let small: Vec<bool> = s
                .sled
                .blocks
                .scan_prefix([prefix(class)])
                .skip(1)
                .map(|item| item.expect("block").1.len() <= PACK_BYTES / 2)
                .collect();
            let first_small = small.iter().position(|&b| b).unwrap_or(small.len());
            assert!(
                small[first_small..].iter().all(|&b| b),
                "{class:?}: a small block before a packed one: {small:?}"
            );
        }
        let st = s.stats();
        assert_eq!((st.events, st.telemetry, st.bytes), (3000, 1500, bytes));
        s.flush().expect("flush");
    }
    let s = reopen(dir.path());
    let (_, bytes) = stored_blocks(&s);
    let st = s.stats();
    assert_eq!((st.events, st.telemetry, st.bytes), (3000, 1500, bytes));
    let all = s.read_from(0, usize::MAX).expect("read");
    assert_eq!(seqs(&all), (1..=3000).collect::<Vec<u64>>());
    for (stored, event) in all.iter().zip(&events) {
        assert_eq!(stored.json(), &event.encode(stored.seq())[..]);
    }
    let mut reader = Reader::new(0);
    assert_eq!(seqs(&reader.read(&s, 5000).expect("read")), seqs(&all));
    s.ack(&refs(&all)).expect("ack");
    assert_eq!((s.stats().events, s.stats().bytes), (0, 0));
    assert_eq!(stored_blocks(&s), (0, 0));
}

/// Packing leaves the blocks a reader was handed alone: their acknowledgements still find
/// them, so nothing acknowledged is sent again, also after a restart.
#[test]
fn packing_leaves_the_blocks_a_reader_holds_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let later: Vec<u64> = {
        let s = Store::open(dir.path(), 1 << 20, 1 << 30).expect("open");
        for i in 0..20 {
            s.commit(&[counter(2 * i + 1), telemetry(2 * i + 2)], &[])
                .expect("commit");
        }
        let mut reader = Reader::new(0);
        let first = reader.read(&s, 30).expect("read");
        assert_eq!(first.len(), 30);
        // The outage: 3000 more events, a few per commit; they are packed.
        for i in 20..1520 {
            s.commit(&[counter(2 * i + 1), telemetry(2 * i + 2)], &[])
                .expect("commit");
        }
        for class in [Class::Keep, Class::Telemetry] {
            assert!(
                loose_bytes(&s, class, 41) <= PACK_BYTES as u64,
                "{class:?}: the later blocks are packed"
            );
        }
        s.ack_runs(&runs(&refs(&first))).expect("ack");
        assert_eq!(
            s.reclaimable(),
            30,
            "every block read is wholly acknowledged"
        );
        let rest = seqs(&reader.read(&s, 5000).expect("read"));
        assert_eq!(rest, (31..=3040).collect::<Vec<u64>>());
        s.flush().expect("flush");
        rest
    };
    let s = reopen(dir.path());
    assert_eq!(seqs(&s.read_from(0, usize::MAX).expect("read")), later);
    assert_eq!(s.reclaimable(), 30, "the markers found their blocks");
    assert_eq!(s.reclaim(usize::MAX).expect("reclaim"), 0);
    let st = s.stats();
    assert_eq!((st.events, st.bytes), (3010, stored_blocks(&s).1));
}

/// Commits `commits` (true: telemetry), reading `sizes` events (cycled) after every
/// `read_every`-th commit and acknowledging those `acks` picks (cycled; none without `acks`),
/// then deleting up to `reclaim` acknowledged blocks (as the uplink's acker does), and reads
/// the rest: (every ref read, in order; the refs acknowledged; events committed).
fn interleave(
    s: &Store,
    commits: &[Vec<bool>],
    read_every: usize,
    sizes: &[usize],
    acks: Option<&[bool]>,
    reclaim: usize,
) -> (Vec<EventRef>, HashSet<EventRef>, u64) {
    let mut reader = Reader::new(0);
    let (mut read, mut acked) = (Vec::new(), HashSet::new());
    let mut sizes = sizes.iter().cycle();
    let mut picks = acks.unwrap_or(&[false]).iter().cycle();
    let mut i = 0;
    for (n, c) in commits.iter().enumerate() {
        s.commit(&numbered(c, &mut i), &[]).expect("commit");
        if n % read_every == 0 {
            let batch = refs(&reader.read(s, *sizes.next().expect("cycle")).expect("read"));
            let chosen: Vec<EventRef> = batch
                .iter()
                .copied()
                .filter(|_| *picks.next().expect("cycle"))
                .collect();
            s.ack_runs(&runs(&chosen)).expect("ack");
            s.reclaim(reclaim).expect("reclaim");
            acked.extend(chosen);
            read.extend(batch);
        }
    }
    read.extend(refs(&reader.read(s, usize::MAX).expect("read")));
    (read, acked, i)
}

/// A store that packs into 600-byte blocks and leaves tombstones above `tombs_above`
/// unacknowledged events (8 at most), so that the property tests meet both often.
fn churning(dir: &std::path::Path, max_bytes: u64, tombs_above: u64) -> Store {
    Store::open(dir, 1 << 20, max_bytes)
        .expect("open")
        .with_pack_bytes(600)
        .with_tombstones(tombs_above, 8)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// Packing between commits, reads and acknowledgements (small packed blocks, so that it
    /// packs often): the reader yields every event exactly once in seq order, every
    /// acknowledgement finds its block, and a restart sees exactly the unacknowledged events
    /// with exact counters.
    #[test]
    fn packing_never_loses_repeats_or_misplaces_an_event(
        commits in proptest::collection::vec(proptest::collection::vec(proptest::bool::ANY, 1..6), 20..160),
        read_every in 1usize..12,
        sizes in proptest::collection::vec(0usize..25, 1..10),
        acks in proptest::collection::vec(proptest::bool::ANY, 1..30),
        reclaim in 0usize..4,
        tombs_above in 0u64..60,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (read, acked, total) = {
            let s = churning(dir.path(), 1 << 30, tombs_above);
            let (read, acked, total) = interleave(&s, &commits, read_every, &sizes, Some(&acks), reclaim);
            let left: Vec<u64> = read.iter().filter(|e| !acked.contains(*e)).map(|e| e.seq).collect();
            proptest::prop_assert_eq!(seqs(&s.read_from(0, usize::MAX).expect("read")), left, "every acknowledgement found its block");
            s.flush().expect("flush");
            (read, acked, total)
        };
        proptest::prop_assert_eq!(read.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=total).collect::<Vec<u64>>());
        // After a restart, a partly acknowledged block is sent again whole (by design); a
        // wholly acknowledged one is not.
        let mut acked_in: HashMap<(Class, u64), u32> = HashMap::new();
        for e in &acked {
            *acked_in.entry((e.class, e.block)).or_default() += 1;
        }
        let whole = |e: &EventRef| acked_in.get(&(e.class, e.block)) == Some(&e.block_len);
        let left: Vec<u64> = read.iter().filter(|e| !whole(e)).map(|e| e.seq).collect();
        let s = reopen(dir.path());
        proptest::prop_assert_eq!(seqs(&s.read_from(0, usize::MAX).expect("read")), left.clone());
        proptest::prop_assert_eq!(s.stats().events, left.len() as u64);
        s.reclaim(usize::MAX).expect("reclaim");
        proptest::prop_assert_eq!(s.stats().bytes, stored_blocks(&s).1);
        proptest::prop_assert_eq!(s.stats().events, left.len() as u64);
        // Once everything is acknowledged, no key is left: no tombstone is forgotten.
        s.ack(&refs(&s.read_from(0, usize::MAX).expect("read"))).expect("ack");
        proptest::prop_assert_eq!((s.sled.blocks.len(), s.stats().bytes, s.stats().tombstones), (0, 0, 0));
    }

    /// Packing while the bound drops: the counters stay those of the stored blocks, the
    /// reader never yields an event twice, and (without acknowledgements) every seq is either
    /// stored or counted as dropped.
    #[test]
    fn packing_and_the_bound_keep_the_counters_exact(
        commits in proptest::collection::vec(proptest::collection::vec(proptest::bool::ANY, 1..8), 20..160),
        read_every in 1usize..12,
        sizes in proptest::collection::vec(0usize..25, 1..10),
        acks in proptest::collection::vec(proptest::bool::ANY, 1..30),
        with_acks in proptest::bool::ANY,
        reclaim in 0usize..4,
        tombs_above in 0u64..60,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = churning(dir.path(), 6 << 10, tombs_above);
            let acks = with_acks.then_some(&acks[..]);
            let (read, _, _) = interleave(&s, &commits, read_every, &sizes, acks, reclaim);
            let got: Vec<u64> = read.iter().map(|e| e.seq).collect();
            proptest::prop_assert!(got.windows(2).all(|w| w[0] < w[1]), "read once, in order: {:?}", got);
            let st = s.stats();
            proptest::prop_assert_eq!(st.bytes, stored_blocks(&s).1);
            let stored = s.read_from(0, usize::MAX).expect("read").len() as u64;
            proptest::prop_assert_eq!(st.events, stored);
            if !with_acks {
                proptest::prop_assert_eq!(stored + st.dropped, st.next_seq - 1);
            }
            proptest::prop_assert_eq!(st.tombstones as usize, tombstones(&s), "every tombstone listed, none twice");
            s.flush().expect("flush");
        }
        let s = reopen(dir.path());
        s.reclaim(usize::MAX).expect("reclaim");
        let st = s.stats();
        proptest::prop_assert_eq!(st.bytes, stored_blocks(&s).1);
        proptest::prop_assert!(st.bytes <= 6 << 10);
        proptest::prop_assert_eq!(st.events, s.read_from(0, usize::MAX).expect("read").len() as u64);
        s.ack(&refs(&s.read_from(0, usize::MAX).expect("read"))).expect("ack");
        proptest::prop_assert_eq!((s.sled.blocks.len(), s.stats().bytes, s.stats().tombstones), (0, 0, 0));
    }
}

/// Packing merges only intact blocks: a truncated one would hide the events after it.
#[test]
fn only_intact_blocks_are_packed() {
    let block = encode_block(&[(5, b"{}".to_vec()), (7, b"{\"a\":1}".to_vec())]);
    assert!(intact(&block));
    assert!(!intact(&encode_block(&[])), "empty");
    assert!(!intact(&block[..block.len() - 1]), "truncated");
    assert!(!intact(&block[..8]), "no header");
    let mut wrong_count = block.clone();
    wrong_count[3] = 3;
    assert!(!intact(&wrong_count));
    let mut wrong_last = block.clone();
    wrong_last[11] = 6;
    assert!(!intact(&wrong_last));
}

/// A packed block holds at most 1000 events, however small they are.
#[test]
fn a_packed_block_holds_at_most_a_thousand_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(dir.path(), 1 << 20, 1 << 30)
        .expect("open")
        .with_pack_bytes(1 << 20);
    for i in 1..=2500 {
        s.commit(&[counter(i)], &[]).expect("commit");
    }
    let counts: Vec<u32> = s
        .sled
        .blocks
        .iter()
        .map(|item| block_header(&item.expect("block").1).0)
        .collect();
    assert_eq!(&counts[..2], &[1000, 1000], "{counts:?}");
    assert_eq!(counts.iter().sum::<u32>(), 2500);
    assert_eq!(
        seqs(&s.read_from(0, usize::MAX).expect("read")),
        (1..=2500).collect::<Vec<u64>>()
    );
}

/// A block that is not intact (here truncated) is left as it is, and nothing is merged across
/// it: the events after it stay readable.
#[test]
fn packing_leaves_a_damaged_block_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(dir.path(), 1 << 20, 1 << 30)
        .expect("open")
        .with_pack_bytes(2000);
    for i in 1..=3 {
        s.commit(&[counter(i)], &[]).expect("commit");
    }
    let k = key(Class::Keep, 2);
    let v = s.sled.blocks.get(k).expect("get").expect("block 2");
    let damaged = v[..v.len() - 1].to_vec();
    s.sled.blocks.insert(k, damaged.clone()).expect("insert");
    for i in 4..=60 {
        s.commit(&[counter(i)], &[]).expect("commit");
    }
    assert!(s.stats().events == 60);
    let keys: Vec<u64> = s
        .sled
        .blocks
        .iter()
        .map(|item| seq_of(&item.expect("block").0))
        .collect();
    assert!(keys.len() < 30, "packed: {keys:?}");
    assert_eq!(&keys[..3], &[1, 2, 3], "nothing merged across block 2");
    assert_eq!(
        s.sled.blocks.get(k).expect("get").as_deref(),
        Some(&damaged[..])
    );
    let read = seqs(&s.read_from(0, usize::MAX).expect("read"));
    assert_eq!(read[0], 1);
    assert_eq!(
        &read[1..],
        &(3..=60).collect::<Vec<u64>>()[..],
        "all but the damaged event"
    );
}

/// With a small bound, packed blocks are small too, so that a full store sheds in small steps
/// and not a whole packed block of its few kept events at once.
#[test]
fn with_a_small_bound_a_full_store_sheds_in_small_steps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(dir.path(), 1 << 20, 256 << 10).expect("open");
    assert_eq!(s.pack_bytes, 8 << 10);
    // About 800 KB of telemetry through a 256 KiB bound: it sheds 10 % at a time.
    for i in 1..=8000 {
        s.commit(&[telemetry(i)], &[]).expect("commit");
    }
    let stored = s.stats().events;
    let gaps: Vec<u64> = s
        .read_from(0, usize::MAX)
        .expect("read")
        .iter()
        .filter_map(|e| serde_json::from_slice::<serde_json::Value>(e.json()).ok())
        .filter(|v| v["kind"] == "gap")
        .map(|g| g["dropped"].as_u64().unwrap_or(0))
        .collect();
    assert!(!gaps.is_empty());
    let most = gaps.iter().max().copied().unwrap_or(0);
    assert!(
        most * 5 <= stored,
        "one shed dropped {most} of about {stored} stored events"
    );
}

/// Live traffic, read as it is committed, leaves nothing loose: packing has nothing to scan.
#[test]
fn blocks_read_as_they_are_committed_are_not_loose() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(dir.path(), 1 << 20, 1 << 30)
        .expect("open")
        .with_pack_bytes(600);
    let mut reader = Reader::new(0);
    for i in 0..200 {
        s.commit(&[counter(2 * i + 1), telemetry(2 * i + 2)], &[])
            .expect("commit");
        assert_eq!(reader.read(&s, 10).expect("read").len(), 2);
        let meta = lock(&s.meta);
        assert_eq!(
            (meta.loose[0].blocks, meta.loose[1].blocks),
            (0, 0),
            "commit {i}"
        );
    }
    assert_eq!(stored_blocks(&s).0, 400, "nothing packed");
}

/// While a backlog drains, deleted blocks leave tombstones: reads skip them, the counters leave
/// them out, a late acknowledgement of a deleted block changes nothing, a restart meets them,
/// and once the backlog is drained every one is removed.
#[test]
fn a_draining_backlog_leaves_tombstones_that_go_once_it_is_drained() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = Store::open(dir.path(), 1 << 20, 1 << 30)
            .expect("open")
            .with_tombstones(100, TOMBSTONES_MAX);
        // Read as committed (not packed), not acknowledged: 50 blocks.
        let mut all = Vec::new();
        for c in 0..50u64 {
            let events: Vec<Event> = (1..=20).map(|i| counter(c * 20 + i)).collect();
            let r = s.commit(&events, &[]).expect("commit");
            all.extend(s.read_from(r.start, usize::MAX).expect("read"));
        }
        // 1000 unacknowledged: the 40 blocks deleted leave tombstones.
        s.ack(&refs(&all[..800])).expect("ack");
        assert_eq!((tombstones(&s), s.stats().tombstones), (40, 40));
        let st = s.stats();
        assert_eq!(
            (st.events, st.bytes, st.oldest_seq),
            (200, stored_blocks(&s).1, Some(801))
        );
        let rest = seqs(&s.read_from(0, usize::MAX).expect("read"));
        assert_eq!(rest, (801..=1000).collect::<Vec<u64>>());
        // A duplicate PUBACK for a deleted block.
        s.ack(&refs(&all[..20])).expect("ack");
        let st = s.stats();
        assert_eq!((st.events, st.bytes), (200, stored_blocks(&s).1));
        s.flush().expect("flush");
    }
    let s = reopen(dir.path()).with_tombstones(100, TOMBSTONES_MAX);
    // A status query before any read finds the oldest event behind them, and lists them.
    assert_eq!(s.stats().oldest_seq, Some(801));
    assert_eq!(s.stats().tombstones, 40);
    let s = {
        drop(s);
        reopen(dir.path()).with_tombstones(100, TOMBSTONES_MAX)
    };
    // The uplink's reader skips them, and the sweep learns of them from it.
    let mut reader = Reader::new(0);
    let mut left = Vec::new();
    while let Some(b) = Some(reader.read(&s, 7).expect("read")).filter(|b| !b.is_empty()) {
        left.extend(b);
    }
    assert_eq!(seqs(&left), (801..=1000).collect::<Vec<u64>>());
    let st = s.stats();
    assert_eq!((st.events, st.oldest_seq), (200, Some(801)));
    // 150 left unacknowledged: still a backlog, 2 more tombstones.
    s.ack(&refs(&left[..50])).expect("ack");
    assert_eq!(tombstones(&s), 42);
    assert_eq!(s.stats().events, 150);
    // Drained: the blocks and every tombstone go.
    s.ack(&refs(&left[50..])).expect("ack");
    assert_eq!(
        (s.sled.blocks.len(), s.stats().tombstones, s.stats().bytes),
        (0, 0, 0)
    );
}

/// Past the most tombstones kept ([`TOMBSTONES_MAX`]; here 50) they are swept, also while the
/// backlog drains: the acknowledgement that lists the 50th sweeps them.
#[test]
fn tombstones_are_swept_when_too_many() {
    const MAX: usize = 50;
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(dir.path(), 1 << 20, 1 << 30)
        .expect("open")
        .with_tombstones(0, MAX);
    let n = MAX as u64 + 10;
    let mut all = Vec::new();
    for i in 1..=n {
        let r = s.commit(&[counter(i)], &[]).expect("commit");
        all.extend(s.read_from(r.start, usize::MAX).expect("read"));
    }
    for (i, e) in all.iter().enumerate().take(MAX + 2) {
        s.ack(&[e.at]).expect("ack");
        let expected = if i + 1 < MAX { i + 1 } else { i + 1 - MAX };
        assert_eq!(
            tombstones(&s),
            expected,
            "after acknowledging {} blocks",
            i + 1
        );
    }
    assert_eq!(stored_blocks(&s).0 as u64, n - MAX as u64 - 2);
}

/// A drained backlog's tombstones go [`SWEEP_CHUNK`] per reclaim, the oldest first, and
/// reclaim says how many still wait; reads never see them meanwhile.
#[test]
fn tombstones_are_swept_a_chunk_at_a_time() {
    let n = SWEEP_CHUNK as u64 + 44;
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(dir.path(), 1 << 20, 1 << 30)
        .expect("open")
        .with_tombstones(0, usize::MAX);
    let mut all = Vec::new();
    for i in 1..=n + 1 {
        let r = s.commit(&[counter(i)], &[]).expect("commit");
        all.extend(s.read_from(r.start, usize::MAX).expect("read"));
    }
    // One event stays unacknowledged (a backlog): every deleted block leaves a tombstone.
    for e in &all[..n as usize] {
        s.ack_runs(&runs([&e.at])).expect("ack");
        assert_eq!(s.reclaim(usize::MAX).expect("reclaim"), 0);
    }
    assert_eq!((tombstones(&s), s.reclaim_waiting()), (n as usize, 0));
    // Drained: the sweep goes a chunk at a time.
    s.ack_runs(&runs([&all[n as usize].at])).expect("ack");
    assert_eq!(
        s.reclaim_waiting(),
        1 + n as usize,
        "the block and every tombstone"
    );
    assert_eq!(s.reclaim(usize::MAX).expect("reclaim"), 44);
    assert_eq!(tombstones(&s), 44);
    let left: Vec<u64> = s
        .sled
        .blocks
        .iter()
        .map(|item| seq_of(&item.expect("block").0))
        .collect();
    assert_eq!(
        left,
        (n - 43..=n).collect::<Vec<u64>>(),
        "the oldest went first"
    );
    assert!(s.read_from(0, usize::MAX).expect("read").is_empty());
    assert_eq!(s.reclaim(usize::MAX).expect("reclaim"), 0);
    assert_eq!(
        (s.sled.blocks.len(), s.stats().tombstones, s.stats().bytes),
        (0, 0, 0)
    );
}
