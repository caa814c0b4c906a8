//! Waits shorter and more exact than tokio's timer allows.
//!
//! tokio's timer wheel has a resolution of one millisecond and rounds every deadline up, so a
//! 1.8 ms RS485 inter-frame gap (3.5 characters at 19200 baud) costs 2–3 ms on average: on a
//! line that carries a transaction every few milliseconds that is a tenth of its capacity. A
//! timerfd armed for the remaining time wakes the reactor within microseconds, without spinning
//! and without a thread of its own. Where no timerfd can be made, tokio's timer is the fallback.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// A reusable precise timer (one file descriptor, made on first use inside the runtime).
#[derive(Debug, Default)]
pub struct PreciseTimer {
    fd: Option<AsyncFd<OwnedFd>>,
    /// No timerfd could be made; tokio's timer is used.
    unavailable: bool,
}

impl PreciseTimer {
    /// A timer; nothing is allocated until the first wait.
    pub fn new() -> PreciseTimer {
        PreciseTimer::default()
    }

    fn fd(&mut self) -> Option<&AsyncFd<OwnedFd>> {
        if self.fd.is_none() && !self.unavailable {
            self.fd = open();
            self.unavailable = self.fd.is_none();
        }
        self.fd.as_ref()
    }

    /// Waits until `deadline` (returns at once when it has passed). Cancel-safe.
    pub async fn sleep_until(&mut self, deadline: Instant) {
        let now = Instant::now();
        if deadline <= now {
            return;
        }
        self.sleep(deadline - now).await;
        // Never return early, whatever the clocks did.
        if Instant::now() < deadline {
            tokio::time::sleep_until(deadline).await;
        }
    }

    async fn sleep(&mut self, d: Duration) {
        let Some(fd) = self.fd() else {
            tokio::time::sleep(d).await;
            return;
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos().max(1) as libc::c_long,
            },
        };
        // SAFETY: the descriptor is a timerfd we own; `spec` is a valid itimerspec and the old
        // value is not asked for. Re-arming also clears an expiration nobody read.
        let armed =
            unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if armed != 0 {
            tokio::time::sleep(d).await;
            return;
        }
        loop {
            let Ok(mut guard) = fd.readable().await else {
                tokio::time::sleep(d).await;
                return;
            };
            let read = guard.try_io(|inner| {
                let mut ticks = 0u64;
                // SAFETY: reads 8 bytes into a u64 from our timerfd.
                let n = unsafe {
                    libc::read(
                        inner.as_raw_fd(),
                        (&mut ticks as *mut u64).cast(),
                        std::mem::size_of::<u64>(),
                    )
                };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match read {
                Ok(_) => return,
                Err(_would_block) => continue,
            }
        }
    }
}

/// A non-blocking timerfd registered with the current runtime's reactor.
fn open() -> Option<AsyncFd<OwnedFd>> {
    // SAFETY: timerfd_create has no memory-safety preconditions; a non-negative result is a new
    // descriptor that nothing else owns.
    let raw = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if raw < 0 {
        return None;
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    tokio::runtime::Handle::try_current().ok()?;
    // SAFETY: an OwnedFd returns the same open descriptor for as long as it lives, and the
    // AsyncFd owns it.
    unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn never_wakes_early() {
        let mut t = PreciseTimer::new();
        for micros in [1, 300, 1800, 3650] {
            let deadline = Instant::now() + Duration::from_micros(micros);
            t.sleep_until(deadline).await;
            assert!(Instant::now() >= deadline, "woke before {micros} µs");
        }
        assert!(t.fd.is_some(), "timerfd available on Linux");
    }

    #[tokio::test]
    async fn cancelled_wait_leaves_the_timer_usable() {
        let mut t = PreciseTimer::new();
        let far = Instant::now() + Duration::from_secs(10);
        let cancelled = tokio::time::timeout(Duration::from_millis(5), t.sleep_until(far)).await;
        assert!(cancelled.is_err());
        let start = Instant::now();
        t.sleep_until(start + Duration::from_millis(2)).await;
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "a new deadline replaces the old one"
        );
    }

    #[tokio::test]
    async fn past_deadline_returns_at_once() {
        let mut t = PreciseTimer::new();
        let start = Instant::now();
        t.sleep_until(start - Duration::from_millis(5)).await;
        assert!(start.elapsed() < Duration::from_millis(5));
    }
}
