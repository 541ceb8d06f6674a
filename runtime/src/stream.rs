//! Turning generated token ids into text as they arrive, and cutting the answer at stop strings.
//!
//! [`StreamDecoder`] uses the technique of text-generation-inference and transformers'
//! `TextStreamer`: it decodes a short window of recent ids twice, with and without the newest
//! ones, and emits the difference only once it no longer ends with U+FFFD (an incomplete
//! multi-byte character). The chunks concatenate to exactly the text of decoding all the ids at
//! once. [`StopMatcher`] then holds back text that may be the start of a stop string.
//!
//! ```no_run
//! use vl_runtime::stream::{StopChunk, StopMatcher, StreamDecoder};
//!
//! # fn run(tokenizer: &tokenizers::Tokenizer, ids: &[u32]) -> Result<(), vl_runtime::stream::StreamError> {
//! let mut decoder = StreamDecoder::new();
//! let mut stops = StopMatcher::new(["\nUSER:"])?;
//! for &id in ids {
//!     let Some(text) = decoder.push(tokenizer, id)? else { continue };
//!     match stops.push(&text) {
//!         StopChunk::Text(text) => print!("{text}"),
//!         StopChunk::Stopped(text) => { print!("{text}"); return Ok(()); }
//!     }
//! }
//! let rest = decoder.finish(tokenizer)?.unwrap_or_default();
//! if let StopChunk::Text(text) | StopChunk::Stopped(text) = stops.push(&rest) {
//!     print!("{text}{}", stops.finish());
//! }
//! # Ok(())
//! # }
//! ```
use tokenizers::Tokenizer;

/// The replacement character a decoder writes for bytes that are not (yet) valid UTF-8.
const REPLACEMENT: char = '\u{FFFD}';

/// How many prompt ids [`StreamDecoder::with_context`] keeps as context (as
/// text-generation-inference does).
const CONTEXT_IDS: usize = 5;

/// What can go wrong while streaming text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The tokenizer failed to decode ids.
    #[error("decoding token ids failed: {0}")]
    Decode(#[source] tokenizers::Error),
    /// Decoding more ids changed text already emitted, so no suffix can be streamed (a
    /// decoder whose output depends on later tokens, such as WordPiece's cleanup).
    #[error("decoding more ids changed the text already emitted ({emitted:?} became {decoded:?})")]
    PrefixChanged {
        /// The text of the window as emitted so far.
        emitted: String,
        /// The text of the window with the new ids.
        decoded: String,
    },
    /// A stop string is empty, which would stop before the first character.
    #[error("stop string {index} is empty")]
    EmptyStopString {
        /// Its position in the list given.
        index: usize,
    },
}

/// Incremental detokenizer: feed it ids one at a time, get text that is always whole UTF-8.
///
/// Special tokens are skipped, as with `decode(ids, skip_special_tokens = true)`.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    /// Every id pushed, after the context ids if any.
    ids: Vec<u32>,
    /// Start of the decode window: ids before it are never decoded again.
    prefix_offset: usize,
    /// End of the ids whose text has been emitted.
    read_offset: usize,
    /// `decode(ids[prefix_offset..read_offset])`, kept to decode once per step.
    prefix_text: String,
}

impl StreamDecoder {
    /// A decoder for a fresh sequence: its chunks concatenate to `decode(generated ids)`.
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder that continues after `context` (the prompt's ids), of which it keeps the last
    /// few so the first tokens decode as they do mid-sentence.
    ///
    /// With a SentencePiece-style tokenizer the first chunk may then start with the space that
    /// `decode(generated ids)` alone would strip.
    pub fn with_context(tokenizer: &Tokenizer, context: &[u32]) -> Result<Self, StreamError> {
        let ids = context[context.len().saturating_sub(CONTEXT_IDS)..].to_vec();
        let prefix_text = decode(tokenizer, &ids)?;
        Ok(Self { read_offset: ids.len(), ids, prefix_offset: 0, prefix_text })
    }

    /// Adds one generated id; returns the new text, or `None` while it is incomplete (a
    /// partial multi-byte character, or a skipped special token).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>, StreamError> {
        self.ids.push(id);
        let text = decode(tokenizer, &self.ids[self.prefix_offset..])?;
        if text.len() <= self.prefix_text.len() || text.ends_with(REPLACEMENT) {
            return Ok(None);
        }
        self.emit(tokenizer, text).map(Some)
    }

