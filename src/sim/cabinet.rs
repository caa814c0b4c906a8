//! Power bank charging cabinet model ([`ChargingCabinet`], 12 slots) and its
//! register map (0-based addresses).

use std::time::Duration;

use rand::seq::SliceRandom;
use rand::Rng;

use super::bank::{RegisterBank, Tables};
use super::model::{chance, event_count, Tick};

/// Holding 0: status, see `STATUS_*`.
pub const HR_STATUS: u16 = 0;
/// Holding 2..3: rentals, u32 high word first.
pub const HR_RENTALS: u16 = 2;
/// Holding 4..5: returns, u32 high word first.
pub const HR_RETURNS: u16 = 4;
/// Holding 10: rental price in cents (writable).
pub const HR_RENTAL_PRICE_CENTS: u16 = 10;
/// Holding 40..47: model string.
pub const HR_MODEL: u16 = 40;
/// Registers of the model string.
pub const MODEL_LEN: u16 = 8;
/// The model string.
pub const MODEL_NAME: &str = "CHGCAB12";
/// Input 0: temperature, i16 in 0.1 °C.
pub const IR_TEMPERATURE: u16 = 0;

/// Number of slots.
pub const SLOTS: u16 = 12;
/// Slot flag: power bank present.
pub const FLAG_PRESENT: u16 = 1 << 0;
/// Slot flag: charging.
pub const FLAG_CHARGING: u16 = 1 << 1;
/// Slot flag: slot fault.
pub const FLAG_FAULT: u16 = 1 << 2;

/// Status: idle.
pub const STATUS_IDLE: u16 = 0;
/// Status: busy (about 1 s after a rental or return).
pub const STATUS_BUSY: u16 = 1;
/// Status: at least one slot has a fault.
pub const STATUS_FAULT: u16 = 2;

/// Initial rental price in cents.
pub const INITIAL_PRICE_CENTS: u16 = 200;
/// Rentals per real minute at event intensity 1.0.
pub const BASE_RENTALS_PER_MIN: f64 = 1.0;
/// Returns per real minute at event intensity 1.0.
pub const BASE_RETURNS_PER_MIN: f64 = 1.0;
/// Battery percent gained per simulated minute while charging.
pub const CHARGE_PER_SIM_MIN: f64 = 1.0;

const BUSY_TIME: Duration = Duration::from_secs(1);
const MEAN_SLOT_FAULT_INTERVAL: Duration = Duration::from_secs(12 * 3600);
const MEAN_TEMPERATURE: f64 = 28.0;
const MIN_RENTABLE_BATTERY: u16 = 20;

/// First register of slot `slot` (1..=12): flags; +1 battery percent;
/// +2..3 power bank id (u32, high word first, 0 when empty).
pub const fn slot_base(slot: u16) -> u16 {
    100 + 4 * (slot - 1)
}

/// State of a charging cabinet model.
#[derive(Debug, Clone)]
pub struct ChargingCabinet {
    busy_left: Duration,
    fault_left: [Option<Duration>; SLOTS as usize],
    charge_acc: [f64; SLOTS as usize],
    temperature: f64,
}

impl Default for ChargingCabinet {
    fn default() -> Self {
        Self {
            busy_left: Duration::ZERO,
            fault_left: [None; SLOTS as usize],
            charge_acc: [0.0; SLOTS as usize],
            temperature: MEAN_TEMPERATURE,
        }
    }
}

