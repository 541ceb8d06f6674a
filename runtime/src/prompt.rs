//! Prompt layout from the manifest's chat template: visual placeholders expanded to the exact
//! number of visual tokens, later turns appended as the reference does.
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::manifest::{ChatTemplate, SpecialTokens};

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
        let t = self.template;
        let text = match slot {
            VisualSlot::Video { tokens } => t.first_turn_video.replace("{video}", &t.video_placeholder.repeat(tokens)),
            VisualSlot::Image { tokens } => t.first_turn_image.replace("{image}", &t.image_placeholder.repeat(tokens)),
            VisualSlot::None => t.first_turn_text.clone(),
        };
        let text = format!("{}{}", t.system, text.replace("{question}", question));
        let ids = self.encode(&text, true)?;
        let count = |id: u32| ids.iter().filter(|&&t| t == id).count();
        let (videos, images) = (count(self.special.video), count(self.special.image));
        let (want_v, want_i) = match slot {
            VisualSlot::Video { tokens } => (tokens, 0),
            VisualSlot::Image { tokens } => (0, tokens),
            VisualSlot::None => (0, 0),
        };
        if videos != want_v || images != want_i {
            return Err(Error::Request(format!(
                "the prompt holds {videos} video and {images} image tokens where {want_v} and {want_i} are \
                 expected; does the question contain a placeholder such as {} or {}?",
                t.video_placeholder, t.image_placeholder
            )));
        }
        Ok(ids)
    }

    /// Token ids that close the previous answer and ask `question` (no BOS).
    pub fn next_turn(&self, question: &str) -> Result<Vec<u32>> {
        let t = self.template;
        let text = format!("{}{}", t.answer_end, t.next_turn.replace("{question}", question));
        let ids = self.encode(&text, false)?;
        if ids.contains(&self.special.video) || ids.contains(&self.special.image) {
            return Err(Error::Request("a follow-up question cannot contain visual placeholders".into()));
        }
        Ok(ids)
    }
}
