//! A device for any profile: plausible values for every point (telemetry wanders, counters count,
//! states change now and then), written through the same codec the gateway decodes with.

use super::bank::{RegisterBank, Tables};
use crate::config::{PointKind, Profile};
use crate::device::codec::{encode_registers, DataType, Table, Value};
use rand::Rng;

fn write(t: &mut Tables, table: Table, address: u16, bit: Option<u8>, regs: &[u16], on: bool) {
    match table {
        Table::Coil => t.set_coil(address, on),
        Table::Discrete => t.set_discrete(address, on),
        Table::Holding | Table::Input => {
            if let Some(b) = bit {
                if table == Table::Holding {
                    t.set_bit(address, b, on);
                } else {
                    let v = t.input(address);
                    t.set_input(address, if on { v | (1 << b) } else { v & !(1 << b) });
                }
                return;
            }
            for (i, r) in regs.iter().enumerate() {
                let a = address.wrapping_add(i as u16);
                if table == Table::Holding {
                    t.set_u16(a, *r);
                } else {
                    t.set_input(a, *r);
                }
            }
        }
    }
}

fn value_for(ty: DataType, kind: PointKind, step: u64, rng: &mut impl Rng, name: &str) -> Value {
    match (ty, kind) {
        (DataType::Bool, _) => Value::Bool(rng.gen_bool(0.1)),
        (DataType::String, _) => Value::Str(name.chars().take(16).collect()),
        (_, PointKind::Counter) => Value::UInt(step),
        (DataType::F32 | DataType::F64, _) => Value::Float(20.0 + rng.gen_range(-5.0..5.0)),
        (DataType::I16 | DataType::I32 | DataType::I64, _) => Value::Int(rng.gen_range(-50..50)),
        _ => Value::UInt(rng.gen_range(0..100)),
    }
}

/// Writes one round of values for every point of `profile`. `round` counts calls: counters
/// take it as their value, and states only change on some rounds.
pub fn step(profile: &Profile, bank: &RegisterBank, round: u64, rng: &mut impl Rng) {
    bank.with(|t| {
        for p in &profile.points {
            if p.kind == PointKind::State && round > 0 && !rng.gen_bool(0.05) {
                continue;
            }
            let v = value_for(p.ty, p.kind, round, rng, &profile.name);
            let on = matches!(v, Value::Bool(true));
            let regs = if p.table.is_bit() || p.bit.is_some() {
                Vec::new()
            } else {
                // Values outside the point's range are simply skipped.
                match encode_registers(&v, p.ty, p.order, p.scale, p.offset, p.len) {
                    Ok(r) => r,
                    Err(_) => continue,
                }
            };
            write(t, p.table, p.address, p.bit, &regs, on);
        }
    });
}
