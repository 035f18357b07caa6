//! A bounded wait for the other ranks: MPI's blocking collectives wait forever for a rank that
//! died or hangs, so a thread watches each watched collective and ends the process when one
//! outlasts the limit, after saying where it was waiting. The launcher (mpirun, srun) then
//! stops the other ranks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a rank waits in one collective; `TAPER_DIST_TIMEOUT_S` overrides it.
const DEFAULT_LIMIT: Duration = Duration::from_secs(300);

pub struct Watchdog {
    /// Milliseconds since `epoch` at which the current collective began; 0 when none runs.
    since: Arc<AtomicU64>,
    what: Arc<Mutex<&'static str>>,
    epoch: Instant,
}

/// Marks a collective as running until dropped.
pub struct Watched<'a>(&'a Watchdog);

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        self.0.since.store(0, Ordering::SeqCst);
    }
}

impl Watchdog {
    /// Starts the watching thread for rank `rank`.
    pub fn start(rank: usize) -> Self {
        let limit = std::env::var("TAPER_DIST_TIMEOUT_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_LIMIT);
        let (since, what, epoch) = (Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new("")), Instant::now());
        let (s, w) = (since.clone(), what.clone());
        std::thread::Builder::new()
            .name("taper-dist-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(500));
                let began = s.load(Ordering::SeqCst);
                if began == 0 {
                    continue;
                }
                let waited = epoch.elapsed().saturating_sub(Duration::from_millis(began));
                if waited > limit {
                    let op = *w.lock().unwrap_or_else(|e| e.into_inner());
                    eprintln!(
                        "error: rank {rank}: no answer from the other ranks for {} s in {op}: a rank has died or \
                         hangs (TAPER_DIST_TIMEOUT_S sets the limit); stopping",
                        waited.as_secs()
                    );
                    // SAFETY: _exit ends the process without running handlers that could wait on MPI.
                    unsafe { libc::_exit(1) }
                }
            })
            .expect("a watchdog thread starts");
        Self { since, what, epoch }
    }

    /// Watches the collective `what` until the guard is dropped.
    pub fn enter(&self, what: &'static str) -> Watched<'_> {
        *self.what.lock().unwrap_or_else(|e| e.into_inner()) = what;
        let now = self.epoch.elapsed().as_millis().max(1) as u64;
        self.since.store(now, Ordering::SeqCst);
        Watched(self)
    }
}
