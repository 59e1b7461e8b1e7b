//! Packing documents into rows of `seq_len` tokens, keeping each document's boundaries.
//!
//! A [`Unit`] is what must stay together in one row: one document, or a preference pair (its
//! chosen and rejected sequences occupy the same slot of two parallel rows, so the unit's size is
//! the longer of the two).
//!
//! - **Best-fit-decreasing** ([`BfdPacker`], the default): units are gathered in windows of about
//!   `window_tokens` tokens, sorted by size (largest first) and each put into the open row whose
//!   free space is the smallest that still fits it ([`best_fit_decreasing`]; a bitset over free
//!   capacities finds that row in O(seq_len/64)). The units of rows a window leaves not full go
//!   back into the pool and are packed again with the next window, so windowing costs (almost)
//!   nothing against one global BFD while memory stays bounded by the window.
//! - **Greedy** ([`GreedyPacker`]): concatenate and chunk; a document crossing a row end continues
//!   in the next row as a new fragment (positions restart), the last row is padded.
//! - **None**: one unit per row.
//!
//! Over-long units are handled before packing ([`fit_overlong`]): split into `seq_len` fragments,
//! truncated, or dropped. Pairs are never split: `split` truncates them.

use std::collections::BTreeSet;

use super::mask::Doc;

/// What stays together in a row: one sequence, or (chosen, rejected) of a preference pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub lanes: Vec<Doc>,
    /// Index of the input file it came from.
    pub source: u32,
}

impl Unit {
    /// Tokens it occupies in a row: the longest lane.
    pub fn size(&self) -> usize {
        self.lanes.iter().map(Doc::len).max().unwrap_or(0)
    }
}

/// A packed row: units in order; document k of the row is `units[k]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Row {
    pub units: Vec<Unit>,
}

impl Row {
    pub fn tokens(&self) -> usize {
        self.units.iter().map(Unit::size).sum()
    }
}

/// What to do with a unit longer than a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlong {
    Split,
    Truncate,
    Drop,
}

impl std::str::FromStr for Overlong {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "split" => Ok(Overlong::Split),
            "truncate" => Ok(Overlong::Truncate),
            "drop" => Ok(Overlong::Drop),
            other => Err(crate::Error::InvalidArgument(format!(
                "unknown over-long policy {other:?} (split, truncate, drop)"
            ))),
        }
    }
}

/// How rows are filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    Bfd,
    Greedy,
    None,
}

impl std::str::FromStr for Packing {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "bfd" => Ok(Packing::Bfd),
            "greedy" | "concat" => Ok(Packing::Greedy),
            "none" => Ok(Packing::None),
            other => Err(crate::Error::InvalidArgument(format!(
                "unknown packing {other:?} (bfd, greedy, none)"
            ))),
        }
    }
}

/// The outcome of [`fit_overlong`] for one unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OverlongCounts {
    pub split: u64,
    pub truncated: u64,
    pub dropped: u64,
    /// Tokens removed by truncation or dropping.
    pub tokens_lost: u64,
}

/// Makes `unit` fit rows of `seq_len`: returns it (or its fragments) and what was done.
pub fn fit_overlong(
    mut unit: Unit,
    seq_len: usize,
    policy: Overlong,
    counts: &mut OverlongCounts,
) -> Vec<Unit> {
    let size = unit.size();
    if size <= seq_len {
        return vec![unit];
    }
    let total: usize = unit.lanes.iter().map(Doc::len).sum();
    match policy {
        Overlong::Split if unit.lanes.len() == 1 => {
            counts.split += 1;
            let doc = &unit.lanes[0];
            (0..doc.len())
                .step_by(seq_len)
                .map(|start| Unit {
                    lanes: vec![doc.slice(start..(start + seq_len).min(doc.len()))],
                    source: unit.source,
                })
                .collect()
        }
        Overlong::Drop => {
            counts.dropped += 1;
            counts.tokens_lost += total as u64;
            Vec::new()
        }
        Overlong::Split | Overlong::Truncate => {
            counts.truncated += 1;
            for lane in &mut unit.lanes {
                lane.truncate(seq_len);
            }
            let kept: usize = unit.lanes.iter().map(Doc::len).sum();
            counts.tokens_lost += (total - kept) as u64;
            vec![unit]
        }
    }
}

