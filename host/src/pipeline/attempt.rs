//! A routed run that an endpoint's latency budget may give up on. The run and the budget's
//! timer race for one decision, taken under a lock: either the run finished first (its
//! answer counts), or the budget abandoned it — then its routed variant is charged one
//! timed-out error at once, the slot it held passes to the fallback, and the run, which
//! cannot be stopped mid-model, goes on to its end counting nothing and sending no shadows.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;

use super::endpoints::Endpoint;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum Phase {
    /// Not yet routed: waiting for a slot, or evaluating flags and routing.
    #[default]
    Waiting,
    /// Running the variant at this index.
    Running(usize),
    Finished,
    /// Given up on by the budget, while running the variant at this index, if any.
    Abandoned(Option<usize>),
}

#[derive(Default)]
pub(super) struct Attempt {
    phase: Mutex<Phase>,
    slot: Mutex<Option<OwnedSemaphorePermit>>,
}

/// What giving up on a run found.
pub(super) enum Abandoned {
    /// Too late: the run had finished.
    No,
    /// Given up on: the variant it was running, if it had begun, and its slot.
    Yes {
        routed: Option<usize>,
        slot: Option<OwnedSemaphorePermit>,
    },
}

/// Frees the run's slot when the run ends, unless the fallback took it.
pub(super) struct Release<'a>(&'a Attempt);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        drop(self.0.take_slot());
    }
}

impl Attempt {
    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Keeps the run's slot where the fallback can take it.
    pub(super) fn hold(&self, slot: OwnedSemaphorePermit) {
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(slot);
    }

    pub(super) fn release_on_drop(&self) -> Release<'_> {
        Release(self)
    }

    /// The run begins on `variant`; `false` if it was abandoned already.
    pub(super) fn start(&self, variant: usize) -> bool {
        let mut phase = self.phase();
        if matches!(*phase, Phase::Abandoned(_)) {
            return false;
        }
        *phase = Phase::Running(variant);
        true
    }

    /// The run is over: `true` if it counts, `false` if it was abandoned (and leaves the
    /// count of its variant's runs past the budget).
    pub(super) fn finish(&self, endpoint: &Endpoint) -> bool {
        let mut phase = self.phase();
        match *phase {
            Phase::Abandoned(Some(variant)) => {
                endpoint.variants[variant].stats.leave_past_budget();
                false
            }
            Phase::Abandoned(None) => false,
            _ => {
                *phase = Phase::Finished;
                true
            }
        }
    }

    /// The budget ran out: gives the run up unless it finished, charging its variant.
    pub(super) fn abandon(&self, endpoint: &Endpoint, budget: Duration) -> Abandoned {
        let mut phase = self.phase();
        let routed = match *phase {
            Phase::Finished => return Abandoned::No,
            Phase::Running(variant) => {
                let stats = &endpoint.variants[variant].stats;
                stats.record(budget, true);
                stats.enter_past_budget();
                Some(variant)
            }
            Phase::Waiting | Phase::Abandoned(_) => None,
        };
        *phase = Phase::Abandoned(routed);
        drop(phase);
        Abandoned::Yes {
            routed,
            slot: self.take_slot(),
        }
    }
}
