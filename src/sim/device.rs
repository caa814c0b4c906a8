//! A simulated Modbus device ([`Device`]): unit id, register bank, run-time
//! fault injection ([`Faults`]) and request counters; plus the transport
//! independent request execution shared by the TCP and RTU servers.

use std::collections::hash_map::{Entry, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::bank::{RegisterBank, Tables};

/// Modbus exception 0x01: illegal function.
pub const EX_ILLEGAL_FUNCTION: u8 = 0x01;
/// Modbus exception 0x02: illegal data address.
pub const EX_ILLEGAL_ADDRESS: u8 = 0x02;
/// Modbus exception 0x03: illegal data value.
pub const EX_ILLEGAL_VALUE: u8 = 0x03;
/// Modbus exception 0x04: server device failure.
pub const EX_SERVER_FAILURE: u8 = 0x04;
/// Modbus exception 0x0B: gateway target device failed to respond.
pub const EX_GATEWAY_TARGET: u8 = 0x0B;

/// Fault injection settings of one device; change them at run time with
/// [`Device::set_faults`] / [`Device::update_faults`].
///
/// Faults combine: `silent` wins over everything; otherwise the reply (or the
/// `exception` reply) is sent after `delay`, then `truncate`, `corrupt_crc` and
/// `garbage_before` alter the RTU bytes. The last three are RTU only (the TCP
/// server ignores them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Never answer (and do not execute requests: the device is "unplugged").
    /// Requests are still counted in [`Device::requests`].
    pub silent: bool,
    /// Sleep this long before answering.
    pub delay: Duration,
    /// Answer every request with this Modbus exception code (nothing is executed).
    pub exception: Option<u8>,
    /// RTU: send a few random bytes right before the real reply.
    pub garbage_before: bool,
    /// RTU: flip the CRC of the reply.
    pub corrupt_crc: bool,
    /// RTU: send only the first half of the reply.
    pub truncate: bool,
}

/// One simulated device. Clones share the bank, the faults and the counters.
#[derive(Debug, Clone)]
pub struct Device {
    unit: u8,
    bank: RegisterBank,
    faults: Arc<Mutex<Faults>>,
    requests: Arc<AtomicU64>,
    replies: Arc<AtomicU64>,
}

impl Device {
    /// A device with unit id `unit`, an empty bank of the default size and no faults.
    pub fn new(unit: u8) -> Self {
        Self::with_bank(unit, RegisterBank::new())
    }

    /// A device with unit id `unit` serving `bank`.
    pub fn with_bank(unit: u8, bank: RegisterBank) -> Self {
        Self {
            unit,
            bank,
            faults: Arc::new(Mutex::new(Faults::default())),
            requests: Arc::new(AtomicU64::new(0)),
            replies: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The unit (slave) id.
    pub fn unit(&self) -> u8 {
        self.unit
    }

    /// The register bank (shared).
    pub fn bank(&self) -> &RegisterBank {
        &self.bank
    }

    /// Current fault settings.
    pub fn faults(&self) -> Faults {
        self.faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the fault settings (takes effect with the next request).
    pub fn set_faults(&self, faults: Faults) {
        *self.faults.lock().unwrap_or_else(PoisonError::into_inner) = faults;
    }

    /// Changes the fault settings in place, e.g. `d.update_faults(|f| f.silent = true)`.
    pub fn update_faults(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.faults.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Removes all faults.
    pub fn clear_faults(&self) {
        self.set_faults(Faults::default());
    }

    /// Requests addressed to this unit so far (valid frames, counted even when
    /// the device is silent or answers with an exception; broadcasts included).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Replies sent so far (normal or exception, possibly corrupted by faults).
    pub fn replies(&self) -> u64 {
        self.replies.load(Ordering::Relaxed)
    }

    pub(crate) fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_reply(&self) {
        self.replies.fetch_add(1, Ordering::Relaxed);
    }

    /// Executes `op` against the bank, ignoring faults. `Err` is a Modbus
    /// exception code.
    pub fn execute(&self, op: &Op) -> Result<Reply, u8> {
        self.bank.with(|t| execute_on(t, op))
    }
}

/// Devices by unit id; later duplicates are dropped with a warning.
pub(crate) fn unit_map(devices: Vec<Device>) -> HashMap<u8, Device> {
    let mut map = HashMap::new();
    for d in devices {
        match map.entry(d.unit()) {
            Entry::Vacant(e) => {
                e.insert(d);
            }
            Entry::Occupied(_) => {
                tracing::warn!(unit = d.unit(), "duplicate simulated unit id ignored");
            }
        }
    }
    map
}

/// A decoded request of the supported function codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// 0x01 read coils (address, quantity).
    ReadCoils(u16, u16),
    /// 0x02 read discrete inputs (address, quantity).
    ReadDiscrete(u16, u16),
    /// 0x03 read holding registers (address, quantity).
    ReadHolding(u16, u16),
    /// 0x04 read input registers (address, quantity).
    ReadInput(u16, u16),
    /// 0x05 write single coil.
    WriteCoil(u16, bool),
    /// 0x06 write single register.
    WriteRegister(u16, u16),
    /// 0x0F write multiple coils.
    WriteCoils(u16, Vec<bool>),
    /// 0x10 write multiple registers.
    WriteRegisters(u16, Vec<u16>),
}

impl Op {
    /// Modbus function code of the request.
    pub fn function_code(&self) -> u8 {
        match self {
            Op::ReadCoils(..) => 0x01,
            Op::ReadDiscrete(..) => 0x02,
            Op::ReadHolding(..) => 0x03,
            Op::ReadInput(..) => 0x04,
            Op::WriteCoil(..) => 0x05,
            Op::WriteRegister(..) => 0x06,
            Op::WriteCoils(..) => 0x0F,
            Op::WriteRegisters(..) => 0x10,
        }
    }

    /// Whether the request changes the bank (the only kind executed on broadcast).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Op::WriteCoil(..) | Op::WriteRegister(..) | Op::WriteCoils(..) | Op::WriteRegisters(..)
        )
    }
}

/// The data of a successful reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Bits read (coils or discrete inputs), exactly the requested count.
    Bits(Vec<bool>),
    /// Registers read (holding or input).
    Words(Vec<u16>),
    /// Echo of a single write: address and raw value (0xFF00/0x0000 for coils).
    Single(u16, u16),
    /// Echo of a multiple write: address and quantity.
    Multiple(u16, u16),
}

