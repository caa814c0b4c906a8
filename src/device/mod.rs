//! Devices: profiles turned into read plans, decoding of what was read, and event derivation.

pub mod codec;
pub mod derive;
pub mod plan;

use crate::config::{Point, Profile};
use codec::{Table, Value};
use plan::{Item, Limits, ReadSpan};

/// Data of one read transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Raw {
    /// Holding or input registers.
    Registers(Vec<u16>),
    /// Coils or discrete inputs.
    Bits(Vec<bool>),
}

/// The transactions that read all points of a profile, and where each point sits in them.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadPlan {
    /// Reads, in order.
    pub spans: Vec<ReadSpan>,
    /// For each point of the profile: (span index, offset in the span).
    pub locations: Vec<(usize, u16)>,
}

fn item(p: &Point) -> Item {
    Item {
        table: p.table,
        address: p.address,
        width: p.width(),
    }
}

impl ReadPlan {
    /// Plans the fewest reads for a profile.
    pub fn new(profile: &Profile, max_gap: u16) -> Result<ReadPlan, plan::PlanError> {
        let items: Vec<Item> = profile.points.iter().map(item).collect();
        let limits = Limits {
            max_gap,
            ..Limits::default()
        };
        let spans = plan::plan(&items, limits)?;
        let locations = items
            .iter()
            .map(|it| plan::locate(&spans, it).unwrap_or((0, 0)))
            .collect();
        Ok(ReadPlan { spans, locations })
    }

    /// Decodes every point from the data of all spans (`raws[i]` belongs to `spans[i]`).
    /// A point that cannot be decoded yields None and is logged.
    pub fn decode(&self, profile: &Profile, raws: &[Raw]) -> Vec<Option<Value>> {
        profile
            .points
            .iter()
            .zip(&self.locations)
            .map(|(p, &(span, off))| {
                let off = off as usize;
                let w = p.width() as usize;
                let v = match raws.get(span) {
                    Some(Raw::Registers(r)) if off + w <= r.len() => {
                        codec::decode_registers(&r[off..off + w], p.ty, p.order, p.bit)
                    }
                    Some(Raw::Bits(b)) if off < b.len() => codec::decode_bit(&b[off..off + 1]),
                    _ => return None,
                };
                match v {
                    Ok(v) => Some(codec::apply_scale(v, p.scale, p.offset)),
                    Err(error) => {
                        tracing::warn!(point = %p.name, %error, "cannot decode point");
                        None
                    }
                }
            })
            .collect()
    }
}

/// Whether a table's reads return bits.
pub fn is_bit_table(t: Table) -> bool {
    t.is_bit()
}
