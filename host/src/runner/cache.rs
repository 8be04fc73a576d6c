//! The response cache of one model version: a model call's outputs, kept by its inputs.
//!
//! The key is every input's name, datatype, shape and bytes, in name order: a 64-bit hash
//! (xxh3, which reads a large image at memory speed) finds the candidates, and a hit compares
//! them in full, so two requests that differ in one byte never share an answer. Least
//! recently used answers go first when the bytes held would pass `max_bytes`. The cache
//! belongs to the loaded version, so a new version or a reload starts empty.

use std::sync::Mutex;

use lru::LruCache;
use xxhash_rust::xxh3::Xxh3;

use crate::telemetry::SchedulingMeters;
use crate::tensor::Tensor;

/// `cache = { max_bytes = ... }` in `model.toml`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes of inputs and outputs the cache may hold.
    pub max_bytes: usize,
}

/// The inputs in name order, borrowed: what a lookup hashes and compares without copying.
fn canonical(inputs: &[Tensor]) -> Vec<&Tensor> {
    let mut sorted: Vec<&Tensor> = inputs.iter().collect();
    sorted.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    sorted
}

fn hash(inputs: &[&Tensor]) -> u64 {
    let mut h = Xxh3::new();
    for t in inputs {
        // Lengths first, so that no two different tensors feed the hash the same bytes.
        h.update(&(t.name.len() as u64).to_le_bytes());
        h.update(t.name.as_bytes());
        h.update(t.datatype.as_str().as_bytes());
        h.update(&(t.shape.len() as u64).to_le_bytes());
        for &d in &t.shape {
            h.update(&(d as u64).to_le_bytes());
        }
        h.update(&(t.data.len() as u64).to_le_bytes());
        h.update(&t.data);
    }
    h.digest()
}

fn bytes(tensors: &[Tensor]) -> usize {
    tensors
        .iter()
        .map(|t| t.data.len() + t.name.len() + t.shape.len() * 8 + 64)
        .sum()
}

/// One answer: the inputs it was for, in name order, and the outputs.
struct Entry {
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
}

impl Entry {
    fn answers(&self, inputs: &[&Tensor]) -> bool {
        self.inputs.len() == inputs.len() && self.inputs.iter().zip(inputs).all(|(a, b)| a == *b)
    }

    fn size(&self) -> usize {
        bytes(&self.inputs) + bytes(&self.outputs)
    }
}

struct Held {
    /// By hash; the rare inputs whose hashes collide share a slot, each kept whole.
    entries: LruCache<u64, Vec<Entry>>,
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
        let inputs = canonical(inputs);
        let key = hash(&inputs);
        let hit = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.entries
                .get(&key)
                .and_then(|slot| slot.iter().find(|e| e.answers(&inputs)))
                .map(|e| e.outputs.clone())
        };
        if let Some(meters) = &self.meters {
            match hit {
                Some(_) => meters.cache_hits.inc(),
                None => meters.cache_misses.inc(),
            };
        }
        hit
    }

    /// Keeps a successful call's outputs, evicting the least recently used answers to stay
    /// within `max_bytes`; an answer larger than the whole cache is not kept.
    pub fn put(&self, inputs: Vec<Tensor>, outputs: &[Tensor]) {
        let mut inputs = inputs;
        inputs.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let key = hash(&inputs.iter().collect::<Vec<_>>());
        let entry = Entry {
            inputs,
            outputs: outputs.to_vec(),
        };
        let size = entry.size();
        if size > self.max_bytes {
            return;
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let slot = held.entries.get_or_insert_mut(key, Vec::new);
        let ordered: Vec<&Tensor> = entry.inputs.iter().collect();
        // The same inputs answered twice (two misses in flight at once): one entry.
        let replaced: usize = slot
            .iter()
            .filter(|e| e.answers(&ordered))
            .map(Entry::size)
            .sum();
        slot.retain(|e| !e.answers(&ordered));
        slot.push(entry);
        held.bytes = held.bytes.saturating_sub(replaced) + size;
        while held.bytes > self.max_bytes {
            let Some((_, evicted)) = held.entries.pop_lru() else {
                break;
            };
            for entry in evicted {
                held.bytes = held.bytes.saturating_sub(entry.size());
                if let Some(meters) = &self.meters {
                    meters.cache_evictions.inc();
                }
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
        cache.put(inputs.clone(), &[tensor("y", vec![9])]);
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
        cache.put(input(1), &output);
        cache.put(input(2), &output);
        assert!(cache.get(&input(1)).is_some());
        cache.put(input(3), &output);
        assert!(
            cache.get(&input(2)).is_none(),
            "2 was the least recently used"
        );
        assert!(cache.get(&input(1)).is_some());
        assert!(cache.get(&input(3)).is_some());
        cache.put(input(4), &[tensor("y", vec![0; 3 * entry])]);
        assert!(
            cache.get(&input(4)).is_none(),
            "larger than the whole cache"
        );
        assert!(cache.get(&input(1)).is_some());
    }
}