fn check(t: &Tables, addr: u16, qty: u16, max: u16) -> Result<(), u8> {
    if qty == 0 || qty > max {
        return Err(EX_ILLEGAL_VALUE);
    }
    if !t.in_range(addr, qty) {
        return Err(EX_ILLEGAL_ADDRESS);
    }
    Ok(())
}

fn len_u16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn execute_on(t: &mut Tables, op: &Op) -> Result<Reply, u8> {
    match op {
        Op::ReadCoils(a, q) => {
            check(t, *a, *q, 2000)?;
            Ok(Reply::Bits(t.coil_range(*a, *q)))
        }
        Op::ReadDiscrete(a, q) => {
            check(t, *a, *q, 2000)?;
            Ok(Reply::Bits(t.discrete_range(*a, *q)))
        }
        Op::ReadHolding(a, q) => {
            check(t, *a, *q, 125)?;
            Ok(Reply::Words(t.holding_range(*a, *q)))
        }
        Op::ReadInput(a, q) => {
            check(t, *a, *q, 125)?;
            Ok(Reply::Words(t.input_range(*a, *q)))
        }
        Op::WriteCoil(a, v) => {
            check(t, *a, 1, 1)?;
            t.set_coil(*a, *v);
            Ok(Reply::Single(*a, if *v { 0xFF00 } else { 0 }))
        }
        Op::WriteRegister(a, v) => {
            check(t, *a, 1, 1)?;
            t.set_u16(*a, *v);
            Ok(Reply::Single(*a, *v))
        }
        Op::WriteCoils(a, vs) => {
            let q = len_u16(vs.len());
            check(t, *a, q, 1968)?;
            for (i, v) in (0..q).zip(vs) {
                t.set_coil(a + i, *v);
            }
            Ok(Reply::Multiple(*a, q))
        }
        Op::WriteRegisters(a, vs) => {
            let q = len_u16(vs.len());
            check(t, *a, q, 123)?;
            for (i, v) in (0..q).zip(vs) {
                t.set_u16(a + i, *v);
            }
            Ok(Reply::Multiple(*a, q))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn execute_checks_ranges() {
        let d = Device::new(1);
        assert_eq!(
            d.execute(&Op::ReadHolding(9_999, 2)),
            Err(EX_ILLEGAL_ADDRESS)
        );
        assert_eq!(d.execute(&Op::ReadHolding(0, 126)), Err(EX_ILLEGAL_VALUE));
        assert_eq!(d.execute(&Op::ReadHolding(0, 0)), Err(EX_ILLEGAL_VALUE));
        assert_eq!(
            d.execute(&Op::WriteRegisters(5, vec![1, 2])),
            Ok(Reply::Multiple(5, 2))
        );
        assert_eq!(
            d.execute(&Op::ReadHolding(4, 3)),
            Ok(Reply::Words(vec![0, 1, 2]))
        );
        assert_eq!(
            d.execute(&Op::WriteCoil(9, true)),
            Ok(Reply::Single(9, 0xFF00))
        );
        assert_eq!(
            d.execute(&Op::ReadCoils(8, 3)),
            Ok(Reply::Bits(vec![false, true, false]))
        );
    }
}
