//! The simple entry point: load an engine once, then converse; concurrent conversations are
//! batched by the serving engine underneath.
use std::path::Path;
use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::engine::{ConversationId, Engine, EngineOptions, FollowUp, Pace, Request};
use crate::error::{Error, Result};
use crate::generate::{Answer, Flow, GenerateOptions, LanguageModel, TokenEvent};
use crate::graph::SessionOptions;
use crate::manifest::Manifest;
use crate::model::{DecoderChoice, Model, ModelOptions};
pub use crate::model::{Media, Visual};
use crate::verify::Verify;
use crate::video::DecodeOptions;

/// How to load an engine.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Sessions: device, threads, arena.
    pub session: SessionOptions,
    /// How to check the graph files against the manifest.
    pub verify: Verify,
    /// Visual features kept for reuse (by content), across conversations.
    pub feature_cache_entries: usize,
    /// Which decoder graph to run.
    pub decoder: DecoderChoice,
    /// How video and image files are decoded: ffmpeg's time limit, the largest frame.
    pub decode: DecodeOptions,
    /// Batching, limits and KV memory of the serving engine.
    pub engine: EngineOptions,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        let m = ModelOptions::default();
        Self {
            session: m.session,
            verify: m.verify,
            feature_cache_entries: m.feature_cache_entries,
            decoder: m.decoder,
            decode: m.decode,
            engine: EngineOptions::default(),
        }
    }
}

/// A loaded engine. `Send + Sync`: share it (e.g. in an `Arc`) across request threads; their
/// conversations decode together in batched steps.
pub struct Pipeline {
    engine: Engine,
}

impl Pipeline {
    /// Loads the engine in `dir`: manifest, file checks, tokenizer, sessions (checked against
    /// the manifest), and starts the serving engine.
    pub fn load(dir: impl AsRef<Path>, options: PipelineOptions) -> Result<Self> {
        let mut session = options.session;
        // TensorRT's profiles cover the decode batches and prefill chunks the engine runs.
        session.tensorrt.max_batch = options.engine.max_active;
        session.tensorrt.opt_sequence = options.engine.prefill_chunk_tokens;
        let model = ModelOptions {
            session,
            verify: options.verify,
            feature_cache_entries: options.feature_cache_entries,
            decoder: options.decoder,
            decode: options.decode,
        };
        let model = Arc::new(Model::load(dir, model)?);
        Ok(Self { engine: Engine::start(model, options.engine)? })
    }

    /// The engine's manifest.
    pub fn manifest(&self) -> &Manifest {
        self.engine.model().manifest()
    }

    /// The device the graphs run on, and why (`auto` resolves at load).
    pub fn device(&self) -> &crate::device::Resolved {
        self.engine.model().device()
    }

    /// The engine's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        self.engine.model().tokenizer()
    }

    /// The serving engine (submit requests, watch its statistics).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Starts a conversation about `media`. Nothing runs until the first question.
    pub fn conversation(&self, media: Media) -> Result<Conversation<'_>> {
        Ok(Conversation { pipeline: self, media: Some(media), id: None, context_len: 0 })
    }

    /// Decodes, preprocesses and runs the vision graph for `media` (or takes cached features).
    pub fn visual(&self, media: &Media) -> Result<Option<Visual>> {
        self.engine.model().visual(media)
    }

    /// The embedding and decoder graphs, for callers that drive the decoder themselves
    /// (evaluation, benchmarks).
    pub fn language_model(&self) -> LanguageModel<'_> {
        self.engine.model().language_model()
    }
}

/// One conversation: the engine keeps its KV cache between questions.
pub struct Conversation<'p> {
    pipeline: &'p Pipeline,
    /// Kept until the first answer succeeds, so a failed first question can be asked again.
    media: Option<Media>,
    id: Option<ConversationId>,
    context_len: usize,
}

impl Conversation<'_> {
    /// Asks `question`, streaming tokens to `on_token` as they are made; [`Flow::Stop`] ends
    /// the answer after that token.
    pub fn ask(
        &mut self,
        question: &str,
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(TokenEvent<'_>) -> Flow,
    ) -> Result<Answer> {
        let engine = &self.pipeline.engine;
        let handle = match (&self.media, self.id) {
            (Some(media), _) => engine.submit(Request {
                options: opts.clone(),
                keep: true,
                pace: Pace::Lockstep,
                ..Request::new(media.clone(), question)
            })?,
            (None, Some(conversation)) => engine.follow_up(FollowUp {
                conversation,
                question: question.to_string(),
                options: opts.clone(),
                pace: Pace::Lockstep,
                logits: false,
            })?,
            (None, None) => return Err(Error::Conversation("this conversation has no media and no history")),
        };
        let done = handle.wait(on_token)?;
        if done.conversation.is_some() {
            self.id = done.conversation;
            self.media = None;
        }
        self.context_len = done.context_len;
        Ok(done.answer)
    }

    /// Positions held in the KV cache.
    pub fn context_len(&self) -> usize {
        self.context_len
    }
}

impl Drop for Conversation<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.pipeline.engine.close(id);
        }
    }
}
