//! The four Modbus data tables of one simulated device ([`RegisterBank`]).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Number of addresses per table of a bank made by [`RegisterBank::new`].
///
/// Requests touching addresses at or beyond the table size are answered with
/// exception 0x02 (illegal data address).
pub const DEFAULT_TABLE_SIZE: u16 = 10_000;

/// The plain tables of a device; reached through [`RegisterBank::with`].
///
/// Setters ignore addresses outside the tables; getters return 0 / `false`
/// there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    holding: Vec<u16>,
    input: Vec<u16>,
    coils: Vec<bool>,
    discrete: Vec<bool>,
}

impl Tables {
    /// Zeroed tables of `size` addresses each.
    pub fn new(size: u16) -> Self {
        let n = usize::from(size);
        Self {
            holding: vec![0; n],
            input: vec![0; n],
            coils: vec![false; n],
            discrete: vec![false; n],
        }
    }

    /// Number of addresses in each table.
    pub fn size(&self) -> u16 {
        // The constructor takes a u16, so the length always fits.
        u16::try_from(self.holding.len()).unwrap_or(u16::MAX)
    }

    /// Whether `count` addresses starting at `addr` are all inside the tables.
    pub fn in_range(&self, addr: u16, count: u16) -> bool {
        usize::from(addr) + usize::from(count) <= self.holding.len()
    }

    /// Holding register `addr`.
    pub fn holding(&self, addr: u16) -> u16 {
        self.holding.get(usize::from(addr)).copied().unwrap_or(0)
    }

    /// Input register `addr`.
    pub fn input(&self, addr: u16) -> u16 {
        self.input.get(usize::from(addr)).copied().unwrap_or(0)
    }

    /// Coil `addr`.
    pub fn coil(&self, addr: u16) -> bool {
        self.coils.get(usize::from(addr)).copied().unwrap_or(false)
    }

    /// Discrete input `addr`.
    pub fn discrete(&self, addr: u16) -> bool {
        self.discrete
            .get(usize::from(addr))
            .copied()
            .unwrap_or(false)
    }

    /// Sets holding register `addr`.
    pub fn set_u16(&mut self, addr: u16, v: u16) {
        if let Some(r) = self.holding.get_mut(usize::from(addr)) {
            *r = v;
        }
    }

    /// Sets input register `addr`.
    pub fn set_input(&mut self, addr: u16, v: u16) {
        if let Some(r) = self.input.get_mut(usize::from(addr)) {
            *r = v;
        }
    }

    /// Sets input register `addr` to a signed value (two's complement).
    pub fn set_input_i16(&mut self, addr: u16, v: i16) {
        self.set_input(addr, v as u16);
    }

    /// Sets holding registers `addr`, `addr + 1` to `v`, high word first (ABCD).
    pub fn set_u32_abcd(&mut self, addr: u16, v: u32) {
        self.set_u16(addr, (v >> 16) as u16);
        self.set_u16(addr.wrapping_add(1), v as u16);
    }

    /// Reads holding registers `addr`, `addr + 1` as a u32, high word first (ABCD).
    pub fn get_u32_abcd(&self, addr: u16) -> u32 {
        (u32::from(self.holding(addr)) << 16) | u32::from(self.holding(addr.wrapping_add(1)))
    }

    /// Sets input registers `addr`, `addr + 1` to `v`, high word first (ABCD).
    pub fn set_input_u32_abcd(&mut self, addr: u16, v: u32) {
        self.set_input(addr, (v >> 16) as u16);
        self.set_input(addr.wrapping_add(1), v as u16);
    }

    /// Writes `s` into `len_regs` holding registers from `addr`: two bytes per
    /// register, high byte first, NUL padded, cut to `2 * len_regs` bytes.
    pub fn set_string(&mut self, addr: u16, len_regs: u16, s: &str) {
        let bytes = s.as_bytes();
        for i in 0..len_regs {
            let hi = bytes.get(usize::from(i) * 2).copied().unwrap_or(0);
            let lo = bytes.get(usize::from(i) * 2 + 1).copied().unwrap_or(0);
            self.set_u16(addr.wrapping_add(i), u16::from_be_bytes([hi, lo]));
        }
    }

