//! Running the language model: embedding, visual splicing, one decoder call per step, and the
//! sampling loop with streaming and stop conditions.
use std::time::{Duration, Instant};

use ndarray::Array2;
use ort::memory::MemoryInfo;
use ort::value::{DynTensor, DynTensorValueType, Tensor};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
pub use crate::features::{Features, Splice};
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
    /// Where the embeddings are kept between `embed.onnx` and the decoder (the device's memory).
    pub memory: &'a MemoryInfo<'static>,
    /// Zero feature rows, for embedding calls without a splice.
    pub no_features: &'a Tensor<f32>,
}

impl LanguageModel<'_> {
    /// `rows` sequences of `ids.len() / rows` tokens each, embedded with `splice`'s features at
    /// its placeholders, left in [`Self::memory`] for the decoder: `[rows, tokens, hidden]`.
    pub(crate) fn embed(&self, ids: &[u32], rows: usize, splice: Option<&Splice<'_>>) -> Result<DynTensor> {
        if rows == 0 || !ids.len().is_multiple_of(rows) {
            return Err(Error::Request(format!("{} token ids for {rows} rows", ids.len())));
        }
        let shape = [rows, ids.len() / rows];
        let index = match splice {
            Some(s) => s.index(ids)?,
            None => vec![-1; ids.len()],
        };
        let ids = Tensor::from_array((shape, ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>()))?;
        let index = Tensor::from_array((shape, index))?;
        let mut session = self.embed.lock();
        let mut binding = session.create_binding()?;
        binding.bind_input("input_ids", &ids)?;
        binding.bind_input("visual_index", &index)?;
        binding.bind_input("visual_features", splice.map_or(self.no_features, |s| s.features.value()))?;
        binding.bind_output_to_device("inputs_embeds", self.memory)?;
        let mut outputs = session.run_binding(&binding)?;
        let embeds =
            outputs.remove("inputs_embeds").ok_or(Error::Request("embed.onnx gave no inputs_embeds".into()))?;
        Ok(embeds.downcast::<DynTensorValueType>()?)
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
        let embeds = self.embed(ids, 1, splice)?;
        let past = kv.len();
        let total = past + ids.len();
        let mask = self.mask_ones.get(..total).ok_or(Error::ContextOverflow {
            needed: total,
            max_new: 0,
            limit: self.mask_ones.len(),
        })?;
        if kv.layout() == KvLayout::SharedBuffer {
            let inputs = StepInputs {
                embeds,
                mask: Tensor::from_array(([1usize, total], mask.to_vec()))?,
                keep,
                vocab: self.vocab,
            };
            let mut session = self.decoder.lock();
            return kv.run_bound(&mut session, inputs, self.mask_ones.len());
        }
        let positions = Tensor::from_array(([1usize, ids.len()], (past as i64..total as i64).collect::<Vec<_>>()))?;
        // Owned: `IoBinding::bind_input` would clone a borrowed tensor through a session of its own.
        let mask = Tensor::from_array(([1usize, total], mask.to_vec()))?;
        let keep = Tensor::from_array(([1usize], vec![keep as i64]))?;
        let mut session = self.decoder.lock();
        // The new `present.*` stay in the device's memory and come back as the next step's
        // past; only the logits come to the host.
        let mut binding = session.create_binding()?;
        binding.bind_input("inputs_embeds", &embeds)?;
        binding.bind_input("attention_mask", &mask)?;
        binding.bind_input("position_ids", &positions)?;
        binding.bind_input("logits_to_keep", &keep)?;
        for (name, value) in kv.inputs() {
            binding.bind_input(name, value)?;
        }
        for name in kv.output_names() {
            binding.bind_output_to_device(name.as_str(), self.memory)?;
        }
        binding.bind_output_to_device("logits", &MemoryInfo::default())?;
        let mut outputs = session.run_binding(&binding)?;
        let (_, logits) = outputs["logits"].try_extract_tensor::<f32>()?;
        let logits = logits.to_vec();
        kv.update(&mut outputs, ids.len())?;
        Ok(logits)
    }
}

/// What to do after a sampled token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Feed this token to the model and sample again.
    Feed(u32),
    /// The answer is complete.
    Finished(FinishReason),
}

