//! The serving engine: many conversations batched into one decoder call per step (continuous
//! batching), with chunked prefill, admission control and streaming.
//!
//! One scheduler thread owns the decoder and the KV memory; a vision thread decodes media and
//! runs the vision graph (features are cached by content), so a new video does not hold up the
//! others' tokens. Each step (see `worker.rs`):
//! - **decode first**: every sequence with a token to feed decodes it, in one decoder call per
//!   run of consecutive KV slots (with the in-place decoder of target `onnxruntime`; the
//!   standard-ONNX decoder has a cache per conversation and runs one call per sequence);
//! - **chunked prefill**: then prompts are fed, first come first served, at most
//!   [`EngineOptions::prefill_chunk_tokens`] tokens per step, so a 2,000-token video prompt
//!   delays the others' next token by one chunk, not by the whole prompt;
//! - **admission**: a waiting request starts when fewer than [`EngineOptions::max_active`]
//!   sequences run and its positions (prompt plus `max_new_tokens`) fit the KV budget. A request
//!   that could never fit is refused at once ([`crate::Error::ContextOverflow`]); one that does
//!   not fit now waits in a bounded queue or is refused ([`crate::Error::Overloaded`]), as
//!   [`WhenFull`] says. Memory is reserved, never grown into: no request runs out of it midway.
//! - **eviction**: a kept conversation holds its slot and KV between turns. When a request
//!   needs room, idle conversations are evicted, least recently used first; an evicted
//!   conversation keeps its token history and visual features, and its next follow-up prefills
//!   them again (recompute, as vLLM preempts) before the new question: the answer is the same.
//!
//! - **prefix cache**: a request with a [`Request::cache_key`] (the media's identity) looks for
//!   a finished conversation about the same media whose tokens start its prompt, takes it and
//!   prefills only the rest: a stateless API's follow-up (the whole history sent again) costs
//!   its new tokens, not the video again. Answers are the same as without it (see `prefix.rs`).
//!
//! Cancelling a request (or dropping its [`Handle`]) frees its slot at the next step.
//!
//! ```no_run
//! use std::sync::Arc;
//! use vl_runtime::engine::{Engine, EngineOptions, Event, Request};
//! use vl_runtime::model::{Media, Model, ModelOptions};
//!
//! let model = Arc::new(Model::load("engines/small", ModelOptions::default())?);
//! let engine = Engine::start(model, EngineOptions::default())?;
//! // Requests from many threads (or tasks) are batched together.
//! let handles: Vec<_> = ["What happens?", "What color is the sky?"]
//!     .into_iter()
//!     .map(|q| engine.submit(Request::new(Media::VideoFile("clip.mp4".into()), q)))
//!     .collect::<Result<_, _>>()?;
//! for handle in handles {
//!     while let Some(event) = handle.recv() {
//!         match event {
//!             Event::Token { text, .. } => print!("{text}"),
//!             Event::Done(done) => println!("\n[{:?}]", done.answer.finish),
//!             Event::Failed(e) => eprintln!("error: {e}"),
//!         }
//!     }
//! }
//! # Ok::<(), vl_runtime::Error>(())
//! ```
mod options;
mod plan;
mod pool;
mod prefix;
mod request;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::thread::JoinHandle;
use std::time::Instant;

pub use options::{EngineOptions, KvPlacement, WhenFull};
pub use request::{ConversationId, Done, Event, FollowUp, Handle, Pace, Request};

use crate::error::{Error, Overload, Result};
use crate::generate::Decoding;
use crate::model::{Media, Model};
use crate::prompt::PromptBuilder;
use request::Control;
use worker::{Client, Continue, Lookup, Msg, Shared, Start, Worker};