/// Best-fit-decreasing assignment. `open_free[b]` is the free space of already-open row b;
/// `sizes` are the items (each <= `capacity`). Items are taken largest first (ties: lower index
/// first); each goes to the row with the least free space that still fits it (ties: lowest row
/// index), or to a new row. Returns the row of every item; new rows are numbered after the open
/// ones in the order they were opened.
pub fn best_fit_decreasing(open_free: &[u32], sizes: &[u32], capacity: u32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]).then(a.cmp(&b)));
    let mut rows = FreeSpaceIndex::new(capacity);
    for (row, &free) in open_free.iter().enumerate() {
        rows.insert(free, row);
    }
    let mut n_rows = open_free.len();
    let mut assignment = vec![0usize; sizes.len()];
    for item in order {
        let size = sizes[item];
        debug_assert!(size <= capacity);
        let (row, free) = match rows.take_best_fit(size) {
            Some((free, row)) => (row, free),
            None => {
                n_rows += 1;
                (n_rows - 1, capacity)
            }
        };
        assignment[item] = row;
        rows.insert(free - size, row);
    }
    assignment
}

/// Rows indexed by free space: for each free-space value, the set of rows with it, and a bitset
/// of which values have any row, so "smallest free space >= s" is a scan of a few words.
struct FreeSpaceIndex {
    rows_by_free: Vec<BTreeSet<usize>>,
    nonempty: Vec<u64>,
}

impl FreeSpaceIndex {
    fn new(capacity: u32) -> Self {
        let n = capacity as usize + 1;
        FreeSpaceIndex {
            rows_by_free: vec![BTreeSet::new(); n],
            nonempty: vec![0; n.div_ceil(64)],
        }
    }

    fn insert(&mut self, free: u32, row: usize) {
        let f = free as usize;
        self.rows_by_free[f].insert(row);
        self.nonempty[f / 64] |= 1 << (f % 64);
    }

    /// Removes and returns `(free, row)` of the lowest-index row among those with the smallest
    /// free space >= `size`.
    fn take_best_fit(&mut self, size: u32) -> Option<(u32, usize)> {
        let f = self.first_nonempty_at_or_above(size as usize)?;
        let set = &mut self.rows_by_free[f];
        let row = set.pop_first().expect("bit set only for nonempty sets");
        if set.is_empty() {
            self.nonempty[f / 64] &= !(1 << (f % 64));
        }
        Some((f as u32, row))
    }

    fn first_nonempty_at_or_above(&self, start: usize) -> Option<usize> {
        let mut word = start / 64;
        if word >= self.nonempty.len() {
            return None;
        }
        let mut bits = self.nonempty[word] & (!0u64 << (start % 64));
        loop {
            if bits != 0 {
                return Some(word * 64 + bits.trailing_zeros() as usize);
            }
            word += 1;
            if word == self.nonempty.len() {
                return None;
            }
            bits = self.nonempty[word];
        }
    }
}

/// The plain reference of [`best_fit_decreasing`]: a linear scan of every row per item.
pub fn best_fit_decreasing_reference(
    open_free: &[u32],
    sizes: &[u32],
    capacity: u32,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]).then(a.cmp(&b)));
    let mut free: Vec<u32> = open_free.to_vec();
    let mut assignment = vec![0usize; sizes.len()];
    for item in order {
        let size = sizes[item];
        let mut best: Option<usize> = None;
        for (row, &f) in free.iter().enumerate() {
            if f >= size && best.is_none_or(|b| f < free[b]) {
                best = Some(row);
            }
        }
        let row = best.unwrap_or_else(|| {
            free.push(capacity);
            free.len() - 1
        });
        free[row] -= size;
        assignment[item] = row;
    }
    assignment
}

/// Deterministic shuffling (splitmix64 + Fisher-Yates), the same on every platform and version.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

/// Streaming best-fit-decreasing over windows; units of rows left not full go back to the pool.
pub struct BfdPacker {
    seq_len: usize,
    window_tokens: usize,
    max_carried_rows: usize,
    pending: Vec<Unit>,
    pending_tokens: usize,
    rng: Rng,
}

impl BfdPacker {
    /// `window_tokens` bounds the tokens held before a window is packed; the units of up to
    /// `max_carried_rows` rows that are not full return to the pool for the next window.
    pub fn new(seq_len: usize, window_tokens: usize, max_carried_rows: usize, seed: u64) -> Self {
        BfdPacker {
            seq_len,
            window_tokens: window_tokens.max(seq_len),
            max_carried_rows,
            pending: Vec::new(),
            pending_tokens: 0,
            rng: Rng::new(seed),
        }
    }

