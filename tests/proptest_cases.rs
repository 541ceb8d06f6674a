//! How many cases a property test runs: its base count times `VL_PROPTEST_SCALE` (default 1;
//! `make fuzz` raises it). Included with `#[path]` into the unit tests of vl-runtime, vl-export
//! and vl-serve: they can share no test crate (vl-runtime may depend on no other package here,
//! README's Layout), and one file keeps the rule in one place.

/// The proptest config of a test whose base case count is `base`.
pub fn config(base: u32) -> proptest::test_runner::Config {
    let scale: u32 = std::env::var("VL_PROPTEST_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    proptest::test_runner::Config::with_cases(base.saturating_mul(scale))
}
