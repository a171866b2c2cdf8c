//! Status conditions: `lastTransitionTime` changes only when a condition's status does
//! (operator-rs' `compute_conditions`), and messages stay bounded.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// The longest condition message or Event note we write.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// The `Ready` condition type.
pub const READY: &str = "Ready";

/// A condition to set: type, status, reason, message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// Condition type, e.g. `Ready`.
    pub type_: &'static str,
    /// `True` or `False`.
    pub status: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// Human-readable message (bounded on write).
    pub message: String,
}

impl Desired {
    /// `Ready` with the given status, reason and message.
    pub fn ready(status: bool, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            type_: READY,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// The conditions to write: `desired` ones replace those of the same type in `current`,
/// keeping `lastTransitionTime` when the status is unchanged; others are kept as they are.
pub fn compute(
    current: &[Condition],
    desired: &[Desired],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = current
        .iter()
        .filter(|c| !desired.iter().any(|d| d.type_ == c.type_))
        .cloned()
        .collect();
    for d in desired {
        let status = if d.status { "True" } else { "False" };
        let previous = current.iter().find(|c| c.type_ == d.type_);
        let last_transition_time = match previous {
            Some(p) if p.status == status => p.last_transition_time.clone(),
            _ => Time(now),
        };
        out.push(Condition {
            type_: d.type_.to_string(),
            status: status.to_string(),
            reason: d.reason.to_string(),
            message: bounded(&d.message, MAX_MESSAGE_BYTES),
            last_transition_time,
            observed_generation: generation,
        });
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// `text` cut to at most `max` bytes (on a character boundary), marked with `…` when cut.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mark = "…";
    let mut cut = max.saturating_sub(mark.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{mark}", &text[..cut])
}

/// The `Ready` condition of a list, if any.
pub fn ready(conditions: &[Condition]) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == READY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn transition_time_kept_unless_status_changes() {
        let first = compute(
            &[],
            &[Desired::ready(true, "Rendered", "ok")],
            Some(1),
            at(10),
        );
        assert_eq!(first[0].last_transition_time, Time(at(10)));
        let same = compute(
            &first,
            &[Desired::ready(true, "Rendered", "still ok")],
            Some(2),
            at(20),
        );
        assert_eq!(same[0].last_transition_time, Time(at(10)));
        assert_eq!(same[0].message, "still ok");
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = compute(
            &same,
            &[Desired::ready(false, "InvalidSpec", "bad")],
            Some(3),
            at(30),
        );
        assert_eq!(flipped[0].last_transition_time, Time(at(30)));
        assert_eq!(flipped[0].status, "False");
    }

    #[test]
    fn other_conditions_are_kept() {
        let other = Condition {
            type_: "Other".into(),
            status: "True".into(),
            reason: "X".into(),
            message: String::new(),
            last_transition_time: Time(at(1)),
            observed_generation: None,
        };
        let out = compute(
            std::slice::from_ref(&other),
            &[Desired::ready(true, "Rendered", "")],
            None,
            at(2),
        );
        assert_eq!(out.len(), 2);
        assert!(out.contains(&other));
    }

    #[test]
    fn messages_are_bounded_on_char_boundaries() {
        let long = "é".repeat(2000);
        let cut = bounded(&long, MAX_MESSAGE_BYTES);
        assert!(cut.len() <= MAX_MESSAGE_BYTES);
        assert!(cut.ends_with('…'));
        assert_eq!(bounded("short", 10), "short");
    }
}
