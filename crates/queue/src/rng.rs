//! A tiny deterministic generator for retry jitter. Not cryptographic: jitter only has
//! to spread retries, and tests need the same sequence for the same seed.

/// splitmix64 (Steele, Lea, Flood 2014): one `u64` of state, passes BigCrush.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1]`.
    pub(crate) fn next_signed_unit(&mut self) -> f64 {
        // 53 random bits give every representable value of a uniform [0, 1) double.
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        unit * 2.0 - 1.0
    }
}
