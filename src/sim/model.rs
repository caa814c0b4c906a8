//! Behaviour models that change a device's registers over time ([`Model`],
//! [`run_model`]), driven by a day/night traffic curve ([`traffic_factor`])
//! on an optionally compressed clock ([`TimeScale`]).

use std::f64::consts::PI;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use super::bag::BagDispenser;
use super::bank::RegisterBank;
use super::cabinet::ChargingCabinet;
use super::device::Device;

/// Traffic factor at night (0:00–6:00).
pub const NIGHT_FACTOR: f64 = 0.1;

/// Real time between two model steps in [`run_model`].
pub const TICK: Duration = Duration::from_millis(100);

const DAY_SECS: f64 = 86_400.0;

/// Relative traffic at `time_of_day` (since midnight, taken modulo 24 h), in
/// [0.1, 1.0]: 0.1 from 0:00 to 6:00, rising smoothly (half cosine) to 1.0 at
/// 10:00, 1.0 until 16:00, falling smoothly back to 0.1 at 24:00.
pub fn traffic_factor(time_of_day: Duration) -> f64 {
    let h = (time_of_day.as_secs_f64() / 3600.0).rem_euclid(24.0);
    let smooth = |x: f64| 0.5 - 0.5 * (PI * x).cos();
    let v = if h < 6.0 {
        0.0
    } else if h < 10.0 {
        smooth((h - 6.0) / 4.0)
    } else if h < 16.0 {
        1.0
    } else {
        smooth(1.0 - (h - 16.0) / 8.0)
    };
    NIGHT_FACTOR + (1.0 - NIGHT_FACTOR) * v
}

/// Maps real time to simulated time of day and event intensity.
///
/// Event rates (dispenses, rentals, returns) are per *real* minute:
/// `base × rate × traffic_factor(simulated time of day)`, so compressing the
/// day shows the whole curve without flooding the bus. Slow physical
/// processes (battery charging, temperature drift) run on simulated time;
/// short transients (status "dispensing", jams, refills, door open) on real
/// time so that a poller can see them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeScale {
    /// Real duration of one simulated 24 h day (24 h = real time).
    pub day: Duration,
    /// Multiplier of the base event rates.
    pub rate: f64,
    /// Simulated time of day when the model starts.
    pub start: Duration,
}

impl Default for TimeScale {
    fn default() -> Self {
        Self::realtime()
    }
}

impl TimeScale {
    /// Real-time day starting at the current UTC time of day, rate 1.
    pub fn realtime() -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            % 86_400;
        Self {
            day: Duration::from_secs(86_400),
            rate: 1.0,
            start: Duration::from_secs(now),
        }
    }

    /// One simulated day per `day` of real time, starting at the current UTC
    /// time of day, rate 1 (e.g. `--day 10m`).
    pub fn compressed(day: Duration) -> Self {
        Self {
            day,
            ..Self::realtime()
        }
    }

    /// Same scale with event rate multiplier `rate`.
    pub fn with_rate(self, rate: f64) -> Self {
        Self { rate, ..self }
    }

    /// Same scale starting at simulated time of day `start`.
    pub fn starting_at(self, start: Duration) -> Self {
        Self { start, ..self }
    }

    /// Simulated seconds per real second.
    pub fn speed(&self) -> f64 {
        DAY_SECS / self.day.as_secs_f64().max(1e-3)
    }

    /// Simulated time elapsed during `real` real time.
    pub fn sim_elapsed(&self, real: Duration) -> Duration {
        Duration::from_secs_f64(real.as_secs_f64() * self.speed())
    }

    /// Simulated time of day (since midnight) after `real_elapsed` real time.
    pub fn time_of_day(&self, real_elapsed: Duration) -> Duration {
        let s = self.start.as_secs_f64() + real_elapsed.as_secs_f64() * self.speed();
        Duration::from_secs_f64(s.rem_euclid(DAY_SECS))
    }

    /// Event intensity after `real_elapsed`: `rate × traffic_factor(time of day)`.
    pub fn factor_at(&self, real_elapsed: Duration) -> f64 {
        self.rate * traffic_factor(self.time_of_day(real_elapsed))
    }
}

/// Time passed since the previous model step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tick {
    /// Real time elapsed (drives events and short transients).
    pub dt: Duration,
    /// Simulated time elapsed (drives charging and temperature drift).
    pub sim_dt: Duration,
    /// Event intensity: multiplies the base event rates (per real minute).
    pub factor: f64,
}

impl Tick {
    /// A step of `dt` with simulated time equal to real time.
    pub fn new(dt: Duration, factor: f64) -> Self {
        Self {
            dt,
            sim_dt: dt,
            factor,
        }
    }
}

/// Number of events in a step with `expected` events on average:
/// `floor(expected)` plus one more with probability `fract(expected)`.
pub(crate) fn event_count<R: Rng + ?Sized>(expected: f64, rng: &mut R) -> u32 {
    if !expected.is_finite() || expected <= 0.0 {
        return 0;
    }
    let whole = expected.floor();
    let extra = u32::from(rng.gen_bool((expected - whole).clamp(0.0, 1.0)));
    (whole.min(f64::from(u32::MAX / 2)) as u32) + extra
}

