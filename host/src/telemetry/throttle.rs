//! One log line a second at most for an event that can come thousands of times a second
//! (requests turned away under overload), saying how many went unlogged since the last:
//! the log stays readable when it matters most, and the metrics count every one.

use std::sync::atomic::{AtomicU64, Ordering};

use super::clock::now_ms;

#[derive(Default)]
pub struct Throttle {
    /// When the next line may be written, in Unix milliseconds.
    next_ms: AtomicU64,
    skipped: AtomicU64,
}

impl Throttle {
    /// `Some(events not logged since the last line)` when this one may be logged.
    pub fn pass(&self) -> Option<u64> {
        let now = now_ms();
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now + 1000, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.skipped.swap(0, Ordering::Relaxed));
        }
        self.skipped.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_and_the_rest_counted() {
        let throttle = Throttle::default();
        assert_eq!(throttle.pass(), Some(0));
        assert_eq!((0..99).filter_map(|_| throttle.pass()).count(), 0);
        // As if the second had passed.
        throttle.next_ms.store(0, Ordering::Relaxed);
        assert_eq!(throttle.pass(), Some(99));
    }
}