/// What the engine is doing, as of its last step.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    /// Requests submitted and not started yet (vision, or waiting for room).
    pub waiting: usize,
    /// Sequences prefilling or decoding.
    pub active: usize,
    /// Conversations known (active and idle).
    pub conversations: usize,
    /// KV bytes held or reserved.
    pub kv_bytes_held: u64,
    /// The most KV bytes ever held or reserved at once.
    pub kv_bytes_peak: u64,
    /// The KV budget.
    pub kv_budget_bytes: u64,
    /// Decode calls run.
    pub decode_calls: u64,
    /// Sequence-tokens decoded (the rows of all decode calls that decoded).
    pub decode_rows: u64,
    /// Prompt tokens prefilled.
    pub prefill_tokens: u64,
    /// Decode rows whose token came from the decoder's `next_token` (its `ArgMax`; every row
    /// of the call greedy, no logits asked for) instead of its logits.
    pub argmax_rows: u64,
    /// Idle conversations evicted to make room.
    pub evictions: u64,
    /// KV bytes held or reserved by sequences prefilling or decoding (the rest of
    /// `kv_bytes_held` is idle conversations').
    pub kv_bytes_active: u64,
    /// Conversations in the prefix cache.
    pub prefix_cached: usize,
    /// Requests that continued from a cached conversation.
    pub prefix_hits: u64,
    /// Prompt tokens those requests did not prefill again.
    pub prefix_tokens_reused: u64,
    /// Whether decode steps batch sequences into one call (the in-place decoder).
    pub batched: bool,
}

/// Positions the KV budget allows: the budget in bytes, or every slot at full length.
fn budget_positions(options: &EngineOptions, context: usize, bytes_per_position: u64) -> usize {
    match options.kv_budget_bytes {
        Some(bytes) => usize::try_from(bytes / bytes_per_position.max(1)).unwrap_or(usize::MAX),
        None => options.slots * context,
    }
}

/// A media decode and vision run, then the request goes to the scheduler.
pub(crate) struct VisionJob {
    media: Media,
    start: Box<Start>,
}

/// The running engine. Dropping it stops its threads; unfinished requests end with
/// [`Error::EngineStopped`].
pub struct Engine {
    model: Arc<Model>,
    options: EngineOptions,
    shared: Arc<Shared>,
    vision: Option<Sender<VisionJob>>,
    threads: Vec<JoinHandle<()>>,
    next_conversation: AtomicU64,
    limit: usize,
}

impl Engine {
    /// Starts the scheduler and vision threads for `model`.
    pub fn start(model: Arc<Model>, options: EngineOptions) -> Result<Self> {
        if options.max_active == 0 || options.slots < options.max_active {
            return Err(Error::Request(format!(
                "engine options: max_active {} must be at least 1 and at most slots {}",
                options.max_active, options.slots
            )));
        }
        let shared = Arc::new(Shared::new());
        let (vision_tx, vision_rx) = channel::<VisionJob>();
        // The scheduler sends the prefix cache's misses to the vision thread.
        let worker = Worker::new(model.clone(), shared.clone(), options.clone(), vision_tx.clone())?;
        let limit = worker.limit();
        let scheduler = std::thread::Builder::new()
            .name("vl-scheduler".into())
            .spawn(move || worker.run())
            .map_err(|e| Error::Request(format!("could not start the scheduler thread: {e}")))?;
        let (vm, vs) = (model.clone(), shared.clone());
        let vision = std::thread::Builder::new()
            .name("vl-vision".into())
            .spawn(move || {
                for job in vision_rx {
                    let mut start = job.start;
                    match vm.visual(&job.media) {
                        Ok(visual) => {
                            start.visual = visual;
                            vs.send(Msg::Start(start));
                        }
                        Err(e) => {
                            vs.waiting.fetch_sub(1, Ordering::AcqRel);
                            let _ = start.client.events.send(Event::Failed(e));
                        }
                    }
                }
            })
            .map_err(|e| Error::Request(format!("could not start the vision thread: {e}")))?;
        Ok(Self {
            model,
            options,
            shared,
            vision: Some(vision_tx),
            threads: vec![scheduler, vision],
            next_conversation: AtomicU64::new(1),
            limit,
        })
    }

