//! Properties of the Chat Completions <-> Responses translators, over generated
//! requests: a chat request translated to Responses and back keeps its meaning
//! (messages, tools, parameters), and translating never panics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use serde_json::{Map, Value, json};

use super::responses::{from_chat, to_chat};

/// Any JSON value a few levels deep, with the keys input items have.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        "[a-z_ ]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let key = prop_oneof![
            Just("type".to_string()),
            Just("role".to_string()),
            Just("content".to_string()),
            Just("text".to_string()),
            Just("call_id".to_string()),
            Just("name".to_string()),
            Just("arguments".to_string()),
            Just("output".to_string()),
            Just("image_url".to_string()),
            "[a-z_]{1,6}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key, inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 {}\":,.!?é]{0,12}"
}

fn call() -> impl Strategy<Value = Value> {
    ("[a-z0-9_]{1,8}", "[a-z_]{1,8}", text()).prop_map(|(id, name, arg)| {
        json!({"id": format!("call_{id}"), "type": "function",
               "function": {"name": name, "arguments": json!({"x": arg}).to_string()}})
    })
}

fn user_content() -> impl Strategy<Value = Value> {
    prop_oneof![
        text().prop_map(Value::String),
        prop::collection::vec(
            prop_oneof![
                text().prop_map(|t| json!({"type": "text", "text": t})),
                (
                    "[a-z]{1,8}",
                    prop::option::of(prop_oneof![Just("low"), Just("high")])
                )
                    .prop_map(|(u, d)| {
                        let mut image = Map::new();
                        image.insert("url".into(), json!(format!("https://x.test/{u}.png")));
                        if let Some(d) = d {
                            image.insert("detail".into(), json!(d));
                        }
                        json!({"type": "image_url", "image_url": image})
                    }),
            ],
            1..3
        )
        .prop_map(Value::Array),
    ]
}

/// One message; assistants carry text, calls or both.
fn message() -> impl Strategy<Value = Value> {
    prop_oneof![
        (prop_oneof![Just("system"), Just("developer")], text())
            .prop_map(|(r, t)| json!({"role": r, "content": t})),
        user_content().prop_map(|c| json!({"role": "user", "content": c})),
        (
            prop::option::of(text()),
            prop::collection::vec(call(), 0..3)
        )
            .prop_map(|(t, calls)| {
                let mut m = Map::new();
                m.insert("role".into(), json!("assistant"));
                let no_calls = calls.is_empty();
                m.insert(
                    "content".into(),
                    match t {
                        Some(t) => Value::String(t),
                        None if no_calls => Value::String(String::new()),
                        None => Value::Null,
                    },
                );
                if !no_calls {
                    m.insert("tool_calls".into(), Value::Array(calls));
                }
                Value::Object(m)
            }),
        ("[a-z0-9_]{1,8}", text()).prop_map(
            |(id, t)| json!({"role": "tool", "tool_call_id": format!("call_{id}"), "content": t})
        ),
    ]
}

/// Messages where no assistant directly follows another (the Responses API has no
/// boundary between two assistant turns: they would read as one).
fn messages() -> impl Strategy<Value = Vec<Value>> {
    prop::collection::vec(message(), 1..8).prop_map(|ms| {
        let mut out: Vec<Value> = Vec::with_capacity(ms.len() * 2);
        for m in ms {
            let assistant = |v: &Value| v["role"] == "assistant";
            if assistant(&m) && out.last().is_some_and(assistant) {
                out.push(json!({"role": "user", "content": "go on"}));
            }
            out.push(m);
        }
        out
    })
}

fn tool() -> impl Strategy<Value = Value> {
    ("[a-z_]{1,8}", prop::option::of(text()), any::<bool>()).prop_map(|(name, desc, strict)| {
        let mut f = Map::new();
        f.insert("name".into(), json!(name));
        if let Some(d) = desc {
            f.insert("description".into(), json!(d));
        }
        f.insert(
            "parameters".into(),
            json!({"type": "object", "properties": {"x": {"type": "string"}}}),
        );
        if strict {
            f.insert("strict".into(), json!(true));
        }
        json!({"type": "function", "function": f})
    })
}

fn chat_request() -> impl Strategy<Value = Map<String, Value>> {
    (
        messages(),
        prop::collection::vec(tool(), 0..3),
        prop::option::of(prop_oneof![
            Just(json!("auto")),
            Just(json!("none")),
            Just(json!("required")),
            "[a-z_]{1,8}".prop_map(|n| json!({"type": "function", "function": {"name": n}})),
        ]),
        prop::option::of(0.0f64..2.0),
        prop::option::of(0.0f64..1.0),
        prop::option::of(1u64..100_000),
        prop::option::of(any::<bool>()),
        prop::option::of(prop_oneof![
            Just(json!({"type": "json_object"})),
            "[a-z_]{1,8}".prop_map(|n| json!({"type": "json_schema", "json_schema":
                {"name": n, "schema": {"type": "object"}, "strict": true}})),
        ]),
        any::<bool>(),
    )
        .prop_map(
            |(messages, tools, choice, temperature, top_p, max, parallel, format, stream)| {
                let mut m = Map::new();
                m.insert("model".into(), json!("gpt-4o"));
                m.insert("messages".into(), Value::Array(messages));
                if !tools.is_empty() {
                    m.insert("tools".into(), Value::Array(tools));
                }
                let opt = |m: &mut Map<String, Value>, k: &str, v: Option<Value>| {
                    if let Some(v) = v {
                        m.insert(k.into(), v);
                    }
                };
                opt(&mut m, "tool_choice", choice);
                opt(&mut m, "temperature", temperature.map(Value::from));
                opt(&mut m, "top_p", top_p.map(Value::from));
                opt(&mut m, "max_completion_tokens", max.map(Value::from));
                opt(&mut m, "parallel_tool_calls", parallel.map(Value::Bool));
                opt(&mut m, "response_format", format);
                if stream {
                    m.insert("stream".into(), json!(true));
                }
                m
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn chat_to_responses_and_back_keeps_the_meaning(req in chat_request()) {
        let responses = from_chat(&req).unwrap();
        // Every message became an input item (an assistant turn with calls becomes a
        // message item and one item per call).
        let back = to_chat(&responses).unwrap();
        prop_assert_eq!(Value::Object(back), Value::Object(req));
    }

    #[test]
    fn max_tokens_becomes_max_output_tokens_and_back(n in 1u64..1_000_000) {
        let req = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": n});
        let responses = from_chat(req.as_object().unwrap()).unwrap();
        prop_assert_eq!(&responses["max_output_tokens"], &json!(n));
        let back = to_chat(&responses).unwrap();
        prop_assert_eq!(crate::admission::requested_max_tokens(&back), Some(n));
    }

    #[test]
    fn any_json_input_is_an_answer_never_a_panic(input in any_json()) {
        let mut req = Map::new();
        req.insert("input".into(), input.clone());
        let _ = super::responses::input_items(&input);
        let _ = to_chat(&req);
    }
}
