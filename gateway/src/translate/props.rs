//! Properties of the OpenAI <-> Anthropic translators, over generated inputs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use serde_json::{Map, Value, json};

use super::{request, response};

/// Any JSON value, a few levels deep, with the field names the translators look at.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        "[a-z{}\":\\\\ ]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let key = prop_oneof![
            Just("role".to_string()),
            Just("content".to_string()),
            Just("type".to_string()),
            Just("text".to_string()),
            Just("tool_calls".to_string()),
            Just("function".to_string()),
            Just("name".to_string()),
            Just("arguments".to_string()),
            Just("id".to_string()),
            Just("tool_call_id".to_string()),
            Just("input".to_string()),
            Just("source".to_string()),
            "[a-z_]{1,6}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key, inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A request body: `messages`, `system`, `tools`... with arbitrary contents.
fn any_request() -> impl Strategy<Value = Map<String, Value>> {
    let field = prop_oneof![
        Just("messages"),
        Just("system"),
        Just("tools"),
        Just("tool_choice"),
        Just("max_tokens"),
        Just("stop"),
        Just("temperature"),
        Just("n"),
        Just("stream"),
        Just("metadata"),
    ];
    prop::collection::btree_map(field, any_json(), 0..6)
        .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// Alternating user/assistant text turns (starting with the user), and a system text.
fn conversation() -> impl Strategy<Value = (String, Vec<String>)> {
    (
        "[a-zA-Z ,.!?éü]{1,30}",
        prop::collection::vec("[a-zA-Z ,.!?éü\n]{1,40}", 1..8),
    )
}

/// Whether an error message names what to fix (a parameter or field in backticks).
fn names_a_field(message: &str) -> bool {
    message.matches('`').count() >= 2
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever the client sends, translation never panics, and a refusal names the
    /// parameter or field to fix.
    #[test]
    fn translating_any_request_never_panics_and_refusals_name_a_field(req in any_request()) {
        if let Err(e) = request::openai_to_anthropic(&req, "m", 64) {
            prop_assert!(names_a_field(&e.message), "{}", e.message);
        }
        for stream in [false, true] {
            if let Err(e) = request::anthropic_to_openai(&req, "m", stream) {
                prop_assert!(names_a_field(&e.message), "{}", e.message);
            }
        }
    }

    /// A text conversation keeps its system prompt, turns, roles and order through
    /// OpenAI -> Anthropic -> OpenAI.
    #[test]
    fn text_conversations_survive_a_round_trip((system, turns) in conversation()) {
        let mut messages = vec![json!({"role": "system", "content": system})];
        for (i, t) in turns.iter().enumerate() {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            messages.push(json!({"role": role, "content": t}));
        }
        let req = json!({"model": "m", "messages": messages, "max_tokens": 7});
        let anth = request::openai_to_anthropic(req.as_object().unwrap(), "claude", 64).unwrap();
        prop_assert_eq!(&anth["system"], &json!(system));
        prop_assert_eq!(&anth["max_tokens"], &json!(7));
        let back = request::anthropic_to_openai(anth.as_object().unwrap(), "gpt", false).unwrap();
        let back_messages = back["messages"].as_array().unwrap();
        prop_assert_eq!(back_messages.len(), messages.len());
        for (a, b) in messages.iter().zip(back_messages) {
            prop_assert_eq!(&a["role"], &b["role"]);
            prop_assert_eq!(&a["content"], &b["content"]);
        }
    }

    /// Responses keep their text, usage and stop reason through both directions.
    #[test]
    fn responses_survive_a_round_trip(
        text in "[a-zA-Z ,.!?\n]{0,60}",
        input in 0u64..1_000_000,
        output in 0u64..1_000_000,
        finish in prop_oneof![Just("stop"), Just("length"), Just("tool_calls")],
    ) {
        let openai = json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt",
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": input, "completion_tokens": output},
        });
        let (anth, usage) = response::openai_to_anthropic(&openai, "m");
        prop_assert_eq!((usage.input, usage.output), (input, output));
        let (back, usage2) = response::anthropic_to_openai(&anth, "m");
        prop_assert_eq!(usage2, usage);
        prop_assert_eq!(&back["choices"][0]["finish_reason"], &json!(finish));
        prop_assert_eq!(back["choices"][0]["message"]["content"].as_str().unwrap_or(""), text.as_str());
    }

    /// Any response body, however malformed, translates without a panic.
    #[test]
    fn translating_any_response_never_panics(body in any_json()) {
        let _ = response::openai_to_anthropic(&body, "m");
        let _ = response::anthropic_to_openai(&body, "m");
        let _ = response::upstream_error_message(body.to_string().as_bytes());
    }
}
