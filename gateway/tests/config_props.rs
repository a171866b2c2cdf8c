//! The GatewayConfig loader over generated documents: a valid config with one field
//! changed, removed or added. Loading never panics, and every refusal names a field.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use parley_crds::GatewayConfig;
use parley_crds::gateway_config::ConfigError;
use proptest::prelude::*;
use serde_json::{Value, json};

fn base() -> Value {
    json!({
        "apiVersion": "parley.dev/gateway/v1",
        "chatbot": "ns/bot",
        "listen": "127.0.0.1:0",
        "adminListen": "127.0.0.1:0",
        "defaultModel": "gpt-4o",
        "systemPrompt": "be brief",
        "models": [{
            "name": "gpt-4o",
            "fallbacks": ["backup"],
            "retry": {"maxAttempts": 2, "initialBackoffMs": 100, "maxBackoffMs": 2000},
            "circuitBreaker": {"failureThreshold": 5, "openSeconds": 30},
            "maxOutputTokens": 512,
            "pricing": {"inputPerMillionTokens": "2.50", "outputPerMillionTokens": "10.00"},
            "cache": {"ttlSeconds": 60},
            "backends": [{"name": "primary", "provider": "openai", "baseUrl": "http://127.0.0.1:1/v1",
                          "apiKey": {"value": "k"}, "weight": 1,
                          "timeouts": {"connectMs": 100, "firstTokenMs": 1000, "totalMs": 5000}}],
        }, {
            "name": "backup",
            "backends": [{"name": "b", "provider": "anthropic", "baseUrl": "http://127.0.0.1:2/v1"}],
        }],
        "tenants": [{
            "id": "ns/acme", "apiKeys": [{"value": "sk-1"}], "allowedModels": ["gpt-4o"],
            "rateLimit": {"requestsPerMinute": 10, "tokensPerMinute": 1000},
            "modelQuotas": [{"model": "gpt-4o", "requestsPerMinute": 5}],
            "budget": {"monthlyUsd": "10.00"},
        }],
        "rateLimitFailureMode": "open",
        "sessions": {"ttlSeconds": 60, "maxMessages": 10},
        "cors": {"allowedOrigins": ["https://a.example"]},
        "limits": {"maxBodyBytes": 1024},
    })
}

/// Every field name of the document (camelCase), the words a refusal must use.
fn field_names(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                out.push(k.clone());
                field_names(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| field_names(v, out)),
        _ => {}
    }
}

/// The paths of every object member of `v`.
fn paths(v: &Value, here: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                here.push(Value::String(k.clone()));
                out.push(here.clone());
                paths(child, here, out);
                here.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                here.push(Value::from(i));
                paths(child, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

fn parent_mut<'a>(root: &'a mut Value, path: &[Value]) -> &'a mut Value {
    let mut v = root;
    for p in &path[..path.len() - 1] {
        v = match p {
            Value::String(k) => &mut v[k.as_str()],
            Value::Number(i) => &mut v[i.as_u64().unwrap() as usize],
            _ => unreachable!(),
        };
    }
    v
}

#[derive(Debug, Clone)]
enum Mutation {
    Set(Value),
    Remove,
    AddUnknown(String),
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-1e9f64..1e9).prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::String),
        Just(json!([])),
        Just(json!({})),
        Just(json!(["x", 1])),
        Just(json!({"file": "a", "env": "B"})),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => scalar().prop_map(Mutation::Set),
        2 => Just(Mutation::Remove),
        1 => "zz[A-Za-z]{1,8}".prop_map(Mutation::AddUnknown),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn loading_never_panics_and_every_refusal_names_a_field(
        which in any::<prop::sample::Index>(),
        m in mutation(),
    ) {
        let mut doc = base();
        let mut all = Vec::new();
        paths(&doc, &mut Vec::new(), &mut all);
        let path = which.get(&all).clone();
        let mut names = Vec::new();
        field_names(&doc, &mut names);
        {
            let parent = parent_mut(&mut doc, &path);
            let key = path.last().and_then(Value::as_str).unwrap().to_string();
            match &m {
                Mutation::Set(v) => parent[key.as_str()] = v.clone(),
                Mutation::Remove => {
                    parent.as_object_mut().unwrap().remove(&key);
                }
                Mutation::AddUnknown(name) => {
                    if let Some(o) = parent.as_object_mut() {
                        o.insert(name.clone(), json!(1));
                        names.push(name.clone());
                    }
                }
            }
        }
        // JSON is YAML.
        let text = serde_json::to_string_pretty(&doc).unwrap();
        let problems: Vec<String> = match GatewayConfig::from_yaml(&text) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid(problems)) => problems,
            Err(e) => vec![e.to_string()],
        };
        for p in &problems {
            prop_assert!(
                names.iter().any(|n| p.contains(n.as_str())),
                "{:?} {:?}: the refusal names no field: {}", path, m, p
            );
        }
    }
}

#[test]
fn the_base_document_is_valid() {
    let text = serde_json::to_string(&base()).unwrap();
    GatewayConfig::from_yaml(&text).unwrap();
}
