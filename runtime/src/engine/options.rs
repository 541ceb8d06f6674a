//! What a service decides about the engine: how many sequences run at once, how much KV memory
//! they may hold, how much prompt each step prefills, and what happens when it is full.

/// Limits and scheduling settings of an [`crate::engine::Engine`].
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Sequences prefilling or decoding at once (the rows of a decode call).
    pub max_active: usize,
    /// KV slots: the active sequences plus idle conversations kept for their follow-ups.
    pub slots: usize,
    /// Bytes of KV cache the engine may hold: every position a sequence holds or has reserved
    /// (its prompt plus `max_new_tokens`) counts. `None`: `slots` full-length contexts.
    pub kv_budget_bytes: Option<u64>,
    /// Prompt tokens prefilled per step besides the decode row of every running sequence
    /// (chunked prefill): the most a long prompt delays the others' next token.
    pub prefill_chunk_tokens: usize,
    /// What happens to a request that cannot start when it arrives.
    pub when_full: WhenFull,
    /// Finished conversations kept for requests that carry a
    /// [`crate::engine::Request::cache_key`] (the prefix cache); beyond this many, the least
    /// recently used are dropped. They hold KV slots only while no request needs the room
    /// (then they are evicted like any idle conversation, keeping their tokens and visual
    /// features). 0: no prefix cache.
    pub prefix_cache: usize,
    /// Where the in-place decoder's KV slots live.
    pub kv_placement: KvPlacement,
}

/// Where the KV slots of the in-place decoder live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvPlacement {
    /// Device memory on a GPU ([`KvPlacement::Allocated`]); host mappings on the CPU.
    #[default]
    Auto,
    /// Anonymous host mappings: pages are committed when first written and handed back when a
    /// slot is freed, so resident memory follows the positions in use.
    Host,
    /// Every slot allocated up front, once, by the decoder session's allocator on its device
    /// (CUDA: GPU memory, so decode steps never copy the cache; the CPU: ONNX Runtime's CPU
    /// allocator).
    Allocated,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_active: 8,
            slots: 16,
            kv_budget_bytes: None,
            prefill_chunk_tokens: 512,
            when_full: WhenFull::Queue { max_waiting: 64 },
            prefix_cache: 8,
            kv_placement: KvPlacement::Auto,
        }
    }
}

/// The policy for requests that arrive while the engine is at its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Wait, first come first served, in a queue of at most `max_waiting` requests; a request
    /// arriving at a full queue is refused with [`crate::Error::Overloaded`].
    Queue {
        /// Requests waiting (for the vision graph or for room) before new ones are refused.
        max_waiting: usize,
    },
    /// Refuse with [`crate::Error::Overloaded`] any request that cannot start at the next step.
    Reject,
}