impl ChargingCabinet {
    /// Resets the state and writes the initial registers: idle, counters 0,
    /// price 200, 28.0 °C, model "CHGCAB12"; slots 1–5 full (100 %), 6–8
    /// charging at 30/40/50 %, 9–12 empty; bank ids 1001..=1008.
    pub fn init(&mut self, bank: &RegisterBank) {
        *self = Self::default();
        bank.with(|t| {
            t.set_u16(HR_STATUS, STATUS_IDLE);
            t.set_u32_abcd(HR_RENTALS, 0);
            t.set_u32_abcd(HR_RETURNS, 0);
            t.set_u16(HR_RENTAL_PRICE_CENTS, INITIAL_PRICE_CENTS);
            t.set_string(HR_MODEL, MODEL_LEN, MODEL_NAME);
            t.set_input_i16(IR_TEMPERATURE, 280);
            for slot in 1..=SLOTS {
                let base = slot_base(slot);
                let (flags, battery, id) = match slot {
                    1..=5 => (FLAG_PRESENT, 100, 1000 + u32::from(slot)),
                    6..=8 => (
                        FLAG_PRESENT | FLAG_CHARGING,
                        30 + 10 * (slot - 6),
                        1000 + u32::from(slot),
                    ),
                    _ => (0, 0, 0),
                };
                t.set_u16(base, flags);
                t.set_u16(base + 1, battery);
                t.set_u32_abcd(base + 2, id);
            }
        });
    }

    /// Advances the model by `tick`.
    pub fn step<R: Rng + ?Sized>(&mut self, bank: &RegisterBank, tick: Tick, rng: &mut R) {
        bank.with(|t| self.step_tables(t, tick, rng));
    }

