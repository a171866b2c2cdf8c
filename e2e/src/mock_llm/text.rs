//! Token counting and reply text.
//!
//! The mock's "tokenizer" is deliberately trivial so that tests can predict every
//! number it reports:
//!
//! * **Prompt tokens** = the number of whitespace-separated words in all text the
//!   request carries: the system prompt (OpenAI `system`/`developer` messages or the
//!   Anthropic `system` field) and the text of every message — string contents, `text`
//!   parts/blocks, OpenAI `tool` message contents and Anthropic `tool_result` contents.
//!   Tool definitions, tool-call arguments, images and other non-text parts count 0.
//!   Because the rule only looks at text, a request translated between the two API
//!   formats has the same prompt token count in both.
//! * **Completion tokens** = the number of reply tokens actually sent. A text reply is
//!   a sequence of tokens, each one whitespace-separated word together with the
//!   whitespace before it, so the word count of the reply text equals its completion
//!   tokens. A streamed reply sends exactly one token per content delta.
//!   A tool call counts [`TOOL_CALL_TOKENS`] completion tokens (the name and the two
//!   argument fragments it is streamed in), and is never cut by `max_tokens`.

use serde_json::Value;

/// Completion tokens reported for one tool call.
pub const TOOL_CALL_TOKENS: u64 = 3;
/// The arguments of every tool call the mock makes, in the fragments it streams.
pub const TOOL_ARGUMENT_FRAGMENTS: [&str; 2] = ["{\"location\":", "\"Paris\"}"];
/// The arguments of every tool call the mock makes (the fragments joined).
pub const TOOL_ARGUMENTS: &str = "{\"location\":\"Paris\"}";

const FILLER: &[&str] = &[
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet,",
    "consectetur",
    "adipiscing",
    "elit,",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
    "dolore",
    "magna",
    "aliqua.",
];

/// Number of whitespace-separated words in `text`.
pub fn count_words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Splits `text` into tokens: each token is one word with the whitespace before it
/// (the first token has its leading whitespace removed, trailing whitespace is dropped).
/// Concatenating the tokens gives `text.trim()`.
pub fn tokenize(text: &str) -> Vec<String> {
    let text = text.trim();
    let mut tokens = Vec::new();
    let mut start = 0;
    let mut in_word = false;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if in_word {
                tokens.push(text[start..i].to_owned());
                start = i;
                in_word = false;
            }
        } else {
            in_word = true;
        }
    }
    if in_word {
        tokens.push(text[start..].to_owned());
    }
    tokens
}

/// The default reply: `reply_tokens` words, "Hello from NAME: lorem ipsum ...".
pub fn default_reply(name: &str, reply_tokens: u32) -> Vec<String> {
    let head = format!("Hello from {name}:");
    let mut words: Vec<&str> = head.split_whitespace().collect();
    let mut i = 0;
    while words.len() < reply_tokens as usize {
        words.push(FILLER[i % FILLER.len()]);
        i += 1;
    }
    words.truncate(reply_tokens as usize);
    words
        .iter()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                (*w).to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}

/// The reply to tool results: "Tool result: CONTENT".
pub fn tool_result_reply(results: &[String]) -> Vec<String> {
    tokenize(&format!("Tool result: {}", results.join(" ")))
}

/// Text of an OpenAI message `content` (string or array of parts).
pub fn openai_content_text(content: &Value, out: &mut String) {
    match content {
        Value::String(s) => push(out, s),
        Value::Array(parts) => {
            for p in parts {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    push(out, t);
                }
            }
        }
        _ => {}
    }
}

/// Text of an Anthropic `content` / `system` (string or array of blocks, including the
/// contents of `tool_result` blocks).
pub fn anthropic_content_text(content: &Value, out: &mut String) {
    match content {
        Value::String(s) => push(out, s),
        Value::Array(blocks) => {
            for b in blocks {
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        if let Some(t) = b.get("text").and_then(Value::as_str) {
                            push(out, t);
                        }
                    }
                    Some("tool_result") => {
                        if let Some(c) = b.get("content") {
                            anthropic_content_text(c, out);
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn push(out: &mut String, s: &str) {
    if !out.is_empty() {
        out.push(' ');
    }
    out.push_str(s);
}

/// Whether a user text asks for a tool call ("weather" or "call_tool", any case).
pub fn wants_tool(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower.contains("weather") || lower.contains("call_tool")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenize_round_trips() {
        let t = tokenize("  a  b\n c ");
        assert_eq!(t, vec!["a", "  b", "\n c"]);
        assert_eq!(t.concat(), "a  b\n c");
        assert_eq!(count_words("  a  b\n c "), 3);
    }

    #[test]
    fn default_reply_has_n_words() {
        for n in [0, 1, 2, 3, 4, 20, 100] {
            let r = default_reply("mock", n);
            assert_eq!(r.len(), n as usize);
            assert_eq!(count_words(&r.concat()), u64::from(n));
        }
        assert_eq!(default_reply("a b", 5).concat(), "Hello from a b: lorem");
    }
}
