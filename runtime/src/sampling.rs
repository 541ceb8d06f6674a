//! Choosing the next token from the decoder's logits.
//!
//! The processing follows Hugging Face transformers' logits processors, in their order:
//! repetition penalty (`RepetitionPenaltyLogitsProcessor`), then, only when sampling,
//! temperature (`TemperatureLogitsWarper`), top-k (`TopKLogitsWarper`) and top-p
//! (`TopPLogitsWarper`), and finally a draw from the softmax. A temperature of 0 means greedy
//! decoding: the penalised logits' argmax, ties going to the lowest index like `torch.argmax`.
//!
//! ```
//! use vl_runtime::sampling::{Sampler, SamplingParams};
//!
//! let params = SamplingParams { temperature: 0.7, top_p: 0.9, seed: 42, ..Default::default() };
//! let mut sampler = Sampler::new(params)?;
//! let mut logits = vec![0.1_f32, 2.0, -1.0, 0.5];
//! let token = sampler.sample(&mut logits, &[2]);
//! assert!(token < 4);
//! # Ok::<(), vl_runtime::sampling::SamplingError>(())
//! ```
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// How the next token is chosen; the defaults give greedy decoding without penalty.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 turns the filter off.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`;
    /// 1.0 turns the filter off. Must lie in (0, 1].
    pub top_p: f32,
    /// Penalty (> 0) for tokens already present in the sequence; 1.0 turns it off.
    pub repetition_penalty: f32,
    /// OpenAI's `frequency_penalty` in [-2, 2]: subtracted from a token's logit once per time
    /// the answer so far holds it; 0 turns it off.
    pub frequency_penalty: f32,
    /// OpenAI's `presence_penalty` in [-2, 2]: subtracted from the logit of every token the
    /// answer so far holds; 0 turns it off.
    pub presence_penalty: f32,
    /// Seed of the random generator, so that a request can be replayed exactly.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
        }
    }
}

/// A [`SamplingParams`] value that makes no sense.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SamplingError {
    /// The temperature is negative, infinite or NaN.
    #[error("temperature must be a finite number >= 0 (0 = greedy), got {0}")]
    Temperature(f32),
    /// `top_p` lies outside (0, 1] or is NaN.
    #[error("top_p must lie in (0, 1] (1 = off), got {0}")]
    TopP(f32),
    /// The repetition penalty is not a finite number > 0.
    #[error("repetition_penalty must be a finite number > 0 (1 = off), got {0}")]
    RepetitionPenalty(f32),
    /// The frequency penalty lies outside [-2, 2] or is NaN.
    #[error("frequency_penalty must lie in [-2, 2] (0 = off), got {0}")]
    FrequencyPenalty(f32),
    /// The presence penalty lies outside [-2, 2] or is NaN.
    #[error("presence_penalty must lie in [-2, 2] (0 = off), got {0}")]
    PresencePenalty(f32),
}

impl SamplingParams {
    /// Checks that every value is in its range.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(SamplingError::RepetitionPenalty(self.repetition_penalty));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(SamplingError::FrequencyPenalty(self.frequency_penalty));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(SamplingError::PresencePenalty(self.presence_penalty));
        }
        Ok(())
    }

    /// Whether these parameters pick the argmax instead of drawing at random.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Picks tokens according to validated [`SamplingParams`]; owns its seeded random generator
/// and the scratch buffers reused at every step.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// One bit per vocabulary entry: token already penalised during this step.
    seen: Vec<u64>,
    /// Copy of the logits for the top-k selection.
    scratch: Vec<f32>,
    /// Unnormalised softmax weights.
    weights: Vec<f32>,
    /// Candidate indices sorted for the top-p filter.
    order: Vec<u32>,
}

