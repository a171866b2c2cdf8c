//! Translation between the OpenAI Chat Completions and Anthropic Messages formats:
//! requests, responses and streams.

#[cfg(test)]
mod props;
pub mod request;
pub mod response;
pub mod responses;
#[cfg(test)]
mod responses_props;
pub mod responses_stream;
pub mod sse;
pub mod stream;

use serde::Deserialize;

/// Token usage of one call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt (input) tokens.
    pub input: u64,
    /// Completion (output) tokens.
    pub output: u64,
}

#[derive(Deserialize)]
struct OpenAiUsageOnly {
    #[serde(default)]
    usage: Option<OpenAiUsage>,
}

#[derive(Deserialize)]
struct OpenAiUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

#[derive(Deserialize)]
struct AnthropicUsageOnly {
    #[serde(default)]
    usage: Option<AnthropicUsage>,
}

#[derive(Deserialize)]
struct AnthropicUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

/// Usage of an OpenAI response body, read without building the whole document.
pub fn openai_usage(body: &[u8]) -> Option<Usage> {
    let u = serde_json::from_slice::<OpenAiUsageOnly>(body)
        .ok()?
        .usage?;
    Some(Usage {
        input: u.prompt_tokens,
        output: u.completion_tokens,
    })
}

/// Usage of an Anthropic response body (cache reads and writes count as input).
pub fn anthropic_usage(body: &[u8]) -> Option<Usage> {
    let u = serde_json::from_slice::<AnthropicUsageOnly>(body)
        .ok()?
        .usage?;
    Some(Usage {
        input: u
            .input_tokens
            .saturating_add(u.cache_creation_input_tokens.unwrap_or(0))
            .saturating_add(u.cache_read_input_tokens.unwrap_or(0)),
        output: u.output_tokens,
    })
}

/// OpenAI `finish_reason` -> Anthropic `stop_reason`.
pub fn stop_reason_to_anthropic(finish: &str) -> &'static str {
    match finish {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// Anthropic `stop_reason` -> OpenAI `finish_reason`.
pub fn stop_reason_to_openai(stop: &str) -> &'static str {
    match stop {
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// Seconds since the Unix epoch (for `created` fields).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
