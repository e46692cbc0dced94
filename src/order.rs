//! A stable in-place sort for the short lists the proxy orders (the
//! files of a certificate directory, one tick's lag events). PURE.
//!
//! The standard library's sorts are fast on long slices but every element
//! type instantiates several kilobytes of them in the binary (section 10
//! of tests/bench/RESULTS.md); an insertion sort is a few hundred bytes.
//! It is quadratic: use it only where the list is short and ordering it
//! is not on the data path.

use std::cmp::Ordering;

/// Sorts `v` by `cmp`, keeping the order of elements it finds equal.
pub fn sort_short_by<T>(v: &mut [T], mut cmp: impl FnMut(&T, &T) -> Ordering) {
    for i in 1..v.len() {
        let mut j = i;
        while j > 0 && cmp(&v[j], &v[j - 1]) == Ordering::Less {
            v.swap(j, j - 1);
            j -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_and_keeps_equal_keys_in_order() {
        let mut v = [(3, 'a'), (1, 'b'), (3, 'c'), (2, 'd'), (1, 'e')];
        sort_short_by(&mut v, |a, b| a.0.cmp(&b.0));
        assert_eq!(v, [(1, 'b'), (1, 'e'), (2, 'd'), (3, 'a'), (3, 'c')]);
        let mut empty: [u8; 0] = [];
        sort_short_by(&mut empty, |a, b| a.cmp(b));
    }
}