impl Sampler {
    /// Validates `params` and seeds the random generator with `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        Ok(Self {
            params,
            rng: StdRng::seed_from_u64(params.seed),
            seen: Vec::new(),
            scratch: Vec::new(),
            weights: Vec::new(),
            order: Vec::new(),
        })
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token from `logits` (one per vocabulary entry).
    ///
    /// `previous_tokens` are the ids the repetition penalty applies to; transformers passes
    /// the whole sequence, prompt included. Ids outside the vocabulary are ignored.
    /// `logits` is processed in place: NaN becomes -inf, then the penalty, temperature and
    /// filters are applied, as transformers does before its draw. Returns 0 when `logits`
    /// is empty or every entry is -inf or NaN.
    pub fn sample(&mut self, logits: &mut [f32], previous_tokens: &[u32]) -> u32 {
        self.sample_answer(logits, previous_tokens, &[])
    }

    /// Like [`Self::sample`], with `answer` (the ids generated so far) for OpenAI's frequency
    /// and presence penalties, applied after the repetition penalty as vLLM does.
    /// Whether the token this sampler picks is the logits' argmax as they come (greedy, no
    /// penalty), so that a decoder's own `ArgMax` output can stand for the logits.
    pub fn takes_argmax(&self) -> bool {
        let p = &self.params;
        p.is_greedy() && p.repetition_penalty == 1.0 && p.frequency_penalty == 0.0 && p.presence_penalty == 0.0
    }

    pub fn sample_answer(&mut self, logits: &mut [f32], previous_tokens: &[u32], answer: &[u32]) -> u32 {
        nan_to_neg_inf(logits);
        if self.params.repetition_penalty != 1.0 {
            self.apply_repetition_penalty(logits, previous_tokens);
        }
        if self.params.frequency_penalty != 0.0 || self.params.presence_penalty != 0.0 {
            self.apply_answer_penalties(logits, answer);
        }
        if self.params.is_greedy() {
            return argmax(logits);
        }
        if self.params.temperature != 1.0 {
            let temperature = self.params.temperature;
            logits.iter_mut().for_each(|x| *x /= temperature);
        }
        if self.params.top_k > 0 && self.params.top_k < logits.len() {
            self.apply_top_k(logits);
        }
        let total = softmax_weights(logits, &mut self.weights);
        let total = if self.params.top_p < 1.0 { self.apply_top_p(logits, total) } else { total };
        self.draw(logits, total)
    }

    /// `logit -= frequency_penalty * count + presence_penalty * (count > 0)` for every token
    /// the answer holds (OpenAI's definition).
    fn apply_answer_penalties(&mut self, logits: &mut [f32], answer: &[u32]) {
        let (frequency, presence) = (self.params.frequency_penalty, self.params.presence_penalty);
        self.seen.clear();
        self.seen.resize(logits.len().div_ceil(64), 0);
        for &token in answer {
            let index = token as usize;
            let Some(logit) = logits.get_mut(index) else {
                continue;
            };
            *logit -= frequency;
            let (word, bit) = (index / 64, 1_u64 << (index % 64));
            if self.seen[word] & bit == 0 {
                self.seen[word] |= bit;
                *logit -= presence;
            }
        }
    }

    /// `RepetitionPenaltyLogitsProcessor`: once per distinct previous token,
    /// `logit < 0 ? logit * penalty : logit / penalty`.
    fn apply_repetition_penalty(&mut self, logits: &mut [f32], previous_tokens: &[u32]) {
        let penalty = self.params.repetition_penalty;
        self.seen.clear();
        self.seen.resize(logits.len().div_ceil(64), 0);
        for &token in previous_tokens {
            let index = token as usize;
            let Some(logit) = logits.get_mut(index) else {
                continue;
            };
            let (word, bit) = (index / 64, 1_u64 << (index % 64));
            if self.seen[word] & bit != 0 {
                continue;
            }
            self.seen[word] |= bit;
            *logit = if *logit < 0.0 { *logit * penalty } else { *logit / penalty };
        }
    }

    /// `TopKLogitsWarper`: sets to -inf every logit below the k-th largest (ties are kept).
    fn apply_top_k(&mut self, logits: &mut [f32]) {
        let k = self.params.top_k;
        self.scratch.clear();
        self.scratch.extend_from_slice(logits);
        let (_, kth, _) = self.scratch.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let threshold = *kth;
        logits.iter_mut().filter(|x| **x < threshold).for_each(|x| *x = f32::NEG_INFINITY);
    }

    /// `TopPLogitsWarper`: sorts ascending, removes tokens whose cumulative probability is
    /// `<= 1 - top_p`, always keeping the most likely one. Returns the new weight total.
    ///
    /// Only the likely head is sorted: a tail holding at most `1 - top_p` of the mass is
    /// removed whole, since the cumulative sum cannot exceed that mass inside it.
    fn apply_top_p(&mut self, logits: &mut [f32], total: f64) -> f64 {
        if !(total > 0.0 && total.is_finite()) {
            return total;
        }
        let limit = 1.0 - f64::from(self.params.top_p);
        let weights = &self.weights;
        self.order.clear();
        self.order.extend((0..weights.len()).filter(|&i| weights[i] > 0.0).map(|i| i as u32));
        let ascending = |a: &u32, b: &u32| logits[*a as usize].total_cmp(&logits[*b as usize]);
        let split = partition_tail(&mut self.order, weights, total, limit, ascending);
        self.order[split..].sort_unstable_by(ascending);
        let mut cumulative = 0.0_f64;
        let mut kept = total;
        let keep_from = self.order.len().saturating_sub(1);
        for (position, &index) in self.order[..keep_from].iter().enumerate() {
            let index = index as usize;
            let weight = f64::from(self.weights[index]);
            cumulative += weight / total;
            if position >= split && cumulative > limit {
                break;
            }
            kept -= weight;
            self.weights[index] = 0.0;
            logits[index] = f32::NEG_INFINITY;
        }
        kept
    }

    /// Draws an index with probability `weights[i] / total`; falls back to the argmax when
    /// no weight is positive.
    fn draw(&mut self, logits: &[f32], total: f64) -> u32 {
        if !(total > 0.0 && total.is_finite()) {
            return argmax(logits);
        }
        let target = self.rng.random::<f64>() * total;
        let mut cumulative = 0.0_f64;
        let mut last_positive = None;
        for (index, &weight) in self.weights.iter().enumerate() {
            if weight <= 0.0 {
                continue;
            }
            cumulative += f64::from(weight);
            if cumulative > target {
                return index as u32;
            }
            last_positive = Some(index);
        }
        // Rounding left `target` just above the running sum: take the last candidate.
        last_positive.map_or_else(|| argmax(logits), |index| index as u32)
    }
}