/// The sampling loop of one answer, one token at a time: sampling, stop strings, incremental
/// detokenization and the answer being built. The caller runs the model between tokens.
pub struct Decoding {
    sampler: Sampler,
    stops: StopMatcher,
    stream: StreamDecoder,
    text: String,
    ids: Vec<u32>,
    max_new_tokens: usize,
    ignore_eos: bool,
    eos: u32,
    started: Instant,
    /// Where the time went (the caller adds the model's share).
    pub timings: Timings,
}

impl Decoding {
    /// Checks `opts` (an error here means no work was done) and starts an answer whose request
    /// began at `started`.
    pub fn new(opts: &GenerateOptions, eos: u32, started: Instant) -> Result<Self> {
        Ok(Self {
            sampler: Sampler::new(opts.sampling)?,
            stops: StopMatcher::new(opts.stop.iter().cloned())?,
            stream: StreamDecoder::new(),
            text: String::new(),
            ids: Vec::new(),
            max_new_tokens: opts.max_new_tokens,
            ignore_eos: opts.ignore_eos,
            eos,
            started,
            timings: Timings::default(),
        })
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.ids.len()
    }

    /// Samples the next token from `logits` (`history`: every id fed so far, for the repetition
    /// penalty; the answer's own ids for the frequency and presence penalties) and streams its text to `emit`. `emit`'s answer ends the answer after this token.
    pub fn step(
        &mut self,
        tokenizer: &Tokenizer,
        logits: &mut [f32],
        history: &[u32],
        emit: &mut dyn FnMut(TokenEvent<'_>) -> Flow,
    ) -> Result<Next> {
        let id = self.sampler.sample_answer(logits, history, &self.ids);
        self.step_chosen(tokenizer, id, emit)
    }

    /// Whether the next token is the logits' argmax as they come (see
    /// [`Sampler::takes_argmax`]): the decoder's `next_token` output can be fed to
    /// [`Self::step_chosen`] instead of its logits to [`Self::step`].
    pub fn takes_argmax(&self) -> bool {
        self.sampler.takes_argmax()
    }

    /// [`Self::step`] with the token already chosen (the decoder's `next_token` output, when
    /// [`Self::takes_argmax`]).
    pub fn step_chosen(
        &mut self,
        tokenizer: &Tokenizer,
        id: u32,
        emit: &mut dyn FnMut(TokenEvent<'_>) -> Flow,
    ) -> Result<Next> {
        if self.ids.is_empty() {
            self.timings.time_to_first_token_ms = ms(self.started.elapsed());
        }
        if id == self.eos && !self.ignore_eos {
            return Ok(Next::Finished(FinishReason::Eos));
        }
        self.ids.push(id);
        let piece = self.stream.push(tokenizer, id)?.unwrap_or_default();
        let (chunk, stopped) = match self.stops.push(&piece) {
            StopChunk::Text(t) => (t, false),
            StopChunk::Stopped(t) => (t, true),
        };
        self.text.push_str(&chunk);
        let flow = emit(TokenEvent { id: Some(id), text: &chunk });
        Ok(if stopped {
            Next::Finished(FinishReason::StopString)
        } else if self.ids.len() >= self.max_new_tokens {
            Next::Finished(FinishReason::MaxTokens)
        } else if flow == Flow::Stop {
            Next::Finished(FinishReason::Cancelled)
        } else {
            Next::Feed(id)
        })
    }

    /// Ends the answer: flushes held-back text to `emit` and returns the answer with the last
    /// generated token if the model has not been fed it (the next turn must feed it first).
    pub fn finish(
        &mut self,
        tokenizer: &Tokenizer,
        finish: FinishReason,
        emit: &mut dyn FnMut(TokenEvent<'_>) -> Flow,
    ) -> Result<(Answer, Option<u32>)> {
        if finish != FinishReason::StopString {
            let tail = self.stream.finish(tokenizer)?.unwrap_or_default();
            let chunk = match self.stops.push(&tail) {
                StopChunk::Text(t) => t + &self.stops.finish(),
                StopChunk::Stopped(t) => t,
            };
            if !chunk.is_empty() {
                self.text.push_str(&chunk);
                emit(TokenEvent { id: None, text: &chunk });
            }
        }
        let unfed = match finish {
            FinishReason::Eos => None,
            _ => self.ids.last().copied(),
        };
        let answer = Answer {
            text: std::mem::take(&mut self.text),
            token_ids: std::mem::take(&mut self.ids),
            finish,
            timings: std::mem::take(&mut self.timings),
        };
        Ok((answer, unfed))
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