    /// The loaded engine directory.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// What the engine is doing.
    pub fn stats(&self) -> EngineStats {
        self.shared.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn client(&self, pace: request::Pace, logits: bool) -> (Client, Handle) {
        let (tx, rx) = channel();
        let control = Control::new(self.shared.wake.clone());
        let client = Client { events: tx, control: control.clone(), pace, logits };
        (client, Handle { events: rx, control, conversation: None })
    }

    /// Takes a place in the queue, or refuses when it is full.
    fn enqueue(&self) -> Result<()> {
        let waiting = self.shared.waiting.fetch_add(1, Ordering::AcqRel);
        if let WhenFull::Queue { max_waiting } = self.options.when_full
            && waiting >= max_waiting
        {
            self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::Overloaded(Overload::QueueFull { waiting }));
        }
        Ok(())
    }

    /// Submits a first question. Invalid options, a prompt that cannot fit and a full queue
    /// are errors here, before any work; everything after arrives on the handle.
    pub fn submit(&self, request: Request) -> Result<Handle> {
        let started = Instant::now();
        let decoding = Decoding::new(&request.options, self.model.manifest().tokens.eos, started)?;
        let m = self.model.manifest();
        let prompt = PromptBuilder::new(self.model.tokenizer(), &m.chat_template, &m.tokens).conversation(
            self.model.slot(&request.media),
            &request.earlier,
            &request.question,
        )?;
        let max_new = request.options.max_new_tokens;
        // Saturating: `max_tokens` comes from the client, and usize::MAX must not wrap past the check.
        let needed = prompt.len().saturating_add(max_new);
        if needed > self.limit {
            return Err(Error::ContextOverflow { needed, max_new, limit: self.limit });
        }
        self.enqueue()?;
        let (client, mut handle) = self.client(request.pace, request.logits);
        let conv = ConversationId(self.next_conversation.fetch_add(1, Ordering::Relaxed));
        let cache = request.cache_key.filter(|_| self.options.prefix_cache > 0);
        if request.keep && cache.is_none() {
            handle.conversation = Some(conv);
        }
        let keep = request.keep && cache.is_none();
        let start = Box::new(Start { conv, keep, cache, prompt, visual: None, max_new, decoding, client });
        if start.cache.is_some() {
            // The scheduler looks in the prefix cache, and sends a miss with media to vision.
            self.shared.send(Msg::Lookup(Box::new(Lookup { media: request.media, start })));
            return Ok(handle);
        }
        match (&request.media, &self.vision) {
            (Media::Text, _) => self.shared.send(Msg::Start(start)),
            (media, Some(vision)) => {
                if let Err(job) = vision.send(VisionJob { media: media.clone(), start }) {
                    self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
                    let _ = job.0.start.client.events.send(Event::Failed(Error::EngineStopped));
                }
            }
            (_, None) => return Err(Error::EngineStopped),
        }
        Ok(handle)
    }

    /// Submits the next question of a kept conversation. It fails on its handle if the
    /// conversation is unknown, busy, or would overflow its context.
    pub fn follow_up(&self, follow_up: FollowUp) -> Result<Handle> {
        let decoding = Decoding::new(&follow_up.options, self.model.manifest().tokens.eos, Instant::now())?;
        self.enqueue()?;
        let (client, mut handle) = self.client(follow_up.pace, follow_up.logits);
        handle.conversation = Some(follow_up.conversation);
        self.shared.send(Msg::Continue(Box::new(Continue {
            conv: follow_up.conversation,
            question: follow_up.question,
            max_new: follow_up.options.max_new_tokens,
            decoding,
            client,
        })));
        Ok(handle)
    }

    /// Forgets a kept conversation and frees its slot (after its running answer, if any).
    pub fn close(&self, conversation: ConversationId) {
        self.shared.send(Msg::Close(conversation));
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.notify();
        self.vision = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
