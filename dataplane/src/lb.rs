//! Load-balancer choice over a cluster's endpoints (per core, no shared state).

use std::cell::Cell;

/// Round robin; each core keeps its own position, so cores start at different offsets.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: Cell<usize>,
}

impl RoundRobin {
    /// Picks the index of the next endpoint out of `n`; `None` when there are none.
    pub fn pick(&self, n: usize) -> Option<usize> {
        if n == 0 {
            return None;
        }
        let i = self.next.get() % n;
        self.next.set(i + 1);
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_through_all() {
        let rr = RoundRobin::default();
        let picks: Vec<_> = (0..6).filter_map(|_| rr.pick(3)).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(rr.pick(0), None);
    }
}
