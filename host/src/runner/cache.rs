//! The response cache of one model version: a model call's outputs, kept by its inputs.
//!
//! The key is every input's name, datatype, shape and bytes, in name order; a hit compares
//! them in full (the hash only finds the candidate), so two requests that differ in one
//! byte never share an answer. Least recently used answers go first when the bytes held
//! would pass `max_bytes`. The cache belongs to the loaded version, so a new version or a
//! reload starts empty.

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::telemetry::SchedulingMeters;
use crate::tensor::Tensor;

/// `cache = { max_bytes = ... }` in `model.toml`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes of inputs and outputs the cache may hold.
    pub max_bytes: usize,
}

/// A model call's inputs in a canonical order, hashed and compared by content.
#[derive(PartialEq, Eq)]
struct Key(Vec<Tensor>);

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        for t in &self.0 {
            t.name.hash(state);
            t.datatype.hash(state);
            t.shape.hash(state);
            t.data.hash(state);
        }
    }
}

fn bytes(tensors: &[Tensor]) -> usize {
    tensors
        .iter()
        .map(|t| t.data.len() + t.name.len() + t.shape.len() * 8 + 64)
        .sum()
}

fn key(inputs: &[Tensor]) -> Key {
    let mut inputs = inputs.to_vec();
    inputs.sort_by(|a, b| a.name.cmp(&b.name));
    Key(inputs)
}

struct Held {
    entries: LruCache<Key, Arc<Vec<Tensor>>>,
    bytes: usize,
}

pub struct ResponseCache {
    max_bytes: usize,
    held: Mutex<Held>,
    meters: Option<SchedulingMeters>,
}

impl ResponseCache {
    pub fn new(config: CacheConfig, meters: Option<SchedulingMeters>) -> ResponseCache {
        ResponseCache {
            max_bytes: config.max_bytes,
            held: Mutex::new(Held {
                entries: LruCache::unbounded(),
                bytes: 0,
            }),
            meters,
        }
    }

    /// The outputs a call with exactly these inputs gave, counted as a hit or a miss.
    pub fn get(&self, inputs: &[Tensor]) -> Option<Vec<Tensor>> {
        let key = key(inputs);
        let hit = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .get(&key)
            .cloned();
        if let Some(meters) = &self.meters {
            match hit {
                Some(_) => meters.cache_hits.inc(),
                None => meters.cache_misses.inc(),
            };
        }
        hit.map(|outputs| outputs.as_ref().clone())
    }

    /// Keeps a successful call's outputs, evicting the least recently used answers to stay
    /// within `max_bytes`; an answer larger than the whole cache is not kept.
    pub fn put(&self, inputs: &[Tensor], outputs: &[Tensor]) {
        let input_bytes = bytes(inputs);
        let size = input_bytes + bytes(outputs);
        if size > self.max_bytes {
            return;
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let key = key(inputs);
        if let Some(previous) = held.entries.put(key, Arc::new(outputs.to_vec())) {
            // The same inputs answered twice (two misses in flight at once): one entry.
            held.bytes = held.bytes.saturating_sub(input_bytes + bytes(&previous));
        }
        held.bytes += size;
        while held.bytes > self.max_bytes {
            let Some((key, outputs)) = held.entries.pop_lru() else {
                break;
            };
            held.bytes = held.bytes.saturating_sub(bytes(&key.0) + bytes(&outputs));
            if let Some(meters) = &self.meters {
                meters.cache_evictions.inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DataType;

    fn tensor(name: &str, data: Vec<u8>) -> Tensor {
        Tensor {
            name: name.into(),
            datatype: DataType::Uint8,
            shape: vec![data.len()],
            data,
        }
    }

    #[test]
    fn hits_need_every_byte_and_any_input_order() {
        let cache = ResponseCache::new(CacheConfig { max_bytes: 1 << 20 }, None);
        let inputs = vec![tensor("a", vec![1, 2, 3]), tensor("b", vec![4])];
        assert!(cache.get(&inputs).is_none());
        cache.put(&inputs, &[tensor("y", vec![9])]);
        let reordered = vec![inputs[1].clone(), inputs[0].clone()];
        assert_eq!(cache.get(&reordered).unwrap(), vec![tensor("y", vec![9])]);
        let one_byte_off = vec![tensor("a", vec![1, 2, 4]), tensor("b", vec![4])];
        assert!(cache.get(&one_byte_off).is_none());
        let other_type = vec![
            Tensor {
                datatype: DataType::Int8,
                ..inputs[0].clone()
            },
            inputs[1].clone(),
        ];
        assert!(cache.get(&other_type).is_none());
    }

    #[test]
    fn least_recently_used_goes_first_within_the_bytes() {
        let entry = bytes(&[tensor("a", vec![0; 100])]) + bytes(&[tensor("y", vec![0; 100])]);
        let cache = ResponseCache::new(
            CacheConfig {
                max_bytes: 2 * entry,
            },
            None,
        );
        let input = |b: u8| vec![tensor("a", vec![b; 100])];
        let output = vec![tensor("y", vec![0; 100])];
        cache.put(&input(1), &output);
        cache.put(&input(2), &output);
        assert!(cache.get(&input(1)).is_some());
        cache.put(&input(3), &output);
        assert!(
            cache.get(&input(2)).is_none(),
            "2 was the least recently used"
        );
        assert!(cache.get(&input(1)).is_some());
        assert!(cache.get(&input(3)).is_some());
        cache.put(&input(4), &[tensor("y", vec![0; 3 * entry])]);
        assert!(
            cache.get(&input(4)).is_none(),
            "larger than the whole cache"
        );
        assert!(cache.get(&input(1)).is_some());
    }
}