/// Whether an event with mean interval `mean` happens within `dt`.
pub(crate) fn chance<R: Rng + ?Sized>(dt: Duration, mean: Duration, rng: &mut R) -> bool {
    let p = 1.0 - (-dt.as_secs_f64() / mean.as_secs_f64().max(1e-9)).exp();
    rng.gen_bool(p.clamp(0.0, 1.0))
}

/// A behaviour model with its private state.
#[derive(Debug, Clone)]
pub enum Model {
    /// Bag dispenser, see [`super::bag`] for the register map.
    BagDispenser(BagDispenser),
    /// Charging cabinet with 12 slots, see [`super::cabinet`] for the register map.
    ChargingCabinet(Box<ChargingCabinet>),
    /// Registers only change when clients or tests write them.
    Static,
}

impl Model {
    /// A bag dispenser model.
    pub fn bag_dispenser() -> Self {
        Model::BagDispenser(BagDispenser::default())
    }

    /// A charging cabinet model.
    pub fn charging_cabinet() -> Self {
        Model::ChargingCabinet(Box::default())
    }

    /// Short name ("bag_dispenser", "charging_cabinet", "static").
    pub fn name(&self) -> &'static str {
        match self {
            Model::BagDispenser(_) => "bag_dispenser",
            Model::ChargingCabinet(_) => "charging_cabinet",
            Model::Static => "static",
        }
    }

    /// Writes the initial register values (deterministic) and resets the state.
    pub fn init(&mut self, bank: &RegisterBank) {
        match self {
            Model::BagDispenser(m) => m.init(bank),
            Model::ChargingCabinet(m) => m.init(bank),
            Model::Static => {}
        }
    }

    /// Advances the model by one step. Registers are read back each step, so
    /// values written by clients or tests are taken into account.
    pub fn step<R: Rng + ?Sized>(&mut self, bank: &RegisterBank, tick: Tick, rng: &mut R) {
        match self {
            Model::BagDispenser(m) => m.step(bank, tick, rng),
            Model::ChargingCabinet(m) => m.step(bank, tick, rng),
            Model::Static => {}
        }
    }
}

/// Steps `model` on `device`'s bank every [`TICK`] of real time until
/// `shutdown` is cancelled. Does not call [`Model::init`]: do that first.
pub async fn run_model(
    device: Device,
    mut model: Model,
    timescale: TimeScale,
    shutdown: CancellationToken,
) {
    let mut rng = StdRng::from_entropy();
    let start = tokio::time::Instant::now();
    let mut last = start;
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let now = tokio::time::Instant::now();
        let dt = now - last;
        last = now;
        let tick = Tick {
            dt,
            sim_dt: timescale.sim_elapsed(dt),
            factor: timescale.factor_at(now - start),
        };
        model.step(device.bank(), tick, &mut rng);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(hours: f64) -> Duration {
        Duration::from_secs_f64(hours * 3600.0)
    }

    #[test]
    fn traffic_curve_has_tenfold_swing() {
        assert!(traffic_factor(h(3.0)) * 10.0 <= traffic_factor(h(13.0)));
        assert!((traffic_factor(h(3.0)) - 0.1).abs() < 1e-12);
        assert!((traffic_factor(h(13.0)) - 1.0).abs() < 1e-12);
        // Smooth and bounded over the whole day, continuous across midnight.
        let mut prev = traffic_factor(h(0.0));
        for m in 1..=24 * 60 {
            let f = traffic_factor(Duration::from_secs(m * 60));
            assert!((0.1..=1.0).contains(&f));
            assert!((f - prev).abs() < 0.02, "jump at minute {m}");
            prev = f;
        }
        let mid = traffic_factor(h(8.0));
        assert!(mid > 0.3 && mid < 0.8);
    }

    #[test]
    fn bag_model_dispenses_at_factor_one() {
        let device = Device::new(1);
        let mut model = Model::bag_dispenser();
        model.init(device.bank());
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..600 {
            model.step(device.bank(), Tick::new(TICK, 1.0), &mut rng);
        }
        // One real minute at factor 1.0: about 4 bags.
        let n = device
            .bank()
            .get_u32_abcd(crate::sim::bag::HR_BAGS_DISPENSED);
        assert!((1..=15).contains(&n), "dispensed {n}");
        let mut cabinet = Model::charging_cabinet();
        cabinet.init(device.bank());
        assert_eq!(device.bank().get_string(40, 8), "CHGCAB12");
        assert_eq!(Model::Static.name(), "static");
    }

    #[test]
    fn timescale_compresses_day() {
        let ts = TimeScale::compressed(Duration::from_secs(600)).starting_at(Duration::ZERO);
        assert!((ts.speed() - 144.0).abs() < 1e-9);
        // 5 real minutes = 12 simulated hours.
        let tod = ts.time_of_day(Duration::from_secs(300));
        assert!((tod.as_secs_f64() - 12.0 * 3600.0).abs() < 1e-6);
        assert!((ts.factor_at(Duration::from_secs(300)) - 1.0).abs() < 1e-12);
        let tod = ts.time_of_day(Duration::from_secs(600 + 75));
        assert!((tod.as_secs_f64() - 3.0 * 3600.0).abs() < 1e-6);
    }
}