    /// Adds a unit (size <= seq_len); returns rows that are final.
    pub fn push(&mut self, unit: Unit) -> Vec<Row> {
        assert!(
            unit.size() <= self.seq_len,
            "over-long units are fitted first"
        );
        self.pending_tokens += unit.size();
        self.pending.push(unit);
        if self.pending_tokens >= self.window_tokens {
            self.pack_window(false)
        } else {
            Vec::new()
        }
    }

    /// Packs what is left; every row is final.
    pub fn finish(&mut self) -> Vec<Row> {
        self.pack_window(true)
    }

    fn pack_window(&mut self, last: bool) -> Vec<Row> {
        let cap = self.seq_len as u32;
        let sizes: Vec<u32> = self.pending.iter().map(|u| u.size() as u32).collect();
        let assignment = best_fit_decreasing(&[], &sizes, cap);
        let n_rows = assignment.iter().copied().max().map_or(0, |m| m + 1);
        let mut rows: Vec<Row> = (0..n_rows).map(|_| Row::default()).collect();
        // Units enter their rows in decreasing size, as the algorithm placed them.
        let mut order: Vec<usize> = (0..sizes.len()).collect();
        order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]).then(a.cmp(&b)));
        let mut units: Vec<Option<Unit>> = self.pending.drain(..).map(Some).collect();
        for i in order {
            rows[assignment[i]]
                .units
                .push(units[i].take().expect("each unit placed once"));
        }
        self.pending_tokens = 0;
        if !last {
            // The rows that are not full (at most max_carried_rows, emptiest first) go back to
            // the pool: their units are packed again with the next window.
            let mut not_full: Vec<usize> = (0..rows.len())
                .filter(|&r| rows[r].tokens() < self.seq_len)
                .collect();
            not_full.sort_by_key(|&r| (rows[r].tokens(), r));
            not_full.truncate(self.max_carried_rows);
            // ... and never more than half a window, so every window brings new units.
            let mut budget = self.window_tokens / 2;
            let keep = not_full
                .iter()
                .take_while(|&&r| {
                    let t = rows[r].tokens();
                    let fits = t <= budget;
                    budget = budget.saturating_sub(t);
                    fits
                })
                .count();
            not_full.truncate(keep);
            not_full.sort_unstable();
            let mut returned = Vec::new();
            for &r in not_full.iter().rev() {
                returned.push(rows.swap_remove(r));
            }
            for row in returned.into_iter().rev() {
                for unit in row.units {
                    self.pending_tokens += unit.size();
                    self.pending.push(unit);
                }
            }
        }
        self.rng.shuffle(&mut rows);
        rows
    }
}

/// Concatenate-and-chunk: fills each row to the brim, splitting documents at row ends.
pub struct GreedyPacker {
    seq_len: usize,
    current: Row,
    used: usize,
}

impl GreedyPacker {
    pub fn new(seq_len: usize) -> Self {
        GreedyPacker {
            seq_len,
            current: Row::default(),
            used: 0,
        }
    }

    /// Adds a single-lane unit; returns the rows it completed.
    pub fn push(&mut self, unit: Unit) -> Vec<Row> {
        assert_eq!(unit.lanes.len(), 1, "greedy packing takes single sequences");
        let mut rows = Vec::new();
        let doc = &unit.lanes[0];
        let mut start = 0;
        while start < doc.len() {
            let take = (self.seq_len - self.used).min(doc.len() - start);
            self.current.units.push(Unit {
                lanes: vec![doc.slice(start..start + take)],
                source: unit.source,
            });
            self.used += take;
            start += take;
            if self.used == self.seq_len {
                rows.push(std::mem::take(&mut self.current));
                self.used = 0;
            }
        }
        rows
    }