    /// Flushes what is still held back at the end of generation, even if it ends with
    /// U+FFFD (bytes that never became a whole character).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>, StreamError> {
        if self.read_offset == self.ids.len() {
            return Ok(None);
        }
        let text = decode(tokenizer, &self.ids[self.prefix_offset..])?;
        if text.len() <= self.prefix_text.len() {
            self.read_offset = self.ids.len();
            return Ok(None);
        }
        self.emit(tokenizer, text).map(Some)
    }

    /// Returns the part of `text` (the decoded window) after the emitted prefix and moves the
    /// window forward.
    fn emit(&mut self, tokenizer: &Tokenizer, text: String) -> Result<String, StreamError> {
        let Some(new_text) = text.strip_prefix(self.prefix_text.as_str()) else {
            return Err(StreamError::PrefixChanged { emitted: std::mem::take(&mut self.prefix_text), decoded: text });
        };
        let new_text = new_text.to_owned();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.prefix_text = decode(tokenizer, &self.ids[self.prefix_offset..self.read_offset])?;
        Ok(new_text)
    }
}

/// Decodes `ids` skipping special tokens.
fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String, StreamError> {
    tokenizer.decode(ids, true).map_err(StreamError::Decode)
}

/// What [`StopMatcher::push`] lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopChunk {
    /// Text that cannot be part of a stop string (possibly empty); generation goes on.
    Text(String),
    /// A stop string is complete: the text before it (possibly empty); generation should end.
    Stopped(String),
}