    /// Reads a string written by [`Tables::set_string`], stopping at the first NUL.
    pub fn get_string(&self, addr: u16, len_regs: u16) -> String {
        let bytes: Vec<u8> = (0..len_regs)
            .flat_map(|i| self.holding(addr.wrapping_add(i)).to_be_bytes())
            .take_while(|b| *b != 0)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Sets or clears bit `bit` (0 = least significant) of holding register `addr`.
    pub fn set_bit(&mut self, addr: u16, bit: u8, on: bool) {
        let mask = 1u16 << (bit & 15);
        let v = self.holding(addr);
        self.set_u16(addr, if on { v | mask } else { v & !mask });
    }

    /// Bit `bit` (0 = least significant) of holding register `addr`.
    pub fn get_bit(&self, addr: u16, bit: u8) -> bool {
        self.holding(addr) & (1u16 << (bit & 15)) != 0
    }

    /// Sets coil `addr`.
    pub fn set_coil(&mut self, addr: u16, on: bool) {
        if let Some(c) = self.coils.get_mut(usize::from(addr)) {
            *c = on;
        }
    }

    /// Sets discrete input `addr`.
    pub fn set_discrete(&mut self, addr: u16, on: bool) {
        if let Some(c) = self.discrete.get_mut(usize::from(addr)) {
            *c = on;
        }
    }

    /// `count` holding registers from `addr` (zeros outside the table).
    pub fn holding_range(&self, addr: u16, count: u16) -> Vec<u16> {
        (0..count)
            .map(|i| self.holding(addr.wrapping_add(i)))
            .collect()
    }

    /// `count` input registers from `addr` (zeros outside the table).
    pub fn input_range(&self, addr: u16, count: u16) -> Vec<u16> {
        (0..count)
            .map(|i| self.input(addr.wrapping_add(i)))
            .collect()
    }

    /// `count` coils from `addr` (`false` outside the table).
    pub fn coil_range(&self, addr: u16, count: u16) -> Vec<bool> {
        (0..count)
            .map(|i| self.coil(addr.wrapping_add(i)))
            .collect()
    }

    /// `count` discrete inputs from `addr` (`false` outside the table).
    pub fn discrete_range(&self, addr: u16, count: u16) -> Vec<bool> {
        (0..count)
            .map(|i| self.discrete(addr.wrapping_add(i)))
            .collect()
    }
}

/// Shared, thread-safe tables of one device (cheap to clone; clones share
/// the same data).
///
/// Every helper takes the (std) lock once; use [`RegisterBank::with`] to make
/// several changes atomically. The lock is never held across an `.await`.
#[derive(Debug, Clone)]
pub struct RegisterBank {
    inner: Arc<Mutex<Tables>>,
}

impl Default for RegisterBank {
    fn default() -> Self {
        Self::new()
    }
}

impl RegisterBank {
    /// Zeroed bank of [`DEFAULT_TABLE_SIZE`] addresses per table.
    pub fn new() -> Self {
        Self::with_size(DEFAULT_TABLE_SIZE)
    }

    /// Zeroed bank of `size` addresses per table.
    pub fn with_size(size: u16) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Tables::new(size))),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` with the tables locked (keep it short and synchronous).
    pub fn with<R>(&self, f: impl FnOnce(&mut Tables) -> R) -> R {
        f(&mut self.lock())
    }

    /// A copy of all tables.
    pub fn snapshot(&self) -> Tables {
        self.lock().clone()
    }

    /// Number of addresses in each table.
    pub fn size(&self) -> u16 {
        self.lock().size()
    }

    /// See [`Tables::set_u16`].
    pub fn set_u16(&self, addr: u16, v: u16) {
        self.lock().set_u16(addr, v);
    }

    /// See [`Tables::set_input`].
    pub fn set_input(&self, addr: u16, v: u16) {
        self.lock().set_input(addr, v);
    }

    /// See [`Tables::set_u32_abcd`].
    pub fn set_u32_abcd(&self, addr: u16, v: u32) {
        self.lock().set_u32_abcd(addr, v);
    }

    /// See [`Tables::set_string`].
    pub fn set_string(&self, addr: u16, len_regs: u16, s: &str) {
        self.lock().set_string(addr, len_regs, s);
    }

    /// See [`Tables::set_bit`].
    pub fn set_bit(&self, addr: u16, bit: u8, on: bool) {
        self.lock().set_bit(addr, bit, on);
    }

    /// See [`Tables::set_coil`].
    pub fn set_coil(&self, addr: u16, on: bool) {
        self.lock().set_coil(addr, on);
    }

    /// See [`Tables::set_discrete`].
    pub fn set_discrete(&self, addr: u16, on: bool) {
        self.lock().set_discrete(addr, on);
    }

    /// See [`Tables::holding`].
    pub fn holding(&self, addr: u16) -> u16 {
        self.lock().holding(addr)
    }

    /// See [`Tables::input`].
    pub fn input(&self, addr: u16) -> u16 {
        self.lock().input(addr)
    }

    /// See [`Tables::coil`].
    pub fn coil(&self, addr: u16) -> bool {
        self.lock().coil(addr)
    }

    /// See [`Tables::discrete`].
    pub fn discrete(&self, addr: u16) -> bool {
        self.lock().discrete(addr)
    }

    /// See [`Tables::get_u32_abcd`].
    pub fn get_u32_abcd(&self, addr: u16) -> u32 {
        self.lock().get_u32_abcd(addr)
    }

    /// See [`Tables::get_string`].
    pub fn get_string(&self, addr: u16, len_regs: u16) -> String {
        self.lock().get_string(addr, len_regs)
    }

    /// See [`Tables::get_bit`].
    pub fn get_bit(&self, addr: u16, bit: u8) -> bool {
        self.lock().get_bit(addr, bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_round_trip() {
        let b = RegisterBank::new();
        b.set_u32_abcd(0, 0x1234_5678);
        assert_eq!(b.holding(0), 0x1234);
        assert_eq!(b.holding(1), 0x5678);
        assert_eq!(b.get_u32_abcd(0), 0x1234_5678);
        b.set_string(40, 8, "BAGDISP1");
        assert_eq!(b.holding(40), u16::from_be_bytes(*b"BA"));
        assert_eq!(b.get_string(40, 8), "BAGDISP1");
        b.set_string(50, 4, "abc");
        assert_eq!(b.holding(51), u16::from_be_bytes([b'c', 0]));
        assert_eq!(b.holding(52), 0);
        b.set_bit(7, 2, true);
        assert_eq!(b.holding(7), 4);
        assert!(b.get_bit(7, 2));
        b.set_bit(7, 2, false);
        assert_eq!(b.holding(7), 0);
        b.set_coil(3, true);
        b.set_discrete(4, true);
        assert!(b.coil(3) && b.discrete(4) && !b.coil(4));
        // Out of range: ignored / zero.
        b.set_u16(DEFAULT_TABLE_SIZE, 9);
        assert_eq!(b.holding(DEFAULT_TABLE_SIZE), 0);
        assert!(b.with(|t| t.in_range(9_990, 10) && !t.in_range(9_991, 10)));
    }
}