/// Smallest head of likely tokens that the top-p filter tries sorting alone.
const TOP_P_HEAD: usize = 256;

/// Partitions `order` so that its first `split` entries are the least likely ones and hold at
/// most `limit` of the probability mass; returns `split`, 0 when no such tail exists.
fn partition_tail(
    order: &mut [u32],
    weights: &[f32],
    total: f64,
    limit: f64,
    ascending: impl Fn(&u32, &u32) -> std::cmp::Ordering,
) -> usize {
    let mut head = TOP_P_HEAD;
    while head < order.len() {
        let split = order.len() - head;
        order.select_nth_unstable_by(split, &ascending);
        let tail: f64 = order[..split].iter().map(|&i| f64::from(weights[i as usize])).sum();
        if tail / total <= limit {
            return split;
        }
        head *= 4;
    }
    0
}

/// Replaces NaN with -inf so that a broken logit can never be chosen.
fn nan_to_neg_inf(logits: &mut [f32]) {
    logits.iter_mut().filter(|x| x.is_nan()).for_each(|x| *x = f32::NEG_INFINITY);
}

/// Index of the largest value, the lowest index on ties (as `torch.argmax`); 0 when empty.
fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (index, &value) in values.iter().enumerate() {
        if value > values[best] {
            best = index;
        }
    }
    best as u32
}

