//! Bag dispenser model ([`BagDispenser`]) and its register map (0-based
//! addresses).

use std::time::Duration;

use rand::Rng;

use super::bank::{RegisterBank, Tables};
use super::model::{chance, event_count, Tick};

/// Holding 0..1: bags dispensed, u32 high word first.
pub const HR_BAGS_DISPENSED: u16 = 0;
/// Holding 2: bags in stock.
pub const HR_STOCK: u16 = 2;
/// Holding 3: status, see `STATUS_*`.
pub const HR_STATUS: u16 = 3;
/// Holding 4: fault code (0 none, [`FAULT_JAM`] during a jam).
pub const HR_FAULT_CODE: u16 = 4;
/// Holding 10: price per bag in cents (writable).
pub const HR_PRICE_CENTS: u16 = 10;
/// Holding 40..47: model string.
pub const HR_MODEL: u16 = 40;
/// Registers of the model string.
pub const MODEL_LEN: u16 = 8;
/// The model string.
pub const MODEL_NAME: &str = "BAGDISP1";
/// Coil 0: dispensing enabled (no dispenses while false).
pub const COIL_ENABLED: u16 = 0;
/// Discrete 0: door open (during refills).
pub const DI_DOOR_OPEN: u16 = 0;
/// Discrete 1: jam.
pub const DI_JAM: u16 = 1;
/// Input 0: temperature, i16 in 0.1 °C.
pub const IR_TEMPERATURE: u16 = 0;
/// Input 1: supply voltage, u16 in 0.01 V.
pub const IR_SUPPLY_VOLTAGE: u16 = 1;

/// Status: idle.
pub const STATUS_IDLE: u16 = 0;
/// Status: dispensing (about 1.5 s after each dispense).
pub const STATUS_DISPENSING: u16 = 1;
/// Status: fault (jam).
pub const STATUS_FAULT: u16 = 2;
/// Fault code of a jam.
pub const FAULT_JAM: u16 = 17;

/// Full stock after a refill.
pub const FULL_STOCK: u16 = 500;
/// Initial price in cents.
pub const INITIAL_PRICE_CENTS: u16 = 10;
/// Dispenses per real minute at event intensity 1.0.
pub const BASE_DISPENSES_PER_MIN: f64 = 4.0;
/// Probability that a dispense jams the machine.
pub const JAM_PROBABILITY: f64 = 0.004;

const DISPENSE_TIME: Duration = Duration::from_millis(1500);
const MEAN_TEMPERATURE: f64 = 22.0;
const NOMINAL_VOLTAGE: u16 = 2400;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Refill {
    None,
    /// Stock ran out (or is low); someone comes after this long.
    Waiting(Duration),
    /// Door open, refilling for this long.
    DoorOpen(Duration),
}

/// State of a bag dispenser model.
#[derive(Debug, Clone)]
pub struct BagDispenser {
    dispensing_left: Duration,
    jam_left: Option<Duration>,
    refill: Refill,
    temperature: f64,
}

impl Default for BagDispenser {
    fn default() -> Self {
        Self {
            dispensing_left: Duration::ZERO,
            jam_left: None,
            refill: Refill::None,
            temperature: MEAN_TEMPERATURE,
        }
    }
}

fn rand_secs<R: Rng + ?Sized>(rng: &mut R, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.gen_range(lo * 1000..=hi * 1000))
}

impl BagDispenser {
    /// Resets the state and writes the initial registers: counter 0, stock 500,
    /// idle, price 10, enabled, 22.0 °C, 24.00 V, model "BAGDISP1".
    pub fn init(&mut self, bank: &RegisterBank) {
        *self = Self::default();
        bank.with(|t| {
            t.set_u32_abcd(HR_BAGS_DISPENSED, 0);
            t.set_u16(HR_STOCK, FULL_STOCK);
            t.set_u16(HR_STATUS, STATUS_IDLE);
            t.set_u16(HR_FAULT_CODE, 0);
            t.set_u16(HR_PRICE_CENTS, INITIAL_PRICE_CENTS);
            t.set_string(HR_MODEL, MODEL_LEN, MODEL_NAME);
            t.set_coil(COIL_ENABLED, true);
            t.set_discrete(DI_DOOR_OPEN, false);
            t.set_discrete(DI_JAM, false);
            t.set_input_i16(IR_TEMPERATURE, 220);
            t.set_input(IR_SUPPLY_VOLTAGE, NOMINAL_VOLTAGE);
        });
    }

    /// Advances the model by `tick`.
    pub fn step<R: Rng + ?Sized>(&mut self, bank: &RegisterBank, tick: Tick, rng: &mut R) {
        bank.with(|t| self.step_tables(t, tick, rng));
    }

