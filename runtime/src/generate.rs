//! Running the language model: embedding, visual splicing, one decoder call per step, and the
//! sampling loop with streaming and stop conditions.
use std::borrow::Cow;
use std::time::{Duration, Instant};

use ndarray::{Array2, Array3, ArrayView2};
use ort::session::SessionInputValue;
use ort::value::{Tensor, TensorRef};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::kv_cache::{KvCache, StepInputs};
use crate::manifest::KvLayout;
use crate::sampling::{Sampler, SamplingParams};
use crate::stream::{StopChunk, StopMatcher, StreamDecoder};

/// What a request asks of generation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerateOptions {
    /// How tokens are chosen.
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Generation ends when the text contains one of these (excluded from the answer).
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence (benchmarks, and parity with a fixed token count).
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { sampling: SamplingParams::default(), max_new_tokens: 256, stop: Vec::new(), ignore_eos: false }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced end-of-sequence.
    Eos,
    /// A stop string appeared.
    StopString,
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// The caller asked to stop.
    Cancelled,
}

/// One generated token as it is streamed.
#[derive(Debug, Clone)]
pub struct TokenEvent<'a> {
    /// Its id (`None` for text flushed at the end of generation).
    pub id: Option<u32>,
    /// Text that became final with it (may be empty: a multi-byte character in progress, or
    /// text held back because it might start a stop string).
    pub text: &'a str,
}

/// Whether the caller wants more tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep generating.
    Continue,
    /// Stop after this token.
    Stop,
}

/// Time spent in each stage of one answer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    /// Decoding and preprocessing the video or image.
    pub preprocess_ms: f64,
    /// The vision graph (0 when its features came from the cache).
    pub vision_ms: f64,
    /// The prefill step: all new prompt tokens in one decoder call.
    pub prefill_ms: f64,
    /// From the start of the request to the first token.
    pub time_to_first_token_ms: f64,
    /// Decode steps after the first token.
    pub decode_steps: usize,
    /// Their total time.
    pub decode_ms: f64,
}

impl Timings {
    /// Mean time per decoded token.
    pub fn ms_per_token(&self) -> f64 {
        if self.decode_steps == 0 { 0.0 } else { self.decode_ms / self.decode_steps as f64 }
    }
    /// Decode throughput.
    pub fn tokens_per_second(&self) -> f64 {
        let ms = self.ms_per_token();
        if ms == 0.0 { 0.0 } else { 1000.0 / ms }
    }
}

/// A finished answer.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// The text (without a stop string).
    pub text: String,
    /// Generated ids (without EOS).
    pub token_ids: Vec<u32>,
    /// Why it ended.
    pub finish: FinishReason,
    /// Where the time went.
    pub timings: Timings,
}

/// Rows of `features` replace the embeddings at positions whose id is `token`, in order.
pub struct Splice<'a> {
    /// The placeholder id.
    pub token: u32,
    /// [tokens, hidden] visual features.
    pub features: ArrayView2<'a, f32>,
}

/// The graphs one decoder step needs.
pub struct LanguageModel<'a> {
    /// `embed.onnx`.
    pub embed: &'a Graph,
    /// `decoder.onnx`.
    pub decoder: &'a Graph,
    /// Ones, as long as the context: attention masks are views of its prefix.
    pub mask_ones: &'a [i64],
    /// Rows of the logits.
    pub vocab: usize,
}

impl LanguageModel<'_> {
    fn embed(&self, ids: &[u32]) -> Result<Array3<f32>> {
        let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
        let input = TensorRef::from_array_view(([1usize, ids.len()], ids.as_slice()))?;
        let mut session = self.embed.lock();
        let outputs = session.run(ort::inputs!["input_ids" => input])?;
        let embeds = outputs["inputs_embeds"].try_extract_array::<f32>()?;
        let shape = embeds.shape().to_vec();
        let embeds = embeds
            .to_owned()
            .into_shape_with_order((shape[0], shape[1], shape[2]))
            .map_err(|e| Error::Request(format!("embed.onnx returned shape {shape:?}: {e}")))?;
        Ok(embeds)
    }

    /// Feeds `ids` (splicing visual features in) and returns the last position's logits.
    pub fn forward(&self, kv: &mut KvCache, ids: &[u32], splice: Option<&Splice<'_>>) -> Result<Vec<f32>> {
        self.forward_logits(kv, ids, splice, 1)
    }

    /// Like [`Self::forward`], returning the logits of the last `keep` positions (row-major
    /// `[keep, vocab]`), e.g. every position for teacher-forced evaluation.
    pub fn forward_logits(
        &self,
        kv: &mut KvCache,
        ids: &[u32],
        splice: Option<&Splice<'_>>,
        keep: usize,
    ) -> Result<Vec<f32>> {
        if keep == 0 || keep > ids.len() {
            return Err(Error::Request(format!("logits for {keep} of {} positions", ids.len())));
        }
        let mut embeds = self.embed(ids)?;
        if let Some(s) = splice {
            splice_features(&mut embeds, ids, s)?;
        }
        let past = kv.len();
        let total = past + ids.len();
        let mask = self.mask_ones.get(..total).ok_or(Error::ContextOverflow {
            needed: total,
            max_new: 0,
            limit: self.mask_ones.len(),
        })?;
        if kv.layout() == KvLayout::SharedBuffer {
            let inputs = StepInputs {
                embeds: Tensor::from_array(embeds)?,
                mask: Tensor::from_array(([1usize, total], mask.to_vec()))?,
                keep,
                vocab: self.vocab,
            };
            let mut session = self.decoder.lock();
            return kv.run_bound(&mut session, inputs, self.mask_ones.len());
        }
        let positions: Vec<i64> = (past as i64..total as i64).collect();
        let keep = [keep as i64];
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
            ("inputs_embeds".into(), TensorRef::from_array_view(&embeds)?.into()),
            ("attention_mask".into(), TensorRef::from_array_view(([1usize, total], mask))?.into()),
            ("position_ids".into(), TensorRef::from_array_view(([1usize, ids.len()], positions.as_slice()))?.into()),
            ("logits_to_keep".into(), TensorRef::from_array_view(([1usize], &keep[..]))?.into()),
        ];
        for (name, value) in kv.inputs() {
            inputs.push((name.into(), value.into()));
        }
        let mut session = self.decoder.lock();
        let mut outputs = session.run(inputs)?;
        let (_, logits) = outputs["logits"].try_extract_tensor::<f32>()?;
        let logits = logits.to_vec();
        kv.update(&mut outputs, ids.len())?;
        Ok(logits)
    }
}

