//! OpenAI's chat completions schema: what a request may hold (unknown fields are ignored, as
//! OpenAI does) and the objects a reply is made of.
use serde::{Deserialize, Serialize};

/// The body of `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// The model asked for (the engine directory's name); optional here.
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// What the stream sends besides the answer.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Most tokens to generate (deprecated by OpenAI for `max_completion_tokens`).
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Most tokens to generate.
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    /// Softmax temperature; 0 is greedy. OpenAI's default is 1.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k filter (vLLM's extension; 0 or -1: off).
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Repetition penalty (vLLM's extension).
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// OpenAI's frequency penalty in [-2, 2].
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// OpenAI's presence penalty in [-2, 2].
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Keep going past end-of-sequence (vLLM's extension).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Seed of the sampler.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Choices asked for; only 1 is served.
    #[serde(default)]
    pub n: Option<usize>,
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the token counts.
    #[serde(default)]
    pub include_usage: bool,
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Stop {
    /// The stop strings.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// Who speaks a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions (prepended to the question).
    System,
    /// OpenAI's newer name for system messages.
    Developer,
    /// The user.
    User,
    /// The model's earlier answers.
    Assistant,
}

/// One message of the conversation.
#[derive(Debug, Deserialize)]
pub struct Message {
    /// Its speaker.
    pub role: Role,
    /// Its content (absent or null: empty).
    #[serde(default)]
    pub content: Option<Content>,
}

/// A message's content: a string or a list of parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Text and media parts.
    Parts(Vec<Part>),
}

/// A part of a message's content (images as OpenAI defines them, videos as vLLM does).
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// An image.
    ImageUrl {
        /// Where it is.
        image_url: Url,
    },
    /// A video.
    VideoUrl {
        /// Where it is.
        video_url: Url,
    },
}

/// `{"url": ...}` (other fields, such as `detail`, are ignored).
#[derive(Debug, Deserialize)]
pub struct Url {
    /// A `data:` or `file://` URL.
    pub url: String,
}

/// Token counts of a completion.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    /// Tokens of the prompt (visual tokens included).
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Both.
    pub total_tokens: usize,
}

impl Usage {
    /// Usage of a prompt and its answer.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// A `chat.completion` object (non-streamed reply).
#[derive(Debug, Serialize)]
pub struct Completion<'a> {
    /// `chatcmpl-...`.
    pub id: &'a str,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model id.
    pub model: &'a str,
    /// The one choice.
    pub choices: [Choice<'a>; 1],
    /// Token counts.
    pub usage: Usage,
}

/// A choice of a `chat.completion`.
#[derive(Debug, Serialize)]
pub struct Choice<'a> {
    /// 0.
    pub index: usize,
    /// The answer.
    pub message: AssistantMessage<'a>,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
}

/// The assistant's message.
#[derive(Debug, Serialize)]
pub struct AssistantMessage<'a> {
    /// `assistant`.
    pub role: &'static str,
    /// The answer's text.
    pub content: &'a str,
}

/// A `chat.completion.chunk` object (one event of a stream).
#[derive(Debug, Serialize)]
pub struct Chunk<'a> {
    /// The id shared by the chunks of one completion.
    pub id: &'a str,
    /// `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model id.
    pub model: &'a str,
    /// One choice, or none in the usage chunk.
    pub choices: Vec<ChunkChoice<'a>>,
    /// Token counts, in the last chunk when `stream_options.include_usage` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A choice of a chunk.
#[derive(Debug, Serialize)]
pub struct ChunkChoice<'a> {
    /// 0.
    pub index: usize,
    /// What the chunk adds.
    pub delta: Delta<'a>,
    /// Set in the last chunk of the choice.
    pub finish_reason: Option<&'static str>,
}

/// What a chunk adds to the message.
#[derive(Debug, Default, Serialize)]
pub struct Delta<'a> {
    /// `assistant`, in the first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// A piece of the answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_openai_and_vllm_content_parts() {
        let r: ChatRequest = serde_json::from_str(
            r#"{"model":"m","messages":[
                {"role":"system","content":"Be brief."},
                {"role":"user","content":[{"type":"text","text":"What?"},
                    {"type":"video_url","video_url":{"url":"file:///a.mp4"}},
                    {"type":"image_url","image_url":{"url":"data:image/png;base64,AA==","detail":"low"}}]}],
              "stop":"x","max_completion_tokens":5,"stream_options":{"include_usage":true},
              "logprobs":false,"unknown_field":{"a":1}}"#,
        )
        .unwrap();
        assert_eq!(r.messages.len(), 2);
        assert!(matches!(&r.messages[1].content, Some(Content::Parts(p)) if p.len() == 3));
        assert_eq!(r.stop.unwrap().into_vec(), vec!["x".to_string()]);
        assert!(r.stream_options.unwrap().include_usage);
    }
}
