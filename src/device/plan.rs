//! Read planning: coalescing the points of a device into the fewest Modbus read transactions.
//!
//! [`plan`] groups items per table into [`ReadSpan`]s, bridging small unused gaps while
//! staying within the protocol's per-request limits; [`locate`] finds where an item's data
//! sits in the planned reads.

use super::codec::Table;

/// One Modbus read transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadSpan {
    /// The table read.
    pub table: Table,
    /// First address read.
    pub start: u16,
    /// Registers (or bits, for bit tables) read.
    pub count: u16,
}

impl ReadSpan {
    /// One past the last address read (may be 65536).
    pub fn end(&self) -> u32 {
        u32::from(self.start) + u32::from(self.count)
    }
}

/// One item to be read: table, first address, width (registers, or bits for bit tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    /// The table the item lives in.
    pub table: Table,
    /// First address of the item.
    pub address: u16,
    /// Registers (or bits, for bit tables) the item occupies.
    pub width: u16,
}

impl Item {
    /// One past the item's last address (may be 65536).
    pub fn end(&self) -> u32 {
        u32::from(self.address) + u32::from(self.width)
    }
}

/// Limits on a single read and on the unused space bridged to merge reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most registers in one read of the holding/input tables (Modbus allows 125).
    pub max_registers: u16,
    /// Most bits in one read of the coil/discrete tables (Modbus allows 2000).
    pub max_bits: u16,
    /// Most registers/bits of unused space a read may bridge to cover the next item.
    pub max_gap: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_registers: 125,
            max_bits: 2000,
            max_gap: 8,
        }
    }
}

impl Limits {
    /// The most registers/bits one read of `table` may cover.
    pub fn max_for(&self, table: Table) -> u16 {
        if table.is_bit() {
            self.max_bits
        } else {
            self.max_registers
        }
    }
}

/// Why a read plan could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// An item occupies no registers/bits (e.g. a string of length 0).
    #[error("{table} item at address {address} has width 0: nothing to read")]
    ZeroWidth {
        /// The item's table.
        table: Table,
        /// The item's address.
        address: u16,
    },
    /// An item runs past the last address of the table.
    #[error("{table} item at address {address} with width {width} runs past address 65535")]
    PastEnd {
        /// The item's table.
        table: Table,
        /// The item's address.
        address: u16,
        /// The item's width.
        width: u16,
    },
    /// An item is wider than one read of its table may be.
    #[error("{table} item at address {address} with width {width} is wider than one read allows ({max})")]
    ItemTooWide {
        /// The item's table.
        table: Table,
        /// The item's address.
        address: u16,
        /// The item's width.
        width: u16,
        /// The table's read limit.
        max: u16,
    },
    /// Overlapping items form a chain wider than one read, so it cannot be split without
    /// cutting an item.
    #[error(
        "{table} items overlap each other over addresses {start}..{end} ({} wide), \
         more than one read allows ({max}); check the items' addresses",
        end - start
    )]
    OverlapTooWide {
        /// The table.
        table: Table,
        /// First address of the overlapping run.
        start: u32,
        /// One past the last address of the overlapping run.
        end: u32,
        /// The table's read limit.
        max: u16,
    },
}

fn table_rank(table: Table) -> u8 {
    match table {
        Table::Holding => 0,
        Table::Input => 1,
        Table::Coil => 2,
        Table::Discrete => 3,
    }
}

/// Fewest reads covering every item.
///
/// Per table, items are sorted by address and merged greedily into the current read while the
/// unused gap before the next item is at most `max_gap` and the read stays within the table's
/// limit. An item is never split across reads. Items may overlap (bits of one register, or
/// the same address read as different types); overlapping items always land in the same read,
/// so reads of a table never overlap. Output is ordered by table (holding, input, coil,
/// discrete) then address. No items gives no reads.
pub fn plan(items: &[Item], limits: Limits) -> Result<Vec<ReadSpan>, PlanError> {
    let mut sorted = items.to_vec();
    for item in &sorted {
        check_item(item, limits)?;
    }
    sorted.sort_by_key(|i| (table_rank(i.table), i.address, i.width));

    let mut spans = Vec::new();
    // Each table's items form a contiguous run of `sorted`.
    for run in sorted.chunk_by(|a, b| a.table == b.table) {
        let Some(first) = run.first() else { continue };
        plan_table(first.table, &blocks(run), limits, &mut spans)?;
    }
    Ok(spans)
}

