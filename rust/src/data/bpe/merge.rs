//! The BPE merge loop over one pre-token.
//!
//! Starting from one symbol per byte, repeatedly merge the adjacent pair with the lowest merge rank
//! (the leftmost one on ties) until no adjacent pair has a merge. This is what HF `tokenizers`
//! computes with its heap of `(rank, position)` entries, whose stale entries never revalidate (a
//! stale entry's pair spans a different byte length than any later pair at that position).
//!
//! Two implementations, chosen by length: a linear scan over packed `(rank, new_id)` keys for
//! short pieces (almost all words; no allocation beyond the output), and a heap over a linked
//! list for long pieces (long digit or punctuation runs), where the scan would be quadratic.
//! `merge_reference` is the plain version both are tested against.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap;

/// No merge for this pair.
const NONE: u64 = u64::MAX;

/// Pieces up to this many bytes use the linear scan.
const LINEAR_MAX: usize = 96;

/// The merge table: `(left id, right id) -> (rank, merged id)`.
#[derive(Debug, Default)]
pub struct Merges {
    /// Key `left << 32 | right`, value `rank << 32 | merged id` (so smaller values merge first).
    table: FxHashMap<u64, u64>,
}

impl Merges {
    /// Adds merge number `rank`; a later duplicate pair replaces an earlier one, as in HF.
    pub fn insert(&mut self, left: u32, right: u32, rank: u32, merged: u32) {
        self.table
            .insert(pair_key(left, right), ((rank as u64) << 32) | merged as u64);
    }

    /// Number of distinct pairs.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether there are no merges.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// `rank << 32 | merged id` for the pair, or `NONE`.
    #[inline(always)]
    fn get(&self, left: u32, right: u32) -> u64 {
        self.table
            .get(&pair_key(left, right))
            .copied()
            .unwrap_or(NONE)
    }
}

#[inline(always)]
fn pair_key(left: u32, right: u32) -> u64 {
    ((left as u64) << 32) | right as u64
}

/// Merges `ids` (one id per byte on entry) in place to the final token ids.
pub fn merge(ids: &mut Vec<u32>, merges: &Merges) {
    if ids.len() <= LINEAR_MAX {
        merge_linear(ids, merges);
    } else {
        merge_heap(ids, merges);
    }
}

/// Linear min-scan: `keys[i]` is the merge of `(ids[i], ids[i + 1])`.
fn merge_linear(ids: &mut Vec<u32>, merges: &Merges) {
    let n = ids.len();
    if n < 2 {
        return;
    }
    let mut keys_buf = [NONE; LINEAR_MAX];
    let keys = &mut keys_buf[..n - 1];
    for i in 0..n - 1 {
        keys[i] = merges.get(ids[i], ids[i + 1]);
    }
    let mut len = n; // live symbols: ids[..len], keys[..len - 1]
    while len > 1 {
        let mut best = NONE;
        let mut at = 0;
        for (i, &k) in keys[..len - 1].iter().enumerate() {
            if k < best {
                best = k;
                at = i;
            }
        }
        if best == NONE {
            break;
        }
        ids[at] = best as u32;
        ids.copy_within(at + 2..len, at + 1);
        keys.copy_within(at + 1..len - 1, at);
        len -= 1;
        if at > 0 {
            keys[at - 1] = merges.get(ids[at - 1], ids[at]);
        }
        if at + 1 < len {
            keys[at] = merges.get(ids[at], ids[at + 1]);
        }
    }
    ids.truncate(len);
}

/// Heap of `(rank, position, merged id)` over a doubly linked list of symbols.
fn merge_heap(ids: &mut Vec<u32>, merges: &Merges) {
    let n = ids.len();
    let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
    let mut next: Vec<usize> = (1..=n).collect();
    let mut alive = vec![true; n];
    let mut heap = BinaryHeap::with_capacity(n);
    for i in 0..n - 1 {
        let key = merges.get(ids[i], ids[i + 1]);
        if key != NONE {
            heap.push(Reverse((key >> 32, i, key as u32)));
        }
    }
    while let Some(Reverse((_, at, merged))) = heap.pop() {
        let right = next[at];
        // Stale entries: the left symbol was absorbed, it is last, or the pair changed.
        if !alive[at] || right >= n || merges.get(ids[at], ids[right]) as u32 != merged {
            continue;
        }
        ids[at] = merged;
        alive[right] = false;
        next[at] = next[right];
        if next[at] < n {
            prev[next[at]] = at;
        }
        if prev[at] < n {
            let key = merges.get(ids[prev[at]], ids[at]);
            if key != NONE {
                heap.push(Reverse((key >> 32, prev[at], key as u32)));
            }
        }
        if next[at] < n {
            let key = merges.get(ids[at], ids[next[at]]);
            if key != NONE {
                heap.push(Reverse((key >> 32, at, key as u32)));
            }
        }
    }
    let mut w = 0;
    for r in 0..n {
        if alive[r] {
            ids[w] = ids[r];
            w += 1;
        }
    }
    ids.truncate(w);
}

/// The plain definition: rescan every adjacent pair after each merge.
pub fn merge_reference(ids: &mut Vec<u32>, merges: &Merges) {
    loop {
        let best = (0..ids.len().saturating_sub(1))
            .map(|i| (merges.get(ids[i], ids[i + 1]), i))
            .min();
        match best {
            Some((key, at)) if key != NONE => {
                ids[at] = key as u32;
                ids.remove(at + 1);
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Merges over a 4-letter alphabet (ids 0..4), with overlapping and chained pairs whose
    /// ranks do not follow creation order (unlike a trained table), to stress tie-breaking.
    fn table(pairs: &[(u32, u32)]) -> Merges {
        let mut m = Merges::default();
        for (rank, &(a, b)) in pairs.iter().enumerate() {
            m.insert(a, b, rank as u32, 4 + rank as u32);
        }
        m
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn linear_and_heap_agree_with_the_reference(
            word in prop::collection::vec(0u32..4, 0..200),
            pairs in prop::collection::vec((0u32..12, 0u32..12), 1..30),
        ) {
            let merges = table(&pairs);
            let mut expected = word.clone();
            merge_reference(&mut expected, &merges);
            if word.len() <= LINEAR_MAX {
                let mut linear = word.clone();
                merge_linear(&mut linear, &merges);
                prop_assert_eq!(&linear, &expected);
            }
            if !word.is_empty() {
                let mut heap = word.clone();
                merge_heap(&mut heap, &merges);
                prop_assert_eq!(&heap, &expected);
            }
        }
    }

    #[test]
    fn leftmost_pair_wins_ties() {
        let merges = table(&[(0, 0)]); // "aa" -> 4
        let mut ids = vec![0, 0, 0];
        merge(&mut ids, &merges);
        assert_eq!(ids, vec![4, 0]);
    }
}
