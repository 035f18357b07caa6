//! The order recipes draw their training units (packed rows, padded batches, pairs, prompts)
//! in: one seeded permutation per epoch, so every unit is seen once per epoch and the order
//! is a pure function of (seed, batch index), the same after a resume.

use taper_model::Rng;

/// The units of global batch `g`, `per_batch` at a time.
pub fn epoch_pick(seed: u64, units: usize, per_batch: usize, g: u64) -> Vec<usize> {
    let per_epoch = (units / per_batch).max(1) as u64;
    let (epoch, k) = (g / per_epoch, (g % per_epoch) as usize);
    let mut perm: Vec<usize> = (0..units).collect();
    Rng::derive(seed, &[epoch, 0x5348_5546]).shuffle(&mut perm);
    perm[k * per_batch..((k + 1) * per_batch).min(units)].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_sees_every_unit_once_in_a_fresh_order() {
        let (units, per_batch) = (10, 3);
        let epoch =
            |e: u64| -> Vec<usize> { (3 * e..3 * e + 3).flat_map(|g| epoch_pick(5, units, per_batch, g)).collect() };
        let (a, b) = (epoch(0), epoch(1));
        assert_eq!(a.len(), 9);
        let mut sorted = a.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 9, "no unit twice in an epoch: {a:?}");
        assert_ne!(a, b);
        assert_eq!(epoch_pick(5, units, per_batch, 4), epoch_pick(5, units, per_batch, 4));
        assert_eq!(epoch_pick(5, 2, 3, 0).len(), 2, "fewer units than a batch");
    }
}
