//! The one pseudo-random generator of the benchmarks: which user a message or a query goes to, and the
//! phase of a socket's periodic frames. Seeded, so that a run can be repeated; no statistical needs beyond
//! "uniform enough".

/// SplitMix64 (Steele, Lea and Flood, 2014): any seed, even 0 or consecutive ones, gives an unrelated
/// sequence, so sockets can be seeded by their index.
#[derive(Clone, Debug)]
pub struct Rng(u64);

/// The golden-ratio increment of SplitMix64.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl Rng {
    pub fn seeded(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0; the modulo bias is far below what a benchmark notices).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A number in `0..1`.
    pub fn unit(&mut self) -> f64 {
        // The top 53 bits: every value is an exact f64 below 1.
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn draws_stay_in_range_and_cover_it() {
        let mut rng = Rng::seeded(0);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[rng.below(10) as usize] += 1;
            let u = rng.unit();
            assert!((0.0..1.0).contains(&u), "{u}");
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }

    #[test]
    fn neighbouring_seeds_give_different_sequences() {
        let (mut a, mut b) = (Rng::seeded(1), Rng::seeded(2));
        assert_ne!(a.next_u64(), b.next_u64());
        assert_eq!(Rng::seeded(7).next_u64(), Rng::seeded(7).next_u64());
    }
}
