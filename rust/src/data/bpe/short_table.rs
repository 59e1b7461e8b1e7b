//! The per-thread cache's table for short words: words of at most 15 bytes packed into a 16-byte
//! key (`pack_short`), in an open-addressing table with linear probing whose 24-byte slots hold
//! key and value together. A lookup of a cold word costs one cache miss (a general hash map reads
//! a control group and then the slot: two), and natural text has a long tail of cold words.

/// Packed key of a word of at most 15 bytes: its bytes zero-padded, the length in the top byte
/// (so "a" and "a\0" differ, and no word packs to all zeros, which marks an empty slot).
pub type ShortKey = [u64; 2];

/// `word` as a `ShortKey`, or `None` when it is longer than 15 bytes (or empty). Built from
/// overlapping unaligned loads, without a `memcpy` call.
#[inline(always)]
pub fn pack_short(word: &[u8]) -> Option<ShortKey> {
    let n = word.len();
    let load8 = |at: usize| u64::from_le_bytes(word[at..at + 8].try_into().unwrap_or([0; 8]));
    let load4 =
        |at: usize| u32::from_le_bytes(word[at..at + 4].try_into().unwrap_or([0; 4])) as u64;
    let (lo, hi) = match n {
        0 | 16.. => return None,
        8 => (load8(0), 0),
        9..=15 => (load8(0), load8(n - 8) >> (8 * (16 - n))),
        4..=7 => (load4(0) | (load4(n - 4) << (8 * (n - 4))), 0),
        _ => {
            let mut lo = 0u64;
            for (i, &b) in word.iter().enumerate() {
                lo |= (b as u64) << (8 * i);
            }
            (lo, 0)
        }
    };
    Some([lo, hi | ((n as u64) << 56)])
}

#[derive(Clone, Copy, Default)]
struct Slot {
    key: ShortKey,
    value: (u32, u32),
}

/// `ShortKey -> (u32, u32)`, insert and lookup only.
pub(super) struct ShortTable {
    slots: Vec<Slot>,
    /// log2 of the number of slots.
    bits: u32,
    len: usize,
}

impl Default for ShortTable {
    fn default() -> Self {
        Self::with_bits(12)
    }
}

impl ShortTable {
    fn with_bits(bits: u32) -> Self {
        ShortTable {
            slots: vec![Slot::default(); 1 << bits],
            bits,
            len: 0,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Removes every entry (keeping the memory).
    pub fn clear(&mut self) {
        self.slots.fill(Slot::default());
        self.len = 0;
    }

    /// Home slot: a multiplicative hash of both words, top `bits` bits.
    #[inline(always)]
    fn home(&self, key: &ShortKey) -> usize {
        const K: u64 = 0x9E37_79B9_7F4A_7C15;
        let h = (key[0].wrapping_mul(K) ^ key[1]).wrapping_mul(K);
        (h >> (64 - self.bits)) as usize
    }

    /// Asks the CPU to start loading `key`'s home slot, so that a lookup a few words later does
    /// not wait for memory (a hint only; no effect on results).
    #[inline(always)]
    pub fn prefetch(&self, key: &ShortKey) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let slot: *const Slot = &self.slots[self.home(key)];
            // SAFETY: a prefetch never faults and reads nothing architecturally; SSE is part of
            // the x86_64 baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(slot.cast()) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = key;
    }

    /// The value stored for `key`.
    #[inline(always)]
    pub fn get(&self, key: &ShortKey) -> Option<(u32, u32)> {
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        loop {
            let slot = &self.slots[i];
            if slot.key == *key {
                return Some(slot.value);
            }
            if slot.key[1] == 0 {
                return None; // an empty slot: no real key has a zero length byte
            }
            i = (i + 1) & mask;
        }
    }

    /// Stores `value` for `key` (replacing any earlier value).
    pub fn insert(&mut self, key: ShortKey, value: (u32, u32)) {
        debug_assert!(key[1] >> 56 != 0, "keys come from pack_short");
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(&key);
        loop {
            let slot = &mut self.slots[i];
            if slot.key == key {
                slot.value = value;
                return;
            }
            if slot.key[1] == 0 {
                *slot = Slot { key, value };
                self.len += 1;
                return;
            }
            i = (i + 1) & mask;
        }
    }

    fn grow(&mut self) {
        let old = std::mem::replace(self, Self::with_bits(self.bits + 1));
        for slot in old.slots.into_iter().filter(|s| s.key[1] != 0) {
            self.insert(slot.key, slot.value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn short_keys_are_distinct_and_exact() {
        let mut seen = HashMap::new();
        let words: Vec<Vec<u8>> = (1..=15)
            .flat_map(|n| {
                [
                    vec![b'a'; n],
                    vec![0u8; n],
                    (0..n as u8).collect(),
                    (0..n as u8).map(|i| 255 - i).collect(),
                ]
            })
            .collect();
        for w in &words {
            let key = pack_short(w).unwrap();
            if let Some(other) = seen.insert(key, w.clone()) {
                assert_eq!(&other, w, "collision");
            }
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&key[0].to_le_bytes());
            bytes[8..].copy_from_slice(&key[1].to_le_bytes());
            assert_eq!(&bytes[..w.len()], &w[..]);
            assert!(bytes[w.len()..15].iter().all(|&b| b == 0));
            assert_eq!(bytes[15] as usize, w.len());
        }
        assert!(pack_short(&[b'x'; 16]).is_none());
        assert!(pack_short(b"").is_none());
    }

    proptest! {
        #[test]
        fn behaves_like_a_hash_map(
            ops in prop::collection::vec((prop::collection::vec(0u8..4, 1..16), any::<u32>()), 0..3000),
        ) {
            let mut table = ShortTable::default();
            let mut reference = HashMap::new();
            for (word, v) in &ops {
                let key = pack_short(word).unwrap();
                table.insert(key, (*v, 1));
                reference.insert(word.clone(), (*v, 1));
            }
            prop_assert_eq!(table.len(), reference.len());
            for (word, _) in &ops {
                prop_assert_eq!(table.get(&pack_short(word).unwrap()), reference.get(word).copied());
            }
            prop_assert_eq!(table.get(&pack_short(b"zzz").unwrap()), None);
        }
    }
}