    pub fn finish(&mut self) -> Vec<Row> {
        if self.current.units.is_empty() {
            Vec::new()
        } else {
            self.used = 0;
            vec![std::mem::take(&mut self.current)]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn unit(len: usize, tag: u32) -> Unit {
        Unit {
            lanes: vec![Doc {
                ids: vec![tag; len],
                trained: None,
            }],
            source: 0,
        }
    }

    proptest! {
        /// The indexed BFD makes exactly the reference's choices.
        #[test]
        fn bfd_matches_reference(
            sizes in proptest::collection::vec(1u32..=100, 0..300),
            open in proptest::collection::vec(0u32..=100, 0..10),
        ) {
            prop_assert_eq!(
                best_fit_decreasing(&open, &sizes, 100),
                best_fit_decreasing_reference(&open, &sizes, 100)
            );
        }

        /// Windowed BFD with returned units keeps every token and never overfills a row, whatever
        /// the sizes. (How close it stays to one global BFD is not a bound that holds for every
        /// adversarial input; `windowed_bfd_stays_close_to_global` checks it on fixed corpora.)
        #[test]
        fn windowed_bfd_keeps_every_unit(sizes in proptest::collection::vec(1usize..=64, 1..400)) {
            let rows = pack_windowed(&sizes);
            let mut seen: Vec<u32> = rows.iter().flat_map(|r| r.units.iter().map(|u| u.lanes[0].ids[0])).collect();
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..sizes.len() as u32).collect::<Vec<_>>());
            prop_assert!(rows.iter().all(|r| r.tokens() <= 64));
        }
    }

    fn pack_windowed(sizes: &[usize]) -> Vec<Row> {
        let mut packer = BfdPacker::new(64, 64 * 32, 16, 7);
        let mut rows = Vec::new();
        for (i, &s) in sizes.iter().enumerate() {
            rows.extend(packer.push(unit(s, i as u32)));
        }
        rows.extend(packer.finish());
        rows
    }

    /// On fixed pseudo-random corpora (uniform and skewed sizes), windowed BFD with returned
    /// units uses at most a few more rows than one global BFD over everything.
    #[test]
    fn windowed_bfd_stays_close_to_global() {
        for seed in 1..=20u64 {
            let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let sizes: Vec<usize> = (0..1000)
                .map(|_| {
                    if seed % 2 == 0 {
                        1 + (next() % 64) as usize
                    } else {
                        1 + ((next() % 64) * (next() % 64) / 64) as usize
                    }
                })
                .collect();
            let rows = pack_windowed(&sizes);
            let sizes32: Vec<u32> = sizes.iter().map(|&s| s as u32).collect();
            let global = best_fit_decreasing(&[], &sizes32, 64)
                .into_iter()
                .max()
                .map_or(0, |m| m + 1);
            assert!(
                rows.len() <= global + 1 + global / 20,
                "seed {seed}: {} rows vs {global}",
                rows.len()
            );
        }
    }

    #[test]
    fn overlong_policies() {
        let mut c = OverlongCounts::default();
        let parts = fit_overlong(unit(10, 1), 4, Overlong::Split, &mut c);
        assert_eq!(
            parts.iter().map(Unit::size).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        let t = fit_overlong(unit(10, 1), 4, Overlong::Truncate, &mut c);
        assert_eq!(t[0].size(), 4);
        assert!(fit_overlong(unit(10, 1), 4, Overlong::Drop, &mut c).is_empty());
        let pair = Unit {
            lanes: vec![unit(6, 1).lanes.remove(0), unit(3, 2).lanes.remove(0)],
            source: 0,
        };
        let p = fit_overlong(pair, 4, Overlong::Split, &mut c);
        assert_eq!(p[0].lanes[0].len(), 4);
        assert_eq!(p[0].lanes[1].len(), 3);
        assert_eq!(
            c,
            OverlongCounts {
                split: 1,
                truncated: 2,
                dropped: 1,
                tokens_lost: 6 + 10 + 2
            }
        );
    }

    #[test]
    fn greedy_chunks_and_keeps_order() {
        let mut g = GreedyPacker::new(4);
        let mut rows = g.push(unit(3, 1));
        rows.extend(g.push(unit(6, 2)));
        rows.extend(g.finish());
        let shape: Vec<Vec<usize>> = rows
            .iter()
            .map(|r| r.units.iter().map(Unit::size).collect())
            .collect();
        assert_eq!(shape, vec![vec![3, 1], vec![4], vec![1]]);
    }

    #[test]
    fn rng_is_stable() {
        let mut r = super::Rng::new(0);
        let mut v: Vec<u32> = (0..8).collect();
        r.shuffle(&mut v);
        let mut r2 = super::Rng::new(0);
        let mut v2: Vec<u32> = (0..8).collect();
        r2.shuffle(&mut v2);
        assert_eq!(v, v2);
        assert_ne!(v, (0..8).collect::<Vec<_>>());
    }
}
