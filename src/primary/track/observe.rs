//! The churn observer of `drfs assess`: while an assessment runs, every block a write
//! marks is also set here, in memory, apart from the change bitmaps. Taking the set
//! empties it, so an assessment sees the distinct blocks changed between two takes
//! whatever the cycles do with the bitmaps (it never clears a bit or takes a cut).

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::model::FileId;
use crate::primary::track::bitmap;

/// The blocks changed since the last take, per file, as bitmap words.
#[derive(Default)]
pub struct Observer {
    sets: Mutex<HashMap<FileId, Vec<u64>>>,
}

impl Observer {
    /// Blocks `first..=last` of `id` changed.
    pub fn mark(&self, id: FileId, first: u64, last: u64) {
        let mut sets = self.sets.lock();
        let words = sets.entry(id).or_default();
        let need = (last / 64 + 1) as usize;
        if words.len() < need {
            words.resize(need, 0);
        }
        for b in first..=last {
            words[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    /// The runs `[first, end)` changed per file since the last take; empties the set.
    pub fn take(&self) -> Vec<(FileId, Vec<(u64, u64)>)> {
        let sets = std::mem::take(&mut *self.sets.lock());
        let mut out: Vec<_> = sets
            .into_iter()
            .map(|(id, words)| (id, bitmap::runs(&words)))
            .filter(|(_, r)| !r.is_empty())
            .collect();
        out.sort_by_key(|(id, _)| id.0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_empties() {
        let o = Observer::default();
        o.mark(FileId(3), 2, 4);
        o.mark(FileId(3), 3, 70);
        o.mark(FileId(1), 0, 0);
        assert_eq!(
            o.take(),
            vec![(FileId(1), vec![(0, 1)]), (FileId(3), vec![(2, 71)])]
        );
        assert!(o.take().is_empty());
    }
}
