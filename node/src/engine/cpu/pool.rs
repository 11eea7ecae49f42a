//! The compute threads: one pool that every parallel step of an engine runs on.
//!
//! A step is a loop over `0..n` cut into chunks. The thread that submits it works on it too,
//! and claims chunks from a shared cursor like the workers do, so a worker that the operating
//! system has descheduled (another process on the core) delays nothing: the others take its
//! chunks, and the step ends when the last chunk claimed is done. Between steps a worker spins
//! briefly (a token's steps come every few microseconds), yielding the core now and then to
//! any thread that needs it, then parks.
//!
//! One step runs at a time. Concurrent calls take turns step by step, in order of arrival, so
//! two calls on two cores never run four threads.

use std::cell::UnsafeCell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(200);

/// A borrowed step: the closure lives on the submitter's stack until every worker that entered
/// the step has left it.
#[derive(Clone, Copy)]
struct Job {
    n: usize,
    chunk: usize,
    f: *const (dyn Fn(Range<usize>) + Sync),
}

struct Shared {
    /// Bumped when a step is published.
    epoch: AtomicU64,
    /// The current step may still be entered.
    open: AtomicBool,
    /// Workers inside the current step.
    active: AtomicUsize,
    /// The next item to claim.
    cursor: AtomicUsize,
    /// Written only by the submitter while no worker is inside (`active == 0`, `open` false).
    job: UnsafeCell<Job>,
    sleeping: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
}

// SAFETY: `job` is written only by the one submitter (under `Pool::turn`) while no worker can
// read it (see `Shared::job`); the closure it points to is `Sync`.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// Claims and runs chunks of `job` until none is left.
    fn work(&self, job: Job) {
        // SAFETY: the submitter keeps the closure alive until `active` is 0 and it has run
        // its own share; callers of `work` hold `active` or are the submitter.
        let f = unsafe { &*job.f };
        loop {
            let start = self.cursor.fetch_add(job.chunk, SeqCst);
            if start >= job.n {
                return;
            }
            f(start..(start + job.chunk).min(job.n));
        }
    }
}

/// The pool. [`Pool::global`] is the one every engine uses.
pub struct Pool {
    shared: Arc<Shared>,
    /// Held by the step being run; fair, so concurrent calls alternate.
    turn: parking_lot::Mutex<()>,
    threads: usize,
}

static GLOBAL: OnceLock<Pool> = OnceLock::new();
static CONFIGURED: AtomicUsize = AtomicUsize::new(0);

