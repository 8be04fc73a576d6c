//! CPU time spent running a model, for what a prediction costs: the calling thread's own
//! clock, plus the clocks of the worker threads a backend keeps for one session (ONNX
//! Runtime's intra-op pool), read before and after the run. tract runs on the calling
//! thread alone, so its figure is that thread's clock.
//!
//! A session runs one call at a time, so its workers' time between the two readings is
//! that call's; what they spin between runs is charged to nobody. GPU time is not CPU
//! time and is not counted.

use std::cell::Cell;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

thread_local! {
    /// Worker time the backend's run on this thread reported, for the runner to add to
    /// the thread's own: the backend's `run` answers with tensors only.
    static WORKERS_SPENT: Cell<Duration> = const { Cell::new(Duration::ZERO) };
}

/// The calling thread's CPU time so far.
pub fn thread_now() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// Adds a session's worker time to the run on this thread.
pub(super) fn report_workers(spent: Duration) {
    WORKERS_SPENT.with(|w| w.set(w.get() + spent));
}

/// The worker time reported since the last call, on this thread.
pub fn take_workers() -> Duration {
    WORKERS_SPENT.with(|w| w.replace(Duration::ZERO))
}

/// The CPU clocks of the threads one session started.
#[derive(Clone, Default)]
pub(super) struct Workers {
    clocks: Arc<Mutex<Vec<libc::clockid_t>>>,
}

impl Workers {
    /// Their CPU time so far. A thread takes its clock out of the list before it ends (a
    /// thread id, and so a clock id, may be reused by a later thread of the process).
    pub(super) fn now(&self) -> Duration {
        let clocks = self.clocks.lock().unwrap_or_else(PoisonError::into_inner);
        clocks.iter().map(|&clock| clock_now(clock)).sum()
    }

    /// Spawns a thread whose clock is read with the others', running `work`.
    pub(super) fn spawn(
        &self,
        work: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let clocks = self.clocks.clone();
        std::thread::Builder::new()
            .name("onnxruntime-worker".to_string())
            .spawn(move || {
                let mut clock: libc::clockid_t = 0;
                // SAFETY: pthread_self is the calling thread, alive while it runs; the
                // clock id is written into a local.
                let found =
                    unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
                if found == 0 {
                    clocks
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(clock);
                }
                work();
                if found == 0 {
                    clocks
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .retain(|&c| c != clock);
                }
            })
    }
}

fn clock_now(clock: libc::clockid_t) -> Duration {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid timespec to write to; a clock id that names no thread
    // makes the call fail, not misbehave.
    if unsafe { libc::clock_gettime(clock, &mut time) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(time.tv_sec).unwrap_or(0),
        u32::try_from(time.tv_nsec).unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin(for_cpu: Duration) {
        let start = thread_now();
        let mut x = 0u64;
        while thread_now() - start < for_cpu {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }

    #[test]
    fn a_workers_clock_counts_its_work_and_not_its_sleep() {
        let workers = Workers::default();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let handle = workers
            .spawn(move || {
                wait.recv().unwrap();
                spin(Duration::from_millis(30));
                done.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(50));
            })
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let before = workers.now();
        go.send(()).unwrap();
        finished.recv().unwrap();
        let spent = workers.now() - before;
        assert!(spent >= Duration::from_millis(30), "{spent:?}");
        assert!(spent < Duration::from_millis(45), "{spent:?}");
        handle.join().unwrap();
        // An ended thread leaves the list: nothing is read from a stale clock.
        assert_eq!(workers.now(), Duration::ZERO);
        report_workers(Duration::from_millis(3));
        report_workers(Duration::from_millis(4));
        assert_eq!(take_workers(), Duration::from_millis(7));
        assert_eq!(take_workers(), Duration::ZERO);
    }
}
