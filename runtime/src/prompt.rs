//! Prompt layout from the manifest's chat template: visual placeholders expanded to the exact
//! number of visual tokens, later turns appended as the reference does.
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::manifest::{ChatTemplate, PlaceholderStyle, SpecialTokens};

/// What the first turn shows the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisualSlot {
    /// A video of `tokens` visual tokens.
    Video {
        /// Visual tokens (frames × tokens per frame).
        tokens: usize,
    },
    /// An image of `tokens` visual tokens.
    Image {
        /// Visual tokens.
        tokens: usize,
    },
    /// Text only.
    None,
}

/// An earlier question of a conversation and the answer it got, as a client of a stateless
/// API (OpenAI's chat completions) sends them back with its next question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    /// The user's question.
    pub question: String,
    /// The assistant's answer.
    pub answer: String,
}

/// Turns questions into token ids.
pub struct PromptBuilder<'a> {
    tokenizer: &'a Tokenizer,
    template: &'a ChatTemplate,
    special: &'a SpecialTokens,
}

impl<'a> PromptBuilder<'a> {
    /// A builder over the engine's tokenizer and template.
    pub fn new(tokenizer: &'a Tokenizer, template: &'a ChatTemplate, special: &'a SpecialTokens) -> Self {
        Self { tokenizer, template, special }
    }

    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, add_special).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of the first turn (with BOS), checked to hold exactly the visual tokens asked for.
    pub fn first_turn(&self, slot: VisualSlot, question: &str) -> Result<Vec<u32>> {
        let ids = match self.template.placeholders {
            PlaceholderStyle::RepeatPerToken => self.first_turn_repeated(slot, question)?,
            PlaceholderStyle::SplitOnMarker => self.first_turn_split(slot, question)?,
        };
        self.check_visual_count(slot, &ids)?;
        Ok(ids)
    }

    /// The Hugging Face processor's layout: the placeholder repeated once per visual token.
    fn first_turn_repeated(&self, slot: VisualSlot, question: &str) -> Result<Vec<u32>> {
        let t = self.template;
        let text = match slot {
            VisualSlot::Video { tokens } => t.first_turn_video.replace("{video}", &t.video_placeholder.repeat(tokens)),
            VisualSlot::Image { tokens } => t.first_turn_image.replace("{image}", &t.image_placeholder.repeat(tokens)),
            VisualSlot::None => t.first_turn_text.clone(),
        };
        let text = format!("{}{}", t.system, text.replace("{question}", question));
        self.encode(&text, true)
    }

    /// LLaVA's `tokenizer_image_token`: the prompt split on the marker, each chunk tokenized with
    /// special tokens, the first chunk's BOS kept (and the first token of every chunk dropped
    /// when the first chunk starts with BOS), and each marker replaced by one frame's (or the
    /// image's) share of the visual tokens.
    fn first_turn_split(&self, slot: VisualSlot, question: &str) -> Result<Vec<u32>> {
        let t = self.template;
        let (template, marker, id, tokens) = match slot {
            VisualSlot::Video { tokens } => {
                (&t.first_turn_video, t.video_placeholder.as_str(), self.special.video, tokens)
            }
            VisualSlot::Image { tokens } => {
                (&t.first_turn_image, t.image_placeholder.as_str(), self.special.image, tokens)
            }
            VisualSlot::None => (&t.first_turn_text, "", 0, 0),
        };
        let bare = format!("{}{}", t.system, template);
        let text = format!("{}{}", t.system, template.replace("{question}", question));
        for m in [t.video_placeholder.as_str(), t.image_placeholder.as_str()] {
            if !m.is_empty() && text.matches(m).count() != bare.matches(m).count() {
                return Err(Error::Request(format!(
                    "the question must not contain the visual marker {m}; the prompt holds the markers itself"
                )));
            }
        }
        let markers = if marker.is_empty() { 0 } else { text.matches(marker).count() };
        if markers == 0 {
            return self.encode(&text, true);
        }
        if tokens % markers != 0 {
            return Err(Error::Request(format!(
                "{tokens} visual tokens cannot be shared among the template's {markers} {marker} markers"
            )));
        }
        let per_marker = tokens / markers;
        let chunks = text.split(marker).map(|chunk| self.encode(chunk, true)).collect::<Result<Vec<_>>>()?;
        let offset = usize::from(chunks.first().and_then(|c| c.first()) == Some(&self.special.bos));
        let mut ids = Vec::with_capacity(text.len() + tokens);
        if offset == 1 {
            ids.push(self.special.bos);
        }
        for (i, chunk) in chunks.iter().enumerate() {
            if i > 0 {
                ids.extend(std::iter::repeat_n(id, per_marker));
            }
            ids.extend(chunk.iter().skip(offset));
        }
        Ok(ids)
    }

    /// Checks that `ids` hold exactly the visual tokens `slot` asks for.
    fn check_visual_count(&self, slot: VisualSlot, ids: &[u32]) -> Result<()> {
        let t = self.template;
        let count = |id: u32| ids.iter().filter(|&&t| t == id).count();
        let (videos, images) = (count(self.special.video), count(self.special.image));
        let (want_v, want_i) = match slot {
            VisualSlot::Video { tokens } => (tokens, 0),
            VisualSlot::Image { tokens } => (0, tokens),
            VisualSlot::None => (0, 0),
        };
        // One id may serve both placeholders (the original layout has no token of its own).
        let (want_v, want_i) = if self.special.video == self.special.image {
            (want_v + want_i, want_v + want_i)
        } else {
            (want_v, want_i)
        };
        if videos != want_v || images != want_i {
            return Err(Error::Request(format!(
                "the prompt holds {videos} video and {images} image tokens where {want_v} and {want_i} are \
                 expected; does the question contain a placeholder such as {} or {}?",
                t.video_placeholder, t.image_placeholder
            )));
        }
        Ok(())
    }

    /// Token ids of a whole conversation: the first turn (showing `slot`) asks the first
    /// question, each earlier answer is followed by the next question, and `question` comes
    /// last. With no earlier exchanges this is [`Self::first_turn`]. The ids are laid out as a
    /// kept conversation's would be (first turn, answer ids, [`Self::next_turn`]), so that a
    /// cached conversation whose answer tokenizes the same shares them as a prefix.
    pub fn conversation(&self, slot: VisualSlot, earlier: &[Exchange], question: &str) -> Result<Vec<u32>> {
        let Some(first) = earlier.first() else { return self.first_turn(slot, question) };
        let mut ids = self.first_turn(slot, &first.question)?;
        let next_questions = earlier[1..].iter().map(|e| e.question.as_str()).chain(std::iter::once(question));
        for (exchange, next) in earlier.iter().zip(next_questions) {
            let answer = self.encode(&exchange.answer, false)?;
            if answer.contains(&self.special.video) || answer.contains(&self.special.image) {
                return Err(Error::Request("an earlier answer cannot contain visual placeholders".into()));
            }
            ids.extend(answer);
            ids.extend(self.next_turn(next)?);
        }
        Ok(ids)
    }

    /// Token ids that close the previous answer and ask `question` (no BOS).
    pub fn next_turn(&self, question: &str) -> Result<Vec<u32>> {
        let t = self.template;
        let text = format!("{}{}", t.answer_end, t.next_turn.replace("{question}", question));
        let split = t.placeholders == PlaceholderStyle::SplitOnMarker;
        let marked =
            [&t.video_placeholder, &t.image_placeholder].iter().any(|m| !m.is_empty() && question.contains(m.as_str()));
        let ids = self.encode(&text, false)?;
        if (split && marked) || ids.contains(&self.special.video) || ids.contains(&self.special.image) {
            return Err(Error::Request("a follow-up question cannot contain visual placeholders".into()));
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Words split on whitespace; `<s> $A` added as LLaMA's tokenizer does.
    fn tokenizer() -> Tokenizer {
        let json = r#"{
          "version": "1.0", "truncation": null, "padding": null,
          "added_tokens": [
            {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
          ],
          "normalizer": null,
          "pre_tokenizer": {"type": "WhitespaceSplit"},
          "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
          "decoder": null,
          "model": {"type": "WordLevel", "unk_token": "<unk>",
            "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "SYS": 3, "USER:": 4, "ASSISTANT:": 5, "hi": 6, "x": 7}}
        }"#;
        json.parse().expect("test tokenizer")
    }

    fn original_template() -> ChatTemplate {
        ChatTemplate {
            system: "SYS ".into(),
            first_turn_video: "USER: <image> x <image>\n{question} ASSISTANT:".into(),
            first_turn_image: "USER: <image>\n{question} ASSISTANT:".into(),
            first_turn_text: "USER: {question} ASSISTANT:".into(),
            next_turn: "USER: {question} ASSISTANT:".into(),
            answer_end: "</s>".into(),
            video_placeholder: "<image>".into(),
            image_placeholder: "<image>".into(),
            placeholders: PlaceholderStyle::SplitOnMarker,
        }
    }

    const SPECIAL: SpecialTokens = SpecialTokens { bos: 1, eos: 2, pad: None, image: 0, video: 0 };

    #[test]
    fn split_on_marker_keeps_one_bos_and_expands_each_marker() -> Result<()> {
        let (tok, template) = (tokenizer(), original_template());
        let b = PromptBuilder::new(&tok, &template, &SPECIAL);
        // Chunks: "SYS USER: " | " x " | "\nhi ASSISTANT:", each encoded as [1, ...].
        let ids = b.first_turn(VisualSlot::Video { tokens: 6 }, "hi")?;
        assert_eq!(ids, vec![1, 3, 4, 0, 0, 0, 7, 0, 0, 0, 6, 5]);
        let ids = b.first_turn(VisualSlot::Image { tokens: 2 }, "hi")?;
        assert_eq!(ids, vec![1, 3, 4, 0, 0, 6, 5]);
        assert_eq!(b.first_turn(VisualSlot::None, "hi")?, vec![1, 3, 4, 6, 5]);
        Ok(())
    }

    #[test]
    fn split_on_marker_refuses_markers_in_questions_and_uneven_shares() {
        let (tok, template) = (tokenizer(), original_template());
        let b = PromptBuilder::new(&tok, &template, &SPECIAL);
        for slot in [VisualSlot::Video { tokens: 6 }, VisualSlot::None] {
            assert!(matches!(b.first_turn(slot, "what <image>"), Err(Error::Request(_))));
        }
        assert!(matches!(b.first_turn(VisualSlot::Video { tokens: 5 }, "hi"), Err(Error::Request(_))));
        assert!(matches!(b.next_turn("and <image>?"), Err(Error::Request(_))));
        // The placeholder id typed as text would add visual positions.
        assert!(matches!(b.first_turn(VisualSlot::Video { tokens: 6 }, "<unk>"), Err(Error::Request(_))));
        assert!(b.next_turn("hi").is_ok());
    }

    #[test]
    fn a_conversation_lays_out_as_a_kept_one() -> Result<()> {
        let (tok, template) = (tokenizer(), original_template());
        let b = PromptBuilder::new(&tok, &template, &SPECIAL);
        let earlier = [Exchange { question: "hi".into(), answer: "x".into() }];
        let ids = b.conversation(VisualSlot::None, &earlier, "hi")?;
        let mut kept = b.first_turn(VisualSlot::None, "hi")?;
        kept.push(7);
        kept.extend(b.next_turn("hi")?);
        assert_eq!(ids, kept);
        assert_eq!(ids, vec![1, 3, 4, 6, 5, 7, 2, 4, 6, 5]);
        assert_eq!(b.conversation(VisualSlot::None, &[], "hi")?, b.first_turn(VisualSlot::None, "hi")?);
        // An answer that reads as a placeholder (here: an unknown word, id 0) would open a slot.
        let bad = [Exchange { question: "hi".into(), answer: "zzz".into() }];
        assert!(matches!(b.conversation(VisualSlot::None, &bad, "hi"), Err(Error::Request(_))));
        Ok(())
    }

    mod properties {
        #![allow(clippy::unwrap_used)]
        use proptest::prelude::*;

        use super::*;
        use crate::manifest::Manifest;

        /// The tiny engine's manifest and tokenizer (`tests/fixtures/manifest/README.md`): the
        /// Hugging Face layout, `<image>` = 600 and `<video>` = 601 as added tokens.
        fn engine() -> (Tokenizer, Manifest) {
            let manifest: Manifest =
                serde_norway::from_str(include_str!("../../tests/fixtures/manifest/manifest.yaml")).unwrap();
            let tokenizer: Tokenizer = include_str!("../../tests/fixtures/manifest/tokenizer.json").parse().unwrap();
            (tokenizer, manifest)
        }

        /// Text made of pieces a hostile client would try: the markers and placeholders the
        /// templates use, special tokens, braces, and arbitrary characters.
        fn text() -> impl Strategy<Value = String> {
            let piece = prop_oneof![
                prop::sample::select(vec![
                    "<video>",
                    "<image>",
                    "{video}",
                    "{image}",
                    "{question}",
                    "<s>",
                    "</s>",
                    "<unk>",
                    "<pad>",
                    "<vid",
                    "eo>",
                    "<",
                    ">",
                    " ",
                    "\n",
                    "USER:",
                    "ASSISTANT:",
                ])
                .prop_map(String::from),
                any::<String>().prop_map(|s| s.chars().take(4).collect()),
            ];
            prop::collection::vec(piece, 0..8).prop_map(|p| p.concat())
        }

        fn slot() -> impl Strategy<Value = VisualSlot> {
            prop_oneof![
                (0usize..3).prop_map(|k| VisualSlot::Video { tokens: k * 136 }),
                (0usize..3).prop_map(|k| VisualSlot::Image { tokens: k * 16 }),
                Just(VisualSlot::None),
            ]
        }

        /// Whatever is accepted holds exactly the slot's visual tokens.
        fn exact(ids: &[u32], slot: VisualSlot, special: &SpecialTokens) -> std::result::Result<(), TestCaseError> {
            let count = |id: u32| ids.iter().filter(|&&t| t == id).count();
            let (video, image) = match slot {
                VisualSlot::Video { tokens } => (tokens, 0),
                VisualSlot::Image { tokens } => (0, tokens),
                VisualSlot::None => (0, 0),
            };
            if special.video == special.image {
                prop_assert_eq!(count(special.video), video + image);
            } else {
                prop_assert_eq!((count(special.video), count(special.image)), (video, image));
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(crate::proptest_cases::config(256))]

            #[test]
            fn questions_never_add_visual_tokens(slot in slot(), question in text()) {
                let (tok, m) = engine();
                let b = PromptBuilder::new(&tok, &m.chat_template, &m.tokens);
                match b.first_turn(slot, &question) {
                    Ok(ids) => exact(&ids, slot, &m.tokens)?,
                    Err(e) => prop_assert!(matches!(e, Error::Request(_)), "{e}"),
                }
                // The original layout (one marker shared, split on it).
                let (tok, template) = (tokenizer(), original_template());
                let b = PromptBuilder::new(&tok, &template, &SPECIAL);
                let slot = match slot {
                    VisualSlot::Video { tokens } => VisualSlot::Video { tokens: tokens / 136 * 8 },
                    other => other,
                };
                match b.first_turn(slot, &question) {
                    Ok(ids) => exact(&ids, slot, &SPECIAL)?,
                    Err(e) => prop_assert!(matches!(e, Error::Request(_)), "{e}"),
                }
            }

            #[test]
            fn conversations_never_add_visual_tokens(
                slot in slot(),
                earlier in prop::collection::vec((text(), text()), 0..3),
                question in text(),
            ) {
                let (tok, m) = engine();
                let b = PromptBuilder::new(&tok, &m.chat_template, &m.tokens);
                let earlier: Vec<Exchange> =
                    earlier.into_iter().map(|(question, answer)| Exchange { question, answer }).collect();
                match b.conversation(slot, &earlier, &question) {
                    Ok(ids) => exact(&ids, slot, &m.tokens)?,
                    Err(e) => prop_assert!(matches!(e, Error::Request(_)), "{e}"),
                }
            }
        }

        #[test]
        fn a_typed_placeholder_is_refused_in_every_position() {
            let (tok, m) = engine();
            let b = PromptBuilder::new(&tok, &m.chat_template, &m.tokens);
            let video = VisualSlot::Video { tokens: 136 };
            assert_eq!(b.first_turn(video, "what happens?").unwrap().iter().filter(|&&t| t == 601).count(), 136);
            for q in ["<video>", "a <video> b", "<image>", "x<image>"] {
                assert!(matches!(b.first_turn(video, q), Err(Error::Request(_))), "{q}");
                assert!(matches!(b.next_turn(q), Err(Error::Request(_))), "{q}");
                let earlier = [Exchange { question: "hi".into(), answer: q.into() }];
                assert!(matches!(b.conversation(video, &earlier, "ok"), Err(Error::Request(_))), "{q}");
            }
        }
    }
}