/// Watches streamed text for stop strings, holding back any tail that could begin one.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet let through.
    pending: String,
    /// Set once a stop string was found; everything after it is dropped.
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops`; none may be empty. With no stop strings, all text goes through.
    pub fn new<I, S>(stops: I) -> Result<Self, StreamError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let stops: Vec<String> = stops.into_iter().map(Into::into).collect();
        if let Some(index) = stops.iter().position(String::is_empty) {
            return Err(StreamError::EmptyStopString { index });
        }
        Ok(Self { stops, pending: String::new(), stopped: false })
    }

    /// Whether a stop string has been seen.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Takes the next chunk of text; after a stop, returns `Stopped` with empty text.
    pub fn push(&mut self, chunk: &str) -> StopChunk {
        if self.stopped {
            return StopChunk::Stopped(String::new());
        }
        self.pending.push_str(chunk);
        if let Some(start) = self.earliest_stop() {
            self.stopped = true;
            self.pending.truncate(start);
            return StopChunk::Stopped(std::mem::take(&mut self.pending));
        }
        let held = self.held_back_start();
        let rest = self.pending.split_off(held);
        StopChunk::Text(std::mem::replace(&mut self.pending, rest))
    }

    /// Releases the text held back at the end of generation (none after a stop).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Byte position of the stop string that completes first in the pending text (the
    /// earliest end, then the earliest start): where generation, token by token, would have
    /// stopped, whatever the chunking. Stops overlapping it that start earlier but end later
    /// never complete.
    fn earliest_stop(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|stop| self.pending.find(stop.as_str()).map(|start| (start + stop.len(), start)))
            .min()
            .map(|(_, start)| start)
    }

    /// Byte position where the longest tail of the pending text that is a proper prefix of a
    /// stop string begins (the pending text's length when there is none).
    fn held_back_start(&self) -> usize {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let earliest = self.pending.len().saturating_sub(longest.saturating_sub(1));
        self.pending
            .char_indices()
            .map(|(index, _)| index)
            .filter(|&index| index >= earliest)
            .find(|&index| {
                let tail = &self.pending[index..];
                self.stops.iter().any(|stop| stop.starts_with(tail))
            })
            .unwrap_or(self.pending.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::decoders::byte_level::ByteLevel;
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::{
        AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerBuilder,
    };

    type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

    const CORPUS: [&str; 5] = [
        "The café serves crème brûlée and a small espresso.",
        "日本語のテキストも少しあります。",
        "We watch a movie 🎬 together, then talk about the movie.",
        "The video shows a person riding a horse on the beach.",
        "A café in Tokyo: 日本語 menus and 🎬 posters.",
    ];

    const TEXT: &str = "The café 日本語 🎬 shows a horse; crème brûlée! 🎬🎬 日本";

    /// A small byte-level BPE (as GPT-2) trained on [`CORPUS`], with one special token.
    fn byte_level_tokenizer() -> Result<Tokenizer, Box<dyn std::error::Error + Send + Sync>> {
        let byte_level = ByteLevel::new(false, true, true);
        let mut tokenizer = TokenizerBuilder::<
            BPE,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        >::default()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(byte_level.into()))
        .with_decoder(Some(byte_level.into()))
        .build()?;
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(320)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(vec![AddedToken::from("<|end|>", true)])
            .build();
        tokenizer.train(&mut trainer, CORPUS.iter())?;
        Ok(tokenizer.into())
    }

    /// A tokenizer built like Llama's (Video-LLaVA's): SentencePiece-style `▁`, characters
    /// outside the vocabulary as `<0xNN>` byte tokens, and a decoder that strips one leading
    /// space.
    fn llama_style_tokenizer() -> Result<Tokenizer, Box<dyn std::error::Error + Send + Sync>> {
        let mut vocab = serde_json::Map::new();
        for token in ["<unk>", "<s>", "</s>"] {
            vocab.insert(token.into(), vocab.len().into());
        }
        for byte in 0..=255_u8 {
            vocab.insert(format!("<0x{byte:02X}>"), vocab.len().into());
        }
        for c in "▁abcdefghijklmnopqrstuvwxyzTCAé;!.".chars() {
            vocab.insert(c.to_string(), vocab.len().into());
        }
        let special = |id: usize, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        };
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": true,
                "byte_fallback": true, "vocab": vocab, "merges": []},
        });
        json.to_string().parse()
    }

    /// Streams `ids` and returns the chunks, `finish`'s included, and how many pushes held
    /// their text back.
    fn stream(tokenizer: &Tokenizer, ids: &[u32]) -> Result<(Vec<String>, usize), StreamError> {
        let mut decoder = StreamDecoder::new();
        let mut chunks = Vec::new();
        let mut held = 0;
        for &id in ids {
            match decoder.push(tokenizer, id)? {
                Some(chunk) => chunks.push(chunk),
                None => held += 1,
            }
        }
        chunks.extend(decoder.finish(tokenizer)?);
        Ok((chunks, held))
    }

    fn assert_streams_like_full_decode(tokenizer: &Tokenizer, ids: &[u32]) -> TestResult {
        let (chunks, held) = stream(tokenizer, ids)?;
        assert!(held > 0, "no multi-byte character was split across tokens");
        for chunk in &chunks {
            assert!(!chunk.is_empty() && !chunk.contains(REPLACEMENT), "bad chunk {chunk:?}");
        }
        assert_eq!(chunks.concat(), tokenizer.decode(ids, true)?);
        Ok(())
    }

    #[test]
    fn byte_level_chunks_are_whole_characters() -> TestResult {
        let tokenizer = byte_level_tokenizer()?;
        let mut ids = tokenizer.encode(TEXT, false)?.get_ids().to_vec();
        assert_eq!(tokenizer.decode(&ids, true)?, TEXT);
        let end = tokenizer.token_to_id("<|end|>").ok_or("no <|end|> token")?;
        ids.insert(3, end);
        ids.push(end);
        assert_streams_like_full_decode(&tokenizer, &ids)
    }

    #[test]
    fn llama_style_chunks_are_whole_characters() -> TestResult {
        let tokenizer = llama_style_tokenizer()?;
        let mut ids = tokenizer.encode(TEXT, false)?.get_ids().to_vec();
        assert_eq!(tokenizer.decode(&ids, true)?, TEXT);
        ids.push(2);
        assert_streams_like_full_decode(&tokenizer, &ids)?;
        let (chunks, _) = stream(&tokenizer, &ids)?;
        assert!(chunks[0].starts_with('T'), "leading space not stripped: {chunks:?}");
        Ok(())
    }

    #[test]
    fn context_keeps_the_leading_space() -> TestResult {
        let tokenizer = llama_style_tokenizer()?;
        let prompt = tokenizer.encode("a horse", false)?.get_ids().to_vec();
        let answer = tokenizer.encode("café", false)?.get_ids().to_vec();
        let mut decoder = StreamDecoder::with_context(&tokenizer, &prompt)?;
        let mut text = String::new();
        for &id in &answer {
            text.extend(decoder.push(&tokenizer, id)?);
        }
        text.extend(decoder.finish(&tokenizer)?);
        assert_eq!(text, " café");
        Ok(())
    }

    #[test]
    fn finish_flushes_an_incomplete_character() -> TestResult {
        let tokenizer = byte_level_tokenizer()?;
        let ids = tokenizer.encode("🎬", false)?.get_ids().to_vec();
        assert!(ids.len() > 1, "emoji is a single token");
        let truncated = &ids[..ids.len() - 1];
        let mut decoder = StreamDecoder::new();
        for &id in truncated {
            assert_eq!(decoder.push(&tokenizer, id)?, None);
        }
        let rest = decoder.finish(&tokenizer)?;
        assert_eq!(rest, Some(tokenizer.decode(truncated, true)?));
        assert_eq!(decoder.finish(&tokenizer)?, None);
        Ok(())
    }

    fn run_stops(stops: &[&str], chunks: &[&str]) -> (String, bool) {
        let mut matcher = StopMatcher::new(stops.iter().copied()).expect("valid stop strings");
        let mut out = String::new();
        for chunk in chunks {
            match matcher.push(chunk) {
                StopChunk::Text(text) => out.push_str(&text),
                StopChunk::Stopped(text) => {
                    out.push_str(&text);
                    return (out, true);
                }
            }
        }
        out.push_str(&matcher.finish());
        (out, false)
    }

    #[test]
    fn stop_string_split_across_chunks() {
        let mut matcher = StopMatcher::new(["\nUSER:"]).expect("valid stop strings");
        assert_eq!(matcher.push("Hello there.\nUS"), StopChunk::Text("Hello there.".into()));
        assert_eq!(matcher.push("E"), StopChunk::Text(String::new()));
        assert_eq!(matcher.push("R: and more"), StopChunk::Stopped(String::new()));
        assert!(matcher.is_stopped());
        assert_eq!(matcher.push("ignored"), StopChunk::Stopped(String::new()));
        assert_eq!(matcher.finish(), "");
    }

    #[test]
    fn held_back_text_is_released_when_it_diverges() {
        assert_eq!(run_stops(&["</s>"], &["a <", "/x> b"]), ("a </x> b".into(), false));
        assert_eq!(run_stops(&["</s>"], &["a </"]), ("a </".into(), false));
        assert_eq!(run_stops(&["ab"], &["xa", "ab"]), ("xa".into(), true));
    }

    #[test]
    fn earliest_stop_string_wins() {
        let stops = ["END", "STOP", "日本"];
        assert_eq!(run_stops(&stops, &["one STOP two END"]), ("one ".into(), true));
        assert_eq!(run_stops(&stops, &["x 日", "本語"]), ("x ".into(), true));
        assert_eq!(run_stops(&stops, &["text before S", "TO", "P"]), ("text before ".into(), true));
    }

    #[test]
    fn multi_byte_text_is_held_back_on_char_boundaries() {
        let mut matcher = StopMatcher::new(["é!"]).expect("valid stop strings");
        assert_eq!(matcher.push("caf"), StopChunk::Text("caf".into()));
        assert_eq!(matcher.push("é"), StopChunk::Text(String::new()));
        assert_eq!(matcher.push("é"), StopChunk::Text("é".into()));
        assert_eq!(matcher.finish(), "é");
    }

    #[test]
    fn the_stop_that_completes_first_wins_however_the_text_is_chunked() {
        // "é日b" starts first but "日" completes first: token by token, generation stops there.
        for chunks in [&["é日", "b"][..], &["é日b"][..], &["é", "日b"][..]] {
            let mut m = StopMatcher::new(["日", "é日b"]).expect("valid stop strings");
            let out: String = chunks
                .iter()
                .map(|c| match m.push(c) {
                    StopChunk::Text(t) | StopChunk::Stopped(t) => t,
                })
                .collect();
            assert_eq!(out, "é", "{chunks:?}");
            assert!(m.is_stopped());
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// The tiny engine's byte-level BPE (`tests/fixtures/manifest/README.md`), 603 ids.
        fn engine_tokenizer() -> Tokenizer {
            include_str!("../../tests/fixtures/manifest/tokenizer.json").parse().expect("fixture tokenizer")
        }

        proptest! {
            #![proptest_config(crate::proptest_cases::config(500))]

            #[test]
            fn byte_level_chunks_concatenate_to_the_whole_decode(ids in prop::collection::vec(0u32..610, 0..40)) {
                // Ids past the vocabulary (603..610) included: skipped, as decode skips them.
                let tokenizer = engine_tokenizer();
                let (chunks, _) = stream(&tokenizer, &ids).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(chunks.concat(), tokenizer.decode(&ids, true).map_err(|e| TestCaseError::fail(e.to_string()))?);
            }

            #[test]
            fn llama_style_chunks_concatenate_to_the_whole_decode(ids in prop::collection::vec(0u32..300, 0..40)) {
                let tokenizer = llama_style_tokenizer().map_err(|e| TestCaseError::fail(e.to_string()))?;
                let whole = tokenizer.decode(&ids, true).map_err(|e| TestCaseError::fail(e.to_string()))?;
                match stream(&tokenizer, &ids) {
                    Ok((chunks, _)) if !whole.contains(REPLACEMENT) => prop_assert_eq!(chunks.concat(), whole),
                    // Byte tokens that are not UTF-8: ByteFallback writes one U+FFFD per byte of the
                    // whole run, which a window of recent ids cannot reproduce (it may see only part
                    // of the run, or find its emitted text rewritten: a typed error). Never a panic.
                    Ok(_) | Err(StreamError::PrefixChanged { .. }) => prop_assert!(whole.contains(REPLACEMENT)),
                    Err(e) => prop_assert!(false, "{e}"),
                }
            }

            #[test]
            fn llama_style_without_byte_tokens_always_streams(ids in prop::collection::vec(prop_oneof![0u32..3, 259u32..292], 0..40)) {
                let tokenizer = llama_style_tokenizer().map_err(|e| TestCaseError::fail(e.to_string()))?;
                let (chunks, _) = stream(&tokenizer, &ids).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(chunks.concat(), tokenizer.decode(&ids, true).map_err(|e| TestCaseError::fail(e.to_string()))?);
            }

            #[test]
            fn stop_matching_cuts_at_the_first_stop_however_the_text_is_chunked(
                chunks in prop::collection::vec("[ab\né日]{0,4}", 0..8),
                stops in prop::collection::vec("[ab\né日]{1,3}", 0..3),
            ) {
                let text = chunks.concat();
                // The stop that completes first (earliest end, then earliest start).
                let first = stops.iter().filter_map(|s| text.find(s.as_str()).map(|i| (i + s.len(), i))).min().map(|(_, i)| i);
                let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
                let stop_refs: Vec<&str> = stops.iter().map(String::as_str).collect();
                let (out, stopped) = run_stops(&stop_refs, &refs);
                prop_assert_eq!(stopped, first.is_some());
                prop_assert_eq!(out.as_str(), &text[..first.unwrap_or(text.len())]);
            }
        }
    }

    #[test]
    fn no_stop_strings_pass_everything_and_empty_ones_are_rejected() {
        assert_eq!(run_stops(&[], &["a", "b"]), ("ab".into(), false));
        assert!(matches!(StopMatcher::new(["ok", ""]), Err(StreamError::EmptyStopString { index: 1 })));
    }
}
