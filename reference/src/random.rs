//! Seeded uniform inputs for tests, examples and benchmarks: random (never all
//! zeros, which hide unwritten outputs), and the same for the same seed.

/// A xorshift64* generator.
#[derive(Clone, Debug)]
pub struct SeededRng(u64);

impl SeededRng {
    /// A generator for `seed` (any value, zero included).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Uniform in `[-1, 1)`, on a grid of 2^-23: exact in f32.
    pub fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        bits as f64 / (1u64 << 24) as f64 * 2.0 - 1.0
    }

    /// `len` values in `[-1, 1)`.
    pub fn values(&mut self, len: usize) -> Vec<f64> {
        (0..len).map(|_| self.unit()).collect()
    }
}

/// `len` values in `[-1, 1)` as f32, from a generator seeded with `seed`.
pub fn uniform_f32(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = SeededRng::new(seed);
    (0..len).map(|_| rng.unit() as f32).collect()
}