fn check_item(item: &Item, limits: Limits) -> Result<(), PlanError> {
    let max = limits.max_for(item.table);
    if item.width == 0 {
        Err(PlanError::ZeroWidth {
            table: item.table,
            address: item.address,
        })
    } else if item.end() > 0x1_0000 {
        Err(PlanError::PastEnd {
            table: item.table,
            address: item.address,
            width: item.width,
        })
    } else if item.width > max {
        Err(PlanError::ItemTooWide {
            table: item.table,
            address: item.address,
            width: item.width,
            max,
        })
    } else {
        Ok(())
    }
}

/// Union of overlapping items (sorted by address) into disjoint `[start, end)` blocks; a block
/// must not be split across reads.
fn blocks(run: &[Item]) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for item in run {
        let (a, b) = (u32::from(item.address), item.end());
        match out.last_mut() {
            Some((_, end)) if a < *end => *end = (*end).max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

fn plan_table(
    table: Table,
    blocks: &[(u32, u32)],
    limits: Limits,
    spans: &mut Vec<ReadSpan>,
) -> Result<(), PlanError> {
    let max = u32::from(limits.max_for(table));
    let gap = u32::from(limits.max_gap);
    let mut current: Option<(u32, u32)> = None;
    for &(a, b) in blocks {
        if b - a > max {
            return Err(PlanError::OverlapTooWide {
                table,
                start: a,
                end: b,
                max: limits.max_for(table),
            });
        }
        current = match current {
            Some((s, e)) if a - e <= gap && b - s <= max => Some((s, b)),
            Some(done) => {
                spans.push(to_span(table, done));
                Some((a, b))
            }
            None => Some((a, b)),
        };
    }
    if let Some(done) = current {
        spans.push(to_span(table, done));
    }
    Ok(())
}

/// Blocks are within 0..=65536 and at most `u16::MAX` wide (checked by the caller), so the
/// conversions cannot fail; saturate rather than panic all the same.
fn to_span(table: Table, (start, end): (u32, u32)) -> ReadSpan {
    ReadSpan {
        table,
        start: u16::try_from(start).unwrap_or(u16::MAX),
        count: u16::try_from(end - start).unwrap_or(u16::MAX),
    }
}

/// Where an item's data sits in the plan: `(span index, offset within the span)` of the first
/// span of the item's table that wholly contains it, or `None` if no span does.
pub fn locate(spans: &[ReadSpan], item: &Item) -> Option<(usize, u16)> {
    spans.iter().enumerate().find_map(|(i, s)| {
        (s.table == item.table && s.start <= item.address && item.end() <= s.end())
            .then(|| (i, item.address - s.start))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hr(address: u16, width: u16) -> Item {
        Item {
            table: Table::Holding,
            address,
            width,
        }
    }

    fn span(table: Table, start: u16, count: u16) -> ReadSpan {
        ReadSpan {
            table,
            start,
            count,
        }
    }

    #[test]
    fn empty_plan() {
        assert_eq!(plan(&[], Limits::default()).unwrap(), []);
    }

    #[test]
    fn adjacent_points_coalesce() {
        let items = [hr(10, 2), hr(0, 1), hr(1, 1), hr(2, 4), hr(6, 4)];
        assert_eq!(
            plan(&items, Limits::default()).unwrap(),
            [span(Table::Holding, 0, 12)]
        );
    }

    #[test]
    fn gap_within_and_beyond_max_gap() {
        // Gap of exactly 8 bridged, gap of 9 splits.
        let items = [hr(0, 2), hr(10, 1), hr(20, 1)];
        assert_eq!(
            plan(&items, Limits::default()).unwrap(),
            [span(Table::Holding, 0, 11), span(Table::Holding, 20, 1)]
        );
        let no_gap = Limits {
            max_gap: 0,
            ..Limits::default()
        };
        assert_eq!(
            plan(&[hr(0, 1), hr(1, 1), hr(3, 1)], no_gap).unwrap(),
            [span(Table::Holding, 0, 2), span(Table::Holding, 3, 1)]
        );
    }

    #[test]
    fn register_limit_splits() {
        let items: Vec<Item> = (0..200).map(|a| hr(a, 1)).collect();
        assert_eq!(
            plan(&items, Limits::default()).unwrap(),
            [span(Table::Holding, 0, 125), span(Table::Holding, 125, 75)]
        );
        // An item is never split: a u32 at 124 moves to the next read.
        let mut items: Vec<Item> = (0..124).map(|a| hr(a, 1)).collect();
        items.push(hr(124, 2));
        assert_eq!(
            plan(&items, Limits::default()).unwrap(),
            [span(Table::Holding, 0, 124), span(Table::Holding, 124, 2)]
        );
    }

    #[test]
    fn coils_up_to_2000_bits() {
        let coil = |address| Item {
            table: Table::Coil,
            address,
            width: 1,
        };
        let items: Vec<Item> = (0..2500).map(coil).collect();
        assert_eq!(
            plan(&items, Limits::default()).unwrap(),
            [span(Table::Coil, 0, 2000), span(Table::Coil, 2000, 500)]
        );
        let items: Vec<Item> = (0..2000).map(coil).collect();
        assert_eq!(
            plan(&items, Limits::default()).unwrap(),
            [span(Table::Coil, 0, 2000)]
        );
    }

    #[test]
    fn tables_never_merge_and_order_is_fixed() {
        let items = [
            Item {
                table: Table::Discrete,
                address: 0,
                width: 1,
            },
            Item {
                table: Table::Coil,
                address: 1,
                width: 1,
            },
            Item {
                table: Table::Input,
                address: 2,
                width: 2,
            },
            hr(5, 1),
            hr(0, 1),
        ];
        assert_eq!(
            plan(&items, Limits::default()).unwrap(),
            [
                span(Table::Holding, 0, 6),
                span(Table::Input, 2, 2),
                span(Table::Coil, 1, 1),
                span(Table::Discrete, 0, 1),
            ]
        );
    }

    #[test]
    fn overlapping_items() {
        // Bits of one register, and a u16 view of the low word of a u32.
        let items = [hr(5, 1), hr(5, 1), hr(5, 1), hr(7, 2), hr(7, 1)];
        let spans = plan(&items, Limits::default()).unwrap();
        assert_eq!(spans, [span(Table::Holding, 5, 4)]);
        assert_eq!(locate(&spans, &hr(7, 1)), Some((0, 2)));
        // An overlap that straddles the limit stays in one read.
        let mut items: Vec<Item> = (0..124).map(|a| hr(a, 1)).collect();
        items.push(hr(123, 4));
        assert_eq!(
            plan(&items, Limits::default()).unwrap(),
            [span(Table::Holding, 0, 123), span(Table::Holding, 123, 4)]
        );
        // A chain of overlaps wider than one read cannot be planned.
        let chain: Vec<Item> = (0..130).map(|a| hr(a, 2)).collect();
        assert!(matches!(
            plan(&chain, Limits::default()),
            Err(PlanError::OverlapTooWide { .. })
        ));
    }

    #[test]
    fn bad_items() {
        let l = Limits::default();
        assert_eq!(
            plan(&[hr(0, 126)], l),
            Err(PlanError::ItemTooWide {
                table: Table::Holding,
                address: 0,
                width: 126,
                max: 125
            })
        );
        assert!(matches!(
            plan(&[hr(65535, 2)], l),
            Err(PlanError::PastEnd { .. })
        ));
        assert!(matches!(
            plan(&[hr(3, 0)], l),
            Err(PlanError::ZeroWidth { .. })
        ));
    }

    #[test]
    fn top_of_address_space() {
        let items = [hr(65535, 1), hr(65530, 4), hr(65534, 1)];
        let spans = plan(&items, Limits::default()).unwrap();
        assert_eq!(spans, [span(Table::Holding, 65530, 6)]);
        assert_eq!(spans[0].end(), 65536);
        assert_eq!(locate(&spans, &hr(65535, 1)), Some((0, 5)));
    }

    #[test]
    fn locate_misses() {
        let spans = [span(Table::Holding, 10, 5)];
        assert_eq!(locate(&spans, &hr(9, 1)), None);
        assert_eq!(locate(&spans, &hr(14, 2)), None);
        assert_eq!(
            locate(
                &spans,
                &Item {
                    table: Table::Input,
                    address: 10,
                    width: 1
                }
            ),
            None
        );
        assert_eq!(locate(&spans, &hr(14, 1)), Some((0, 4)));
    }

    fn table() -> impl Strategy<Value = Table> {
        prop::sample::select(vec![
            Table::Holding,
            Table::Input,
            Table::Coil,
            Table::Discrete,
        ])
    }

    /// Items clustered in a small window so that merges, gaps and limits all happen; widths
    /// up to 4 (u64) with occasional wide strings.
    fn items() -> impl Strategy<Value = Vec<Item>> {
        let item = (
            table(),
            prop_oneof![0u16..300, 65_400u16..=65_535],
            prop_oneof![4 => 1u16..=4, 1 => 1u16..=40],
        )
            .prop_map(|(table, address, width)| Item {
                table,
                address: address.min(u16::try_from(65_536 - u32::from(width)).unwrap_or(0)),
                width,
            });
        prop::collection::vec(item, 0..120)
    }

    fn limits() -> impl Strategy<Value = Limits> {
        (40u16..=125, 40u16..=2000, 0u16..=12).prop_map(|(max_registers, max_bits, max_gap)| {
            Limits {
                max_registers,
                max_bits,
                max_gap,
            }
        })
    }

    proptest! {
        #[test]
        fn plan_properties(items in items(), limits in limits()) {
            let spans = match plan(&items, limits) {
                Ok(spans) => spans,
                // Only long chains of overlapping items may be refused (widths fit the limits).
                Err(PlanError::OverlapTooWide { .. }) => return Ok(()),
                Err(e) => return Err(TestCaseError::fail(e.to_string())),
            };
            // Every item is covered by the span `locate` returns, and by no other span.
            for item in &items {
                let (i, off) = locate(&spans, item).ok_or_else(|| TestCaseError::fail("uncovered"))?;
                let s = spans[i];
                prop_assert_eq!(s.table, item.table);
                prop_assert_eq!(u32::from(s.start) + u32::from(off), u32::from(item.address));
                prop_assert!(item.end() <= s.end());
                let containing = spans.iter().filter(|s| s.table == item.table
                    && u32::from(s.start) <= u32::from(item.address) && item.end() <= s.end()).count();
                prop_assert_eq!(containing, 1);
            }
            for s in &spans {
                // Within limits.
                prop_assert!(s.count >= 1 && s.count <= limits.max_for(s.table));
                prop_assert!(s.end() <= 0x1_0000);
                // Every span starts and ends on an item (no wasted edges).
                prop_assert!(items.iter().any(|i| i.table == s.table && i.address == s.start));
                prop_assert!(items.iter().any(|i| i.table == s.table && i.end() == s.end()));
            }
            // Ordered by table then address; no overlap; consecutive spans cannot merge.
            for w in spans.windows(2) {
                let (a, b) = (w[0], w[1]);
                prop_assert!((table_rank(a.table), a.start) < (table_rank(b.table), b.start));
                if a.table == b.table {
                    prop_assert!(a.end() <= u32::from(b.start), "overlap {:?} {:?}", a, b);
                    let gap = u32::from(b.start) - a.end();
                    let merged = b.end() - u32::from(a.start);
                    prop_assert!(
                        gap > u32::from(limits.max_gap) || merged > u32::from(limits.max_for(a.table)),
                        "{:?} and {:?} could merge", a, b
                    );
                }
            }
            // Deterministic regardless of input order.
            let mut reversed = items.clone();
            reversed.reverse();
            prop_assert_eq!(plan(&reversed, limits).ok(), Some(spans));
        }
    }
}
