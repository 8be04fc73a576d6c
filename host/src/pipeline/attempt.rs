//! A routed run of an endpoint that has a fallback variant: the request's inference slot,
//! and, under a latency budget, the one decision the run and the budget's timer race for.
//! Either the run finished first (its answer counts), or the budget abandoned it — then
//! its routed variant is charged one timed-out error at once, the slot passes to the
//! fallback, and the run, which cannot be stopped mid-model, goes on to its end counting
//! nothing and sending no shadows. The slot stays here until the fallback takes it or the
//! request is over, so a failed run's fallback never queues for a second one.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;

use crate::endpoint::Endpoint;
use crate::telemetry::VariantFailure;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum Phase {
    /// Not yet routed: evaluating flags and routing.
    #[default]
    Waiting,
    /// Running the variant at this index.
    Running(usize),
    Finished,
    /// Given up on by the budget, while running the variant at this index, if any (and
    /// until that run has ended: then `None`).
    Abandoned(Option<usize>),
}

pub(super) struct Attempt {
    phase: Mutex<Phase>,
    slot: Mutex<Option<OwnedSemaphorePermit>>,
    /// The endpoint's fallback variant: a run routed to it is never abandoned for it.
    fallback: usize,
}

/// What giving up on a run found.
pub(super) enum Abandoned {
    /// Too late, or pointless: the run had finished, or it is the fallback's own.
    No,
    /// Given up on: the variant it was running, if it had begun, and its slot.
    Yes {
        routed: Option<usize>,
        slot: Option<OwnedSemaphorePermit>,
    },
}

/// Ends the run when dropped, however the run ends (a panic included), so a variant's
/// count of runs past the budget never keeps one that is over.
pub(super) struct Finishing<'a> {
    attempt: &'a Attempt,
    endpoint: &'a Endpoint,
}

impl Drop for Finishing<'_> {
    fn drop(&mut self) {
        self.attempt.finish(self.endpoint);
    }
}

impl Attempt {
    pub(super) fn new(slot: OwnedSemaphorePermit, fallback: usize) -> Attempt {
        Attempt {
            phase: Mutex::new(Phase::Waiting),
            slot: Mutex::new(Some(slot)),
            fallback,
        }
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The slot, for the fallback: the run's, unless the budget handed it over already.
    pub(super) fn take_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    pub(super) fn abandoned(&self) -> bool {
        matches!(*self.phase(), Phase::Abandoned(_))
    }

    /// The variant the run was routed to, once it was.
    pub(super) fn routed(&self) -> Option<usize> {
        match *self.phase() {
            Phase::Running(v) | Phase::Abandoned(Some(v)) => Some(v),
            _ => None,
        }
    }

    /// The run begins on `variant`: a guard that ends it, or `None` if it was abandoned
    /// already.
    pub(super) fn start<'a>(
        &'a self,
        endpoint: &'a Endpoint,
        variant: usize,
    ) -> Option<Finishing<'a>> {
        let mut phase = self.phase();
        if matches!(*phase, Phase::Abandoned(_)) {
            return None;
        }
        *phase = Phase::Running(variant);
        Some(Finishing {
            attempt: self,
            endpoint,
        })
    }

    /// The run is over: `true` if it counts, `false` if it was abandoned (it leaves its
    /// variant's count of runs past the budget, once).
    pub(super) fn finish(&self, endpoint: &Endpoint) -> bool {
        let mut phase = self.phase();
        match *phase {
            Phase::Abandoned(Some(variant)) => {
                endpoint.variants[variant].stats.leave_past_budget();
                *phase = Phase::Abandoned(None);
                false
            }
            Phase::Abandoned(None) => false,
            _ => {
                *phase = Phase::Finished;
                true
            }
        }
    }

    /// The budget ran out: gives the run up unless it finished or is the fallback's own,
    /// charging its variant a timed-out error.
    pub(super) fn abandon(&self, endpoint: &Endpoint, budget: Duration) -> Abandoned {
        let mut phase = self.phase();
        let routed = match *phase {
            Phase::Finished => return Abandoned::No,
            Phase::Running(variant) if variant == self.fallback => return Abandoned::No,
            Phase::Running(variant) => {
                let charged = &endpoint.variants[variant];
                endpoint.charge(charged, budget, VariantFailure::Timeout);
                charged.stats.enter_past_budget();
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