impl Pool {
    /// A pool of `threads` threads in all: the submitting thread and `threads - 1` workers.
    pub fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        let noop: &'static (dyn Fn(Range<usize>) + Sync) = &|_| {};
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            open: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            cursor: AtomicUsize::new(0),
            job: UnsafeCell::new(Job {
                n: 0,
                chunk: 1,
                f: noop,
            }),
            sleeping: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        for i in 1..threads {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("mesh-compute-{i}"))
                .spawn(move || worker(&shared))
                .expect("a compute thread starts");
        }
        Pool {
            shared,
            turn: parking_lot::Mutex::new(()),
            threads,
        }
    }

    /// Sets the size of the global pool; only the first call before its first use counts.
    pub fn configure_global(threads: usize) {
        let _ = CONFIGURED.compare_exchange(0, threads.max(1), SeqCst, SeqCst);
    }

    /// The pool every engine shares, created on first use with the configured size (else one
    /// thread per CPU this process may use).
    pub fn global() -> &'static Pool {
        GLOBAL.get_or_init(|| {
            let configured = CONFIGURED.load(SeqCst);
            Pool::new(if configured > 0 {
                configured
            } else {
                std::thread::available_parallelism().map_or(1, |n| n.get())
            })
        })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` over `0..n` in chunks of `chunk` items, on every thread of the pool, and
    /// returns when all are done. `f` must be cheap to call per chunk and write disjoint data.
    pub fn run(&self, n: usize, chunk: usize, f: impl Fn(Range<usize>) + Sync) {
        let chunk = chunk.max(1);
        if n == 0 {
            return;
        }
        if self.threads == 1 || n <= chunk {
            f(0..n);
            return;
        }
        let guard = self.turn.lock();
        let s = &*self.shared;
        let f: &(dyn Fn(Range<usize>) + Sync) = &f;
        // SAFETY: the lifetime is erased only while this function runs: no worker touches
        // the job after `active` drops to 0 below.
        let f: *const (dyn Fn(Range<usize>) + Sync) = unsafe { std::mem::transmute(f) };
        let job = Job { n, chunk, f };
        // SAFETY: we hold the turn, and the last step ended with `active == 0` and `open`
        // false, so no worker reads `job` now.
        unsafe { *s.job.get() = job };
        s.cursor.store(0, SeqCst);
        s.open.store(true, SeqCst);
        s.epoch.fetch_add(1, SeqCst);
        if s.sleeping.load(SeqCst) > 0 {
            let _lock = s.park.lock().unwrap_or_else(|p| p.into_inner());
            s.wake.notify_all();
        }
        s.work(job);
        s.open.store(false, SeqCst);
        let mut spins = 0u32;
        while s.active.load(SeqCst) != 0 {
            spin(&mut spins);
        }
        parking_lot::MutexGuard::unlock_fair(guard);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.stop.store(true, SeqCst);
        s.epoch.fetch_add(1, SeqCst);
        let _lock = s.park.lock().unwrap_or_else(|p| p.into_inner());
        s.wake.notify_all();
    }
}

/// One turn of a busy wait. Every so often it yields the core, so that when the machine has
/// more runnable threads than cores (other processes, or several nodes on one machine) a
/// waiting thread does not hold a core a working one needs; with a core to spare, a yield
/// returns at once.
#[inline]
fn spin(spins: &mut u32) {
    *spins = spins.wrapping_add(1);
    if spins.is_multiple_of(64) {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

fn worker(s: &Shared) {
    let mut seen = s.epoch.load(SeqCst);
    loop {
        let since = Instant::now();
        let mut spins = 0u32;
        while s.epoch.load(SeqCst) == seen {
            spin(&mut spins);
            if spins.is_multiple_of(256) && since.elapsed() > SPIN {
                let mut lock = s.park.lock().unwrap_or_else(|p| p.into_inner());
                s.sleeping.fetch_add(1, SeqCst);
                while s.epoch.load(SeqCst) == seen {
                    lock = s.wake.wait(lock).unwrap_or_else(|p| p.into_inner());
                }
                s.sleeping.fetch_sub(1, SeqCst);
            }
        }
        if s.stop.load(SeqCst) {
            return;
        }
        seen = s.epoch.load(SeqCst);
        s.active.fetch_add(1, SeqCst);
        if s.open.load(SeqCst) {
            // SAFETY: `open` was seen true while we hold `active`, so the submitter has
            // published this job and will not change it before we leave.
            let job = unsafe { *s.job.get() };
            s.work(job);
        }
        s.active.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_item_runs_exactly_once() {
        let pool = Pool::new(3);
        for n in [0, 1, 5, 64, 1000, 4097] {
            let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            pool.run(n, 7, |r| {
                for i in r {
                    hits[i].fetch_add(1, SeqCst);
                }
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "n={n}");
        }
    }

    #[test]
    fn steps_from_several_threads_take_turns_and_all_finish() {
        let pool = Arc::new(Pool::new(2));
        let total = Arc::new(AtomicU64::new(0));
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let (pool, total) = (pool.clone(), total.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        pool.run(100, 3, |r| {
                            total.fetch_add(r.len() as u64, SeqCst);
                        });
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap();
        }
        assert_eq!(total.load(SeqCst), 4 * 200 * 100);
    }

    #[test]
    fn a_parked_worker_wakes_for_the_next_step() {
        let pool = Pool::new(2);
        std::thread::sleep(SPIN * 5);
        let workers = Mutex::new(std::collections::HashSet::new());
        // Enough slow chunks that the woken worker takes some of them.
        pool.run(64, 1, |_| {
            workers.lock().unwrap().insert(std::thread::current().id());
            std::thread::sleep(Duration::from_millis(1));
        });
        assert_eq!(workers.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_one_thread_pool_runs_on_the_caller() {
        let pool = Pool::new(1);
        let me = std::thread::current().id();
        pool.run(10, 1, |_| assert_eq!(std::thread::current().id(), me));
    }
}
