//! The last routing decisions of an endpoint, for operators (`/admin/endpoints`). They
//! outlive plugin swaps and configuration edits; nothing else reads them.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

/// One routing decision, as operators see it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DecisionRecord {
    pub id: String,
    pub at_ms: u64,
    pub variant: String,
    pub reason: String,
    pub shadows: Vec<String>,
    pub fallback: bool,
    pub ok: bool,
}

/// The most recent decisions of an endpoint, newest last.
pub struct Recent {
    records: Mutex<VecDeque<DecisionRecord>>,
}

const KEPT: usize = 20;

impl Default for Recent {
    fn default() -> Recent {
        Recent {
            records: Mutex::new(VecDeque::with_capacity(KEPT)),
        }
    }
}

impl Recent {
    pub fn push(&self, record: DecisionRecord) {
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        if records.len() == KEPT {
            records.pop_front();
        }
        records.push_back(record);
    }

    pub fn list(&self) -> Vec<DecisionRecord> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_decisions_are_kept() {
        let recent = Recent::default();
        for i in 0..30 {
            recent.push(DecisionRecord {
                id: i.to_string(),
                at_ms: i,
                variant: "a".to_string(),
                reason: String::new(),
                shadows: vec![],
                fallback: false,
                ok: true,
            });
        }
        let list = recent.list();
        assert_eq!(list.len(), KEPT);
        assert_eq!(list[KEPT - 1].id, "29");
    }
}
