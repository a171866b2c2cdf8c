//! `GET /admin/usage` on the admin listener: what tenants used, from the ledger.
//!
//! Parameters (all optional): `tenant` (a tenant id, `namespace/name`), `from` and `to`
//! (a date `2026-12-01` or a time `2026-12-01T08:00:00Z`; `from` inclusive, `to`
//! exclusive; default: the current UTC month up to now) and `by` (`model`, `day`, or
//! absent for one line per tenant). Only this gateway's Chatbot is reported. The answer:
//!
//! ```json
//! {"chatbot": "prod/support", "from": "...", "to": "...", "by": "model",
//!  "rows": [{"tenant": "prod/acme", "model": "gpt-4o", "requests": 3,
//!            "input_tokens": 30, "output_tokens": 12, "cost_usd": "0.000150",
//!            "cost_micro_usd": 150}],
//!  "total": {"requests": 3, "input_tokens": 30, "output_tokens": 12,
//!            "cost_usd": "0.000150", "cost_micro_usd": 150}}
//! ```
//!
//! 400 names the parameter to fix; 503 when no ledger is configured or PostgreSQL cannot
//! answer.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::state::AppState;

fn problem(status: StatusCode, message: String) -> Response {
    (status, Json(json!({"error": {"message": message}}))).into_response()
}

/// A date or time as PostgreSQL will read it, checked first so that a bad one is a
/// clear 400: `YYYY-MM-DD`, optionally followed by `T` or a space and a time with a zone.
fn check_time(name: &str, v: &str) -> Result<(), String> {
    let b = v.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let date_ok = digits(0..4)
        && b.get(4) == Some(&b'-')
        && digits(5..7)
        && b.get(7) == Some(&b'-')
        && digits(8..10);
    let rest_ok = match b.get(10) {
        None => true,
        Some(b'T' | b' ') => {
            b.len() > 11
                && b[11..]
                    .iter()
                    .all(|c| c.is_ascii_digit() || b":.+-Z".contains(c))
        }
        Some(_) => false,
    };
    if date_ok && rest_ok && v.len() <= 40 {
        Ok(())
    } else {
        Err(format!(
            "`{name}` must be a date (2026-12-01) or a UTC time (2026-12-01T08:00:00Z)"
        ))
    }
}