    fn step_tables<R: Rng + ?Sized>(&mut self, t: &mut Tables, tick: Tick, rng: &mut R) {
        let dt = tick.dt;
        let sim_min = tick.sim_dt.as_secs_f64() / 60.0;
        self.busy_left = self.busy_left.saturating_sub(dt);

        // Slot faults come and go; charging follows presence and battery.
        let mut charging = 0u32;
        for slot in 1..=SLOTS {
            let i = usize::from(slot - 1);
            let base = slot_base(slot);
            let mut flags = t.holding(base);
            match self.fault_left[i] {
                Some(left) if left <= dt => {
                    self.fault_left[i] = None;
                    flags &= !FLAG_FAULT;
                }
                Some(left) => self.fault_left[i] = Some(left - dt),
                None if chance(dt, MEAN_SLOT_FAULT_INTERVAL, rng) => {
                    self.fault_left[i] = Some(Duration::from_secs(rng.gen_range(30..=120)));
                    flags |= FLAG_FAULT;
                }
                None => {}
            }
            let mut battery = t.holding(base + 1).min(100);
            let present = flags & FLAG_PRESENT != 0;
            let faulty = flags & FLAG_FAULT != 0;
            if present && !faulty && battery < 100 {
                charging += 1;
                flags |= FLAG_CHARGING;
                self.charge_acc[i] += CHARGE_PER_SIM_MIN * sim_min;
                let whole = self.charge_acc[i].floor();
                self.charge_acc[i] -= whole;
                battery = (f64::from(battery) + whole).min(100.0) as u16;
                if battery >= 100 {
                    flags &= !FLAG_CHARGING;
                    self.charge_acc[i] = 0.0;
                }
            } else {
                flags &= !FLAG_CHARGING;
            }
            t.set_u16(base, flags);
            t.set_u16(base + 1, battery);
        }

        // Rentals take a present, healthy, charged enough bank.
        let minutes = dt.as_secs_f64() / 60.0;
        for _ in 0..event_count(BASE_RENTALS_PER_MIN * tick.factor * minutes, rng) {
            let candidates: Vec<u16> = (1..=SLOTS)
                .filter(|&s| {
                    let f = t.holding(slot_base(s));
                    f & FLAG_PRESENT != 0
                        && f & FLAG_FAULT == 0
                        && t.holding(slot_base(s) + 1) >= MIN_RENTABLE_BATTERY
                })
                .collect();
            let Some(&slot) = candidates.choose(rng) else {
                break;
            };
            let base = slot_base(slot);
            t.set_u16(base, t.holding(base) & FLAG_FAULT);
            t.set_u16(base + 1, 0);
            t.set_u32_abcd(base + 2, 0);
            self.charge_acc[usize::from(slot - 1)] = 0.0;
            t.set_u32_abcd(HR_RENTALS, t.get_u32_abcd(HR_RENTALS).wrapping_add(1));
            self.busy_left = BUSY_TIME;
        }

        // Returns fill an empty, healthy slot.
        for _ in 0..event_count(BASE_RETURNS_PER_MIN * tick.factor * minutes, rng) {
            let candidates: Vec<u16> = (1..=SLOTS)
                .filter(|&s| t.holding(slot_base(s)) & (FLAG_PRESENT | FLAG_FAULT) == 0)
                .collect();
            let Some(&slot) = candidates.choose(rng) else {
                break;
            };
            let base = slot_base(slot);
            t.set_u16(base, FLAG_PRESENT | FLAG_CHARGING);
            t.set_u16(base + 1, rng.gen_range(5..=60));
            t.set_u32_abcd(base + 2, rng.gen_range(100_000..=99_999_999));
            t.set_u32_abcd(HR_RETURNS, t.get_u32_abcd(HR_RETURNS).wrapping_add(1));
            self.busy_left = BUSY_TIME;
        }

        let any_fault = (1..=SLOTS).any(|s| t.holding(slot_base(s)) & FLAG_FAULT != 0);
        let status = if any_fault {
            STATUS_FAULT
        } else if !self.busy_left.is_zero() {
            STATUS_BUSY
        } else {
            STATUS_IDLE
        };
        t.set_u16(HR_STATUS, status);

        // Temperature: around 28 °C, a little warmer per charging bank.
        let target = MEAN_TEMPERATURE + 0.2 * f64::from(charging);
        self.temperature += (target - self.temperature) * (0.05 * sim_min).min(1.0)
            + rng.gen_range(-1.0..=1.0) * 0.05 * sim_min.sqrt();
        t.set_input_i16(IR_TEMPERATURE, (self.temperature * 10.0).round() as i16);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn init_and_charging() {
        let bank = RegisterBank::new();
        let mut m = ChargingCabinet::default();
        m.init(&bank);
        assert_eq!(bank.get_string(HR_MODEL, MODEL_LEN), MODEL_NAME);
        assert_eq!(bank.holding(HR_RENTAL_PRICE_CENTS), 200);
        assert_eq!(bank.holding(slot_base(6)), FLAG_PRESENT | FLAG_CHARGING);
        assert_eq!(bank.get_u32_abcd(slot_base(6) + 2), 1006);
        let mut rng = StdRng::seed_from_u64(5);
        // 10 simulated minutes with no traffic: slot 6 goes 30 -> 40 %.
        let tick = Tick {
            dt: Duration::from_millis(100),
            sim_dt: Duration::from_secs(6),
            factor: 0.0,
        };
        for _ in 0..100 {
            m.step(&bank, tick, &mut rng);
        }
        let b6 = bank.holding(slot_base(6) + 1);
        assert!((39..=40).contains(&b6), "battery {b6}");
        // Long enough: full and no longer charging.
        for _ in 0..1_000 {
            m.step(&bank, tick, &mut rng);
        }
        assert_eq!(bank.holding(slot_base(8) + 1), 100);
        assert_eq!(bank.holding(slot_base(8)) & FLAG_CHARGING, 0);
    }

    #[test]
    fn rentals_and_returns_count() {
        let bank = RegisterBank::new();
        let mut m = ChargingCabinet::default();
        m.init(&bank);
        let mut rng = StdRng::seed_from_u64(9);
        for _ in 0..30 {
            m.step(&bank, Tick::new(Duration::from_secs(60), 1.0), &mut rng);
        }
        let rentals = bank.get_u32_abcd(HR_RENTALS);
        let returns = bank.get_u32_abcd(HR_RETURNS);
        assert!(rentals > 0 && returns > 0, "{rentals} {returns}");
        let present = (1..=SLOTS)
            .filter(|&s| bank.holding(slot_base(s)) & FLAG_PRESENT != 0)
            .count() as i64;
        assert_eq!(present, 8 - i64::from(rentals) + i64::from(returns));
        for s in 1..=SLOTS {
            let base = slot_base(s);
            let empty = bank.holding(base) & FLAG_PRESENT == 0;
            assert_eq!(empty, bank.get_u32_abcd(base + 2) == 0, "slot {s}");
        }
    }
}
