//! `POST /v1/embeddings` (OpenAI): deterministic unit vectors.
//!
//! `input` is a string, an array of strings, an array of token ids, or an array of
//! token-id arrays. Each input gets a vector seeded by the SHA-256 of the model name and
//! the input (the same input always gets the same vector), `dimensions` long
//! ([`DEFAULT_DIMENSIONS`] when absent), scaled to length 1 as OpenAI's are.
//! `encoding_format: "base64"` sends each vector as the base64 of its little-endian
//! `f32`s (what the official Python SDK asks for by default). Tokens: a string counts
//! its words (see [`super::text`]), a token array its ids; `usage.prompt_tokens` is the
//! sum. Fault injection, latency and the key check happen before this, as for the other
//! endpoints.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::common::{self, Api};
use super::config::Profile;
use super::stats::Recorder;
use super::text;

/// Vector length when the request sets no `dimensions`.
pub const DEFAULT_DIMENSIONS: usize = 256;
/// Longest vector the mock makes.
pub const MAX_DIMENSIONS: usize = 8192;
/// Most inputs in one request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

fn bad(message: &str) -> Response {
    common::bad_request(Api::OpenAi, message)
}

/// One input, as it is hashed and counted.
enum Input<'a> {
    Text(&'a str),
    Tokens(&'a [Value]),
}

impl Input<'_> {
    fn tokens(&self) -> u64 {
        match self {
            Input::Text(s) => text::count_words(s),
            Input::Tokens(t) => t.len() as u64,
        }
    }

    fn seed(&self, model: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(model.as_bytes());
        match self {
            Input::Text(s) => {
                h.update([0]);
                h.update(s.as_bytes());
            }
            Input::Tokens(t) => {
                h.update([1]);
                for id in t.iter().filter_map(Value::as_u64) {
                    h.update(id.to_le_bytes());
                }
            }
        }
        h.finalize().into()
    }
}

/// The inputs of a request, or the OpenAI-style message saying what is wrong.
fn inputs(obj: &Map<String, Value>) -> Result<Vec<Input<'_>>, String> {
    let tokens = |t: &[Value], field: &str| -> Result<(), String> {
        if t.is_empty() {
            return Err(format!("Invalid '{field}': empty token array."));
        }
        if t.iter().any(|v| v.as_u64().is_none()) {
            return Err(format!(
                "Invalid '{field}': token ids must be integers >= 0."
            ));
        }
        Ok(())
    };
    match obj.get("input") {
        None | Some(Value::Null) => Err("Missing required parameter: 'input'.".into()),
        Some(Value::String(s)) if s.is_empty() => {
            Err("Invalid 'input': empty string. Expected a non-empty string.".into())
        }
        Some(Value::String(s)) => Ok(vec![Input::Text(s)]),
        Some(Value::Array(items)) if items.is_empty() => {
            Err("Invalid 'input': empty array. Expected an array with minimum length 1.".into())
        }
        Some(Value::Array(items)) if items.len() > MAX_INPUTS => Err(format!(
            "Invalid 'input': array too long. Expected an array with maximum length {MAX_INPUTS}, but got an array with length {}.",
            items.len()
        )),
        Some(Value::Array(items)) if items[0].is_number() => {
            tokens(items, "input")?;
            Ok(vec![Input::Tokens(items)])
        }
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) if s.is_empty() => {
                    Err(format!("Invalid 'input[{i}]': empty string."))
                }
                Value::String(s) => Ok(Input::Text(s)),
                Value::Array(t) => {
                    tokens(t, &format!("input[{i}]"))?;
                    Ok(Input::Tokens(t))
                }
                _ => Err(format!(
                    "Invalid type for 'input[{i}]': expected a string or an array of integers."
                )),
            })
            .collect(),
        Some(_) => Err(
            "Invalid type for 'input': expected a string, an array of strings, or an array of token arrays."
                .into(),
        ),
    }
}

/// A unit vector of `dims` components from `seed` (splitmix64 over the seed's words).
pub fn vector(seed: [u8; 32], dims: usize) -> Vec<f32> {
    let mut state = seed
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .fold(0u64, |a, w| a.rotate_left(17) ^ w);
    let mut out: Vec<f32> = (0..dims)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            // 24 random bits -> [-1, 1).
            ((z >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect();
    let norm = out.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut out {
            *x /= norm;
        }
    }
    out
}

/// Standard base64 (with padding) of the little-endian bytes of `v`.
pub fn base64_f32(v: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Validates the request and produces the embeddings list.
pub fn respond(_profile: &Profile, stats: &Arc<Recorder>, _seq: u64, req: &Value) -> Response {
    let Some(obj) = req.as_object() else {
        return bad("The request body must be a JSON object.");
    };
    let Some(model) = obj.get("model").and_then(Value::as_str) else {
        return bad("you must provide a model parameter");
    };
    let inputs = match inputs(obj) {
        Ok(i) => i,
        Err(m) => return bad(&m),
    };
    let base64 = match obj.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) if s == "float" => false,
        Some(Value::String(s)) if s == "base64" => true,
        Some(_) => {
            return bad(
                "Invalid value for 'encoding_format': expected one of 'float' or 'base64'.",
            );
        }
    };
    let dims = match obj.get("dimensions") {
        None | Some(Value::Null) => DEFAULT_DIMENSIONS,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 && n as usize <= MAX_DIMENSIONS => n as usize,
            _ => {
                return bad(&format!(
                    "Invalid 'dimensions': expected an integer from 1 to {MAX_DIMENSIONS}."
                ));
            }
        },
    };
    let prompt_tokens: u64 = inputs.iter().map(Input::tokens).sum();
    stats.usage(prompt_tokens, 0);
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let v = vector(input.seed(model), dims);
            let embedding = if base64 {
                Value::String(base64_f32(&v))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    });
    common::json_value(StatusCode::OK, &body)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn vectors_are_deterministic_unit_vectors() {
        let a = vector(Input::Text("hello").seed("m"), 64);
        assert_eq!(a, vector(Input::Text("hello").seed("m"), 64));
        assert_ne!(a, vector(Input::Text("hello!").seed("m"), 64));
        assert_ne!(a, vector(Input::Text("hello").seed("n"), 64));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        assert!(a.iter().any(|x| *x < 0.0) && a.iter().any(|x| *x > 0.0));
    }

    #[test]
    fn base64_matches_the_standard_alphabet() {
        // 1.0f32 = 00 00 80 3f; 2.0f32 = 00 00 00 40.
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, 2.0]), "AACAPwAAAEA=");
        assert_eq!(base64_f32(&[]), "");
    }

    #[test]
    fn inputs_of_every_shape() {
        let obj = |v: Value| v.as_object().cloned().unwrap();
        let o = obj(json!({"input": "a b c"}));
        assert_eq!(inputs(&o).unwrap()[0].tokens(), 3);
        let o = obj(json!({"input": ["a", "b c"]}));
        assert_eq!(
            inputs(&o).unwrap().iter().map(Input::tokens).sum::<u64>(),
            3
        );
        let o = obj(json!({"input": [1, 2, 3, 4]}));
        assert_eq!(inputs(&o).unwrap().len(), 1);
        let o = obj(json!({"input": [[1, 2], [3]]}));
        assert_eq!(inputs(&o).unwrap().len(), 2);
        for bad in [
            json!({}),
            json!({"input": ""}),
            json!({"input": []}),
            json!({"input": [[]]}),
            json!({"input": [1, "a"]}),
            json!({"input": {}}),
        ] {
            assert!(inputs(&obj(bad.clone())).is_err(), "{bad}");
        }
    }
}
