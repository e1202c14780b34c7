//! Block runs: sorted, disjoint, half-open `[first, end)` ranges of block numbers, and
//! the little arithmetic the tracker, the shipper and the replica do on them.

/// Whether sorted, disjoint half-open runs contain `b`.
pub fn covers(runs: &[[u64; 2]], b: u64) -> bool {
    let i = runs.partition_point(|r| r[1] <= b);
    runs.get(i).is_some_and(|r| r[0] <= b)
}

/// Sorted union of runs.
pub fn union(mut runs: Vec<[u64; 2]>) -> Vec<[u64; 2]> {
    runs.retain(|r| r[1] > r[0]);
    runs.sort();
    let mut out: Vec<[u64; 2]> = Vec::with_capacity(runs.len());
    for r in runs {
        match out.last_mut() {
            Some(l) if r[0] <= l[1] => l[1] = l[1].max(r[1]),
            _ => out.push(r),
        }
    }
    out
}

/// `a` minus `b`, both sorted and disjoint.
pub fn minus(a: &[[u64; 2]], b: &[[u64; 2]]) -> Vec<[u64; 2]> {
    let mut out = Vec::new();
    for r in a {
        let mut start = r[0];
        for s in b.iter().filter(|s| s[1] > r[0] && s[0] < r[1]) {
            if s[0] > start {
                out.push([start, s[0]]);
            }
            start = start.max(s[1]);
        }
        if start < r[1] {
            out.push([start, r[1]]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_arithmetic() {
        assert_eq!(
            union(vec![[5, 7], [0, 2], [1, 3], [7, 8]]),
            vec![[0, 3], [5, 8]]
        );
        assert_eq!(
            minus(&[[0, 10]], &[[2, 3], [5, 7]]),
            vec![[0, 2], [3, 5], [7, 10]]
        );
        assert!(covers(&[[0, 3], [5, 8]], 6) && !covers(&[[0, 3], [5, 8]], 4));
    }
}