fn splice_features(embeds: &mut Array3<f32>, ids: &[u32], s: &Splice<'_>) -> Result<()> {
    let slots: Vec<usize> = ids.iter().enumerate().filter(|(_, t)| **t == s.token).map(|(i, _)| i).collect();
    if slots.len() != s.features.nrows() || embeds.shape()[2] != s.features.ncols() {
        return Err(Error::Request(format!(
            "{} visual placeholders for {} feature rows of width {} (embeddings are {} wide)",
            slots.len(),
            s.features.nrows(),
            s.features.ncols(),
            embeds.shape()[2]
        )));
    }
    for (row, &pos) in s.features.rows().into_iter().zip(&slots) {
        embeds.slice_mut(ndarray::s![0, pos, ..]).assign(&row);
    }
    Ok(())
}

/// Streams an answer: prefill with `prompt`, then sample until a stop condition.
pub struct Generation<'a> {
    /// The graphs.
    pub lm: LanguageModel<'a>,
    /// For detokenizing.
    pub tokenizer: &'a Tokenizer,
    /// End of sequence.
    pub eos: u32,
}

/// The state a conversation keeps between answers.
pub struct Turn<'a> {
    /// Cache of everything fed so far.
    pub kv: &'a mut KvCache,
    /// All ids fed so far plus the new prompt (repetition penalty sees them).
    pub history: &'a mut Vec<u32>,
}

impl Generation<'_> {
    /// Generates after feeding `prompt` (appended to `turn.history`). Returns the answer and the
    /// last sampled token if it was not fed to the model (the next turn must feed it first).
    pub fn run(
        &self,
        turn: Turn<'_>,
        prompt: &[u32],
        splice: Option<&Splice<'_>>,
        opts: &GenerateOptions,
        started: Instant,
        on_token: &mut dyn FnMut(TokenEvent<'_>) -> Flow,
    ) -> Result<(Answer, Option<u32>)> {
        let mut sampler = Sampler::new(opts.sampling)?;
        let mut stops = StopMatcher::new(opts.stop.iter().cloned())?;
        let mut stream = StreamDecoder::new();
        let mut timings = Timings::default();
        let t0 = Instant::now();
        turn.kv.reserve(turn.kv.len() + prompt.len() + opts.max_new_tokens);
        let mut logits = self.lm.forward(turn.kv, prompt, splice)?;
        timings.prefill_ms = ms(t0.elapsed());
        turn.history.extend_from_slice(prompt);
        let (mut text, mut ids) = (String::new(), Vec::new());
        let finish = loop {
            let id = sampler.sample(&mut logits, turn.history);
            if ids.is_empty() {
                timings.time_to_first_token_ms = ms(started.elapsed());
            }
            if id == self.eos && !opts.ignore_eos {
                break FinishReason::Eos;
            }
            ids.push(id);
            let piece = stream.push(self.tokenizer, id)?.unwrap_or_default();
            let (chunk, stopped) = match stops.push(&piece) {
                StopChunk::Text(t) => (t, false),
                StopChunk::Stopped(t) => (t, true),
            };
            text.push_str(&chunk);
            let flow = on_token(TokenEvent { id: Some(id), text: &chunk });
            if stopped {
                break FinishReason::StopString;
            }
            if ids.len() >= opts.max_new_tokens {
                break FinishReason::MaxTokens;
            }
            if flow == Flow::Stop {
                break FinishReason::Cancelled;
            }
            let t = Instant::now();
            logits = self.lm.forward(turn.kv, &[id], None)?;
            turn.history.push(id);
            timings.decode_ms += ms(t.elapsed());
            timings.decode_steps += 1;
        };
        if finish != FinishReason::StopString {
            let tail = stream.finish(self.tokenizer)?.unwrap_or_default();
            let (chunk, _) = match stops.push(&tail) {
                StopChunk::Text(t) => (t + &stops.finish(), false),
                StopChunk::Stopped(t) => (t, true),
            };
            if !chunk.is_empty() {
                text.push_str(&chunk);
                on_token(TokenEvent { id: None, text: &chunk });
            }
        }
        let unfed = match finish {
            FinishReason::Eos => None,
            _ => ids.last().copied(),
        };
        Ok((Answer { text, token_ids: ids, finish, timings }, unfed))
    }
}

/// Milliseconds as f64.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A `[rows, cols]` copy of a features tensor `[1, rows, cols]`.
pub fn features_2d(features: &ndarray::ArrayViewD<'_, f32>) -> Result<Array2<f32>> {
    let shape = features.shape();
    if shape.len() != 3 || shape[0] != 1 {
        return Err(Error::Request(format!("visual features have shape {shape:?}, expected [1, tokens, hidden]")));
    }
    features
        .to_owned()
        .into_shape_with_order((shape[1], shape[2]))
        .map_err(|e| Error::Request(format!("visual features: {e}")))
}