    fn step_tables<R: Rng + ?Sized>(&mut self, t: &mut Tables, tick: Tick, rng: &mut R) {
        let dt = tick.dt;
        self.dispensing_left = self.dispensing_left.saturating_sub(dt);

        // Jam clears after a while.
        if let Some(left) = self.jam_left {
            if left <= dt {
                self.jam_left = None;
                t.set_discrete(DI_JAM, false);
                t.set_u16(HR_FAULT_CODE, 0);
            } else {
                self.jam_left = Some(left - dt);
            }
        }

        // Refills: after running out, or occasionally when low.
        let mut stock = t.holding(HR_STOCK);
        self.refill = match self.refill {
            Refill::None if stock == 0 => Refill::Waiting(rand_secs(rng, 20, 90)),
            Refill::None if stock < 100 && chance(dt, Duration::from_secs(600), rng) => {
                Refill::Waiting(rand_secs(rng, 0, 5))
            }
            Refill::Waiting(left) if left <= dt => {
                t.set_discrete(DI_DOOR_OPEN, true);
                Refill::DoorOpen(rand_secs(rng, 8, 20))
            }
            Refill::Waiting(left) => Refill::Waiting(left - dt),
            Refill::DoorOpen(left) if left <= dt => {
                t.set_discrete(DI_DOOR_OPEN, false);
                stock = FULL_STOCK;
                t.set_u16(HR_STOCK, stock);
                Refill::None
            }
            Refill::DoorOpen(left) => Refill::DoorOpen(left - dt),
            r @ Refill::None => r,
        };

        // Dispenses.
        let can_dispense = t.coil(COIL_ENABLED)
            && self.jam_left.is_none()
            && !matches!(self.refill, Refill::DoorOpen(_))
            && stock > 0;
        if can_dispense {
            let minutes = dt.as_secs_f64() / 60.0;
            let n = event_count(BASE_DISPENSES_PER_MIN * tick.factor * minutes, rng);
            for _ in 0..n {
                if stock == 0 {
                    break;
                }
                stock -= 1;
                t.set_u16(HR_STOCK, stock);
                let count = t.get_u32_abcd(HR_BAGS_DISPENSED).wrapping_add(1);
                t.set_u32_abcd(HR_BAGS_DISPENSED, count);
                self.dispensing_left = DISPENSE_TIME;
                if rng.gen_bool(JAM_PROBABILITY) {
                    self.jam_left = Some(rand_secs(rng, 5, 20));
                    t.set_discrete(DI_JAM, true);
                    t.set_u16(HR_FAULT_CODE, FAULT_JAM);
                    break;
                }
            }
        }

        let status = if self.jam_left.is_some() {
            STATUS_FAULT
        } else if !self.dispensing_left.is_zero() {
            STATUS_DISPENSING
        } else {
            STATUS_IDLE
        };
        t.set_u16(HR_STATUS, status);

        // Temperature: mean-reverting random walk on simulated time.
        let sim_min = tick.sim_dt.as_secs_f64() / 60.0;
        self.temperature += (MEAN_TEMPERATURE - self.temperature) * (0.02 * sim_min).min(1.0)
            + rng.gen_range(-1.0..=1.0) * 0.05 * sim_min.sqrt();
        t.set_input_i16(IR_TEMPERATURE, (self.temperature * 10.0).round() as i16);
        let noise: i16 = rng.gen_range(-5..=5);
        t.set_input(
            IR_SUPPLY_VOLTAGE,
            NOMINAL_VOLTAGE.saturating_add_signed(noise),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn dispenses_at_full_traffic() {
        let bank = RegisterBank::new();
        let mut m = BagDispenser::default();
        m.init(&bank);
        assert_eq!(bank.get_string(HR_MODEL, MODEL_LEN), MODEL_NAME);
        assert_eq!(bank.holding(HR_STOCK), 500);
        let mut rng = StdRng::seed_from_u64(7);
        m.step(&bank, Tick::new(Duration::from_secs(60), 1.0), &mut rng);
        let n = bank.get_u32_abcd(HR_BAGS_DISPENSED);
        assert!(n >= 1, "dispensed {n}");
        assert_eq!(u32::from(bank.holding(HR_STOCK)) + n, 500);
        // Disabled: nothing more.
        bank.set_coil(COIL_ENABLED, false);
        m.step(&bank, Tick::new(Duration::from_secs(600), 1.0), &mut rng);
        assert_eq!(bank.get_u32_abcd(HR_BAGS_DISPENSED), n);
    }

    #[test]
    fn refills_after_running_out() {
        let bank = RegisterBank::new();
        let mut m = BagDispenser::default();
        m.init(&bank);
        bank.set_u16(HR_STOCK, 0);
        let mut rng = StdRng::seed_from_u64(1);
        let mut saw_door = false;
        for _ in 0..2_000 {
            m.step(&bank, Tick::new(Duration::from_millis(100), 0.0), &mut rng);
            saw_door |= bank.discrete(DI_DOOR_OPEN);
        }
        assert!(saw_door);
        assert_eq!(bank.holding(HR_STOCK), FULL_STOCK);
        assert!(!bank.discrete(DI_DOOR_OPEN));
        let temp = bank.input(IR_TEMPERATURE) as i16;
        assert!((200..=240).contains(&temp), "temperature {temp}");
    }

    #[test]
    fn jam_sets_fault_and_clears() {
        let bank = RegisterBank::new();
        let mut m = BagDispenser::default();
        m.init(&bank);
        let mut rng = StdRng::seed_from_u64(3);
        // Dispense until a jam happens (probability ~0.4% per bag).
        let mut jammed = false;
        for _ in 0..1_000 {
            bank.set_u16(HR_STOCK, FULL_STOCK);
            m.step(&bank, Tick::new(Duration::from_secs(60), 1.0), &mut rng);
            if bank.discrete(DI_JAM) {
                jammed = true;
                break;
            }
        }
        assert!(jammed);
        assert_eq!(bank.holding(HR_STATUS), STATUS_FAULT);
        assert_eq!(bank.holding(HR_FAULT_CODE), FAULT_JAM);
        let before = bank.get_u32_abcd(HR_BAGS_DISPENSED);
        m.step(&bank, Tick::new(Duration::from_secs(1), 1.0), &mut rng);
        assert_eq!(bank.get_u32_abcd(HR_BAGS_DISPENSED), before);
        m.step(&bank, Tick::new(Duration::from_secs(30), 0.0), &mut rng);
        assert!(!bank.discrete(DI_JAM));
        assert_eq!(bank.holding(HR_FAULT_CODE), 0);
    }
}