/// The handler.
pub async fn usage(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    for k in params.keys() {
        if !matches!(k.as_str(), "tenant" | "from" | "to" | "by") {
            return problem(
                StatusCode::BAD_REQUEST,
                format!("unknown parameter `{k}`; use tenant, from, to and by"),
            );
        }
    }
    let by = params.get("by").map(String::as_str).unwrap_or("");
    let group = match by {
        "" | "tenant" => "",
        "model" => "model",
        "day" => "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        other => {
            return problem(
                StatusCode::BAD_REQUEST,
                format!("`by` must be `model` or `day`, not {other:?}"),
            );
        }
    };
    for name in ["from", "to"] {
        if let Some(v) = params.get(name)
            && let Err(e) = check_time(name, v)
        {
            return problem(StatusCode::BAD_REQUEST, e);
        }
    }
    let tenant = params.get("tenant").cloned();
    if tenant
        .as_deref()
        .is_some_and(|t| t.is_empty() || t.len() > 253)
    {
        return problem(
            StatusCode::BAD_REQUEST,
            "`tenant` must be a tenant id (namespace/name)".into(),
        );
    }
    let rt = state.runtime.load_full();
    let Some(ledger) = rt.ledger.clone() else {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "no usage ledger is configured (usage.postgresUrl); usage is in the Prometheus metrics only".into(),
        );
    };
    let client = match ledger.connect().await {
        Ok(c) => c,
        Err(e) => {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the usage ledger (PostgreSQL) cannot be reached: {e}; retry later"),
            );
        }
    };
    let from = params.get("from").cloned();
    let to = params.get("to").cloned();
    let key = if group.is_empty() {
        "''".to_string()
    } else {
        group.to_string()
    };
    let sql = format!(
        "WITH span AS (
           SELECT coalesce($4::text::timestamptz, date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC') AS lo,
                  coalesce($5::text::timestamptz, now()) AS hi)
         SELECT tenant, {key} AS k, count(*)::int8, coalesce(sum(input_tokens), 0)::int8,
                coalesce(sum(output_tokens), 0)::int8, coalesce(sum(cost_usd), 0)::numeric(20, 6)::text,
                (coalesce(sum(cost_usd), 0) * 1000000)::int8,
                to_char((SELECT lo FROM span) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                to_char((SELECT hi FROM span) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
         FROM parley_usage, span
         WHERE namespace = $1 AND chatbot = $2 AND ($3::text IS NULL OR tenant = $3)
           AND created_at >= span.lo AND created_at < span.hi
         GROUP BY tenant, k
         ORDER BY tenant, k"
    );
    // The span alone, for an answer with no rows.
    let span_sql = "SELECT to_char(coalesce($1::text::timestamptz, date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                           to_char(coalesce($2::text::timestamptz, now()) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')";
    let rows = client
        .query(
            &sql,
            &[&ledger.namespace, &ledger.chatbot, &tenant, &from, &to],
        )
        .await;
    let rows = match rows {
        Ok(r) => r,
        Err(e) => return db_error(&e),
    };
    let span = match client.query_one(span_sql, &[&from, &to]).await {
        Ok(r) => (r.get::<_, String>(0), r.get::<_, String>(1)),
        Err(e) => return db_error(&e),
    };
    let mut out = Vec::with_capacity(rows.len());
    let (mut requests, mut input, mut output, mut micros) = (0i64, 0i64, 0i64, 0i64);
    for r in &rows {
        let mut line = serde_json::Map::new();
        line.insert("tenant".into(), Value::String(r.get(0)));
        if !group.is_empty() {
            line.insert(by.into(), Value::String(r.get(1)));
        }
        let (n, i, o, cost, m): (i64, i64, i64, String, i64) =
            (r.get(2), r.get(3), r.get(4), r.get(5), r.get(6));
        requests += n;
        input += i;
        output += o;
        micros += m;
        line.insert("requests".into(), n.into());
        line.insert("input_tokens".into(), i.into());
        line.insert("output_tokens".into(), o.into());
        line.insert("cost_usd".into(), Value::String(cost));
        line.insert("cost_micro_usd".into(), m.into());
        out.push(Value::Object(line));
    }
    let body = json!({
        "chatbot": format!("{}/{}", ledger.namespace, ledger.chatbot),
        "tenant": tenant,
        "from": span.0,
        "to": span.1,
        "by": if group.is_empty() { "tenant" } else { by },
        "rows": out,
        "total": {
            "requests": requests,
            "input_tokens": input,
            "output_tokens": output,
            "cost_usd": format!("{}.{:06}", micros / 1_000_000, (micros % 1_000_000).abs()),
            "cost_micro_usd": micros,
        },
    });
    (StatusCode::OK, Json(body)).into_response()
}

fn db_error(e: &tokio_postgres::Error) -> Response {
    // A date PostgreSQL cannot read (22007 invalid_datetime_format, 22008 out of range).
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        if code.starts_with("22") {
            return problem(
                StatusCode::BAD_REQUEST,
                format!(
                    "`from` or `to` is not a valid date or time: {}",
                    db.message()
                ),
            );
        }
    }
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the usage ledger (PostgreSQL) failed to answer: {e}; retry later"),
    )
}

#[cfg(test)]
mod tests {
    use super::check_time;

    #[test]
    fn dates_and_times_are_checked_before_postgres_sees_them() {
        for ok in [
            "2026-12-01",
            "2026-12-01T08:00:00Z",
            "2026-12-01 08:00:00+01:00",
            "2026-12-01T08:00:00.5Z",
        ] {
            assert!(check_time("from", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "2026",
            "2026-1-01",
            "yesterday",
            "2026-12-01X",
            "2026-12-01T08:00;DROP",
            "2026-12-01T",
        ] {
            let e = check_time("to", bad);
            assert!(
                e.as_ref().is_err_and(|m| m.contains("`to`")),
                "{bad}: {e:?}"
            );
        }
    }
}