/// Writes `exp(logit - max)` into `weights` (0 for -inf) and returns their sum.
///
/// When some logits are +inf, those share the whole mass equally.
fn softmax_weights(logits: &[f32], weights: &mut Vec<f32>) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    weights.clear();
    if max == f32::INFINITY {
        weights.extend(logits.iter().map(|&x| if x == f32::INFINITY { 1.0 } else { 0.0 }));
    } else if max == f32::NEG_INFINITY {
        weights.resize(logits.len(), 0.0);
    } else {
        weights.extend(logits.iter().map(|&x| (x - max).exp()));
    }
    weights.iter().map(|&w| f64::from(w)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params).expect("valid parameters")
    }

    fn sampling(temperature: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, seed, ..Default::default() }
    }

    /// Logits with a clear order but enough spread that sampling is not trivial.
    fn spread_logits() -> Vec<f32> {
        (0..64).map(|i| ((i * 37 % 64) as f32) / 16.0).collect()
    }

    #[test]
    fn default_is_greedy_and_valid() {
        let params = SamplingParams::default();
        assert!(params.is_greedy());
        assert_eq!(params.validate(), Ok(()));
    }

    #[test]
    fn greedy_is_argmax_with_lowest_index_on_ties() {
        let mut s = sampler(SamplingParams::default());
        assert_eq!(s.sample(&mut [0.1, 3.0, -2.0, 1.0], &[]), 1);
        assert_eq!(s.sample(&mut [1.0, 5.0, 2.0, 5.0, 5.0], &[]), 1);
        assert_eq!(s.sample(&mut [f32::NEG_INFINITY; 3], &[]), 0);
    }

    #[test]
    fn nan_logits_are_never_chosen() {
        let mut greedy = sampler(SamplingParams::default());
        assert_eq!(greedy.sample(&mut [f32::NAN, 0.5, f32::NAN, 0.2], &[]), 1);
        let mut s = sampler(sampling(1.0, 3));
        for _ in 0..200 {
            let token = s.sample(&mut [f32::NAN, 0.5, f32::NAN, 0.2], &[]);
            assert!(token == 1 || token == 3, "chose NaN logit {token}");
        }
        assert_eq!(s.sample(&mut [f32::NAN; 4], &[]), 0);
    }

    #[test]
    fn positive_infinity_takes_all_the_mass() {
        let mut s = sampler(sampling(1.0, 5));
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, f32::INFINITY, 3.0], &[]), 1);
        }
    }

    #[test]
    fn same_seed_gives_same_sequence() {
        let params = SamplingParams { top_k: 20, top_p: 0.95, ..sampling(0.8, 1234) };
        let run = |params| {
            let mut s = sampler(params);
            (0..100).map(|_| s.sample(&mut spread_logits(), &[])).collect::<Vec<_>>()
        };
        let first = run(params);
        assert_eq!(first, run(params));
        assert_ne!(first, run(SamplingParams { seed: 4321, ..params }));
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let mut greedy = sampler(SamplingParams::default());
        let expected = greedy.sample(&mut spread_logits(), &[]);
        let mut s = sampler(SamplingParams { top_k: 1, ..sampling(1.5, 9) });
        for _ in 0..200 {
            assert_eq!(s.sample(&mut spread_logits(), &[]), expected);
        }
    }

    #[test]
    fn top_k_keeps_ties_at_the_threshold() {
        let mut s = sampler(SamplingParams { top_k: 2, ..sampling(1.0, 2) });
        let mut logits = [1.0, 3.0, 2.0, 2.0, 0.0];
        s.sample(&mut logits, &[]);
        let kept: Vec<bool> = logits.iter().map(|x| x.is_finite()).collect();
        assert_eq!(kept, [false, true, true, true, false]);
    }

    #[test]
    fn tiny_top_p_equals_greedy() {
        let mut greedy = sampler(SamplingParams::default());
        let expected = greedy.sample(&mut spread_logits(), &[]);
        let mut s = sampler(SamplingParams { top_p: 1e-6, ..sampling(1.0, 11) });
        for _ in 0..200 {
            assert_eq!(s.sample(&mut spread_logits(), &[]), expected);
        }
    }

    #[test]
    fn top_p_removes_the_tail_like_transformers() {
        // Probabilities 0.5, 0.3, 0.2; ascending cumulative 0.2, 0.5, 1.0; with top_p = 0.75
        // only 0.2 <= 0.25 is removed.
        let mut s = sampler(SamplingParams { top_p: 0.75, ..sampling(1.0, 17) });
        let logits = [0.5_f32.ln(), 0.3_f32.ln(), 0.2_f32.ln()];
        let mut seen = [0_usize; 3];
        for _ in 0..2000 {
            seen[s.sample(&mut logits.clone(), &[]) as usize] += 1;
        }
        assert_eq!(seen[2], 0);
        assert!(seen[0] > 0 && seen[1] > 0);
    }

    /// transformers' `TopPLogitsWarper` written plainly: full ascending sort, cumulative sum.
    fn reference_top_p(logits: &[f32], top_p: f32) -> Vec<bool> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = logits.iter().map(|&x| f64::from((x - max).exp())).collect();
        let total: f64 = weights.iter().sum();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
        let mut kept = vec![true; logits.len()];
        let mut cumulative = 0.0;
        for &index in &order[..order.len() - 1] {
            cumulative += weights[index] / total;
            kept[index] = cumulative > 1.0 - f64::from(top_p);
        }
        kept
    }

    #[test]
    fn top_p_on_a_large_vocabulary_matches_the_plain_algorithm() {
        let logits: Vec<f32> =
            (0..5000_u64).map(|i| ((i * 2_654_435_761 % 10_007) as f32 / 10_007.0).powi(3) * 12.0).collect();
        for top_p in [0.05, 0.5, 0.9, 0.99, 0.999_999] {
            let mut s = sampler(SamplingParams { top_p, ..sampling(1.0, 1) });
            let mut processed = logits.clone();
            s.sample(&mut processed, &[]);
            let kept: Vec<bool> = processed.iter().map(|x| x.is_finite()).collect();
            assert_eq!(kept, reference_top_p(&logits, top_p), "top_p {top_p}");
        }
    }

    #[test]
    fn frequency_and_presence_penalties_follow_openai() {
        let params = SamplingParams { frequency_penalty: 0.5, presence_penalty: 0.25, ..sampling(0.0, 1) };
        let mut s = sampler(params);
        let mut logits = [2.0, 1.9, 0.0];
        // Token 0 twice in the answer: 2.0 - 2 * 0.5 - 0.25 = 0.75 < 1.9.
        assert_eq!(s.sample_answer(&mut logits, &[], &[0, 0, 7]), 1);
        assert_eq!(logits, [0.75, 1.9, 0.0]);
        // The prompt's ids (`previous_tokens`) are not the answer's.
        assert_eq!(s.sample_answer(&mut [2.0, 1.9, 0.0], &[0, 0], &[]), 0);
        for bad in [2.5, -2.5, f32::NAN] {
            assert!(SamplingParams { frequency_penalty: bad, ..params }.validate().is_err());
            assert!(SamplingParams { presence_penalty: bad, ..params }.validate().is_err());
        }
    }

    #[test]
    fn repetition_penalty_flips_the_choice() {
        let params = SamplingParams { repetition_penalty: 2.0, ..Default::default() };
        let mut s = sampler(params);
        // Positive logit divided: 2.0 -> 1.0 < 1.5.
        assert_eq!(s.sample(&mut [2.0, 1.5], &[]), 0);
        assert_eq!(s.sample(&mut [2.0, 1.5], &[0]), 1);
        // Negative logit multiplied: -1.0 -> -2.0 < -1.5.
        assert_eq!(s.sample(&mut [-1.0, -1.5], &[0]), 1);
        // Applied once per distinct token: 3.0 -> 1.5, not 0.75.
        assert_eq!(s.sample(&mut [3.0, 1.0], &[0, 0, 0]), 0);
        // Ids outside the vocabulary are ignored.
        assert_eq!(s.sample(&mut [2.0, 1.5], &[7, u32::MAX]), 0);
    }

    #[test]
    fn sampling_follows_the_softmax() {
        let mut s = sampler(sampling(1.0, 2024));
        let expected = [0.5_f32, 0.3, 0.2];
        let logits = expected.map(f32::ln);
        let draws = 20_000;
        let mut counts = [0_usize; 3];
        for _ in 0..draws {
            counts[s.sample(&mut logits.clone(), &[]) as usize] += 1;
        }
        for (count, p) in counts.iter().zip(expected) {
            let frequency = *count as f32 / draws as f32;
            assert!((frequency - p).abs() < 0.02, "frequency {frequency} vs {p}: {counts:?}");
        }
    }

    #[test]
    fn validate_rejects_nonsense() {
        let base = SamplingParams::default();
        let bad = [
            (SamplingParams { temperature: -0.1, ..base }, SamplingError::Temperature(-0.1)),
            (SamplingParams { top_p: 0.0, ..base }, SamplingError::TopP(0.0)),
            (SamplingParams { top_p: 1.5, ..base }, SamplingError::TopP(1.5)),
            (SamplingParams { repetition_penalty: 0.0, ..base }, SamplingError::RepetitionPenalty(0.0)),
        ];
        for (params, error) in bad {
            assert_eq!(params.validate(), Err(error));
            assert!(Sampler::new(params).is_err());
        }
        for params in [
            SamplingParams { temperature: f32::NAN, ..base },
            SamplingParams { temperature: f32::INFINITY, ..base },
            SamplingParams { top_p: f32::NAN, ..base },
            SamplingParams { repetition_penalty: f32::NAN, ..base },
        ] {
            assert!(params.validate().is_err(), "{params:?} accepted");
        }
    }

    #[test]
    fn params_deserialize_with_defaults() {
        let params: SamplingParams = serde_json::from_str(r#"{"temperature": 0.7, "seed": 5}"#).expect("valid JSON");
        assert_eq!(params, SamplingParams { temperature: 0.7, seed: 5, ..Default::default() });
        let json = serde_json::to_string(&params).expect("serializable");
        let back: SamplingParams = serde_json::from_str(&json).expect("round trip");
        assert_eq!(back, params);
    }
}
