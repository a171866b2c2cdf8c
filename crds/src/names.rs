//! The naming rule for everything the operator makes: names and label values stay within
//! Kubernetes' 63-character limit whatever the length of the parent's name.

use sha2::{Digest, Sha256};

/// The longest name or label value Kubernetes accepts for the objects we make.
pub const MAX_NAME_LEN: usize = 63;
const CUT_LEN: usize = 54;

/// Returns `name` unchanged when it fits in 63 characters; otherwise its first 54
/// characters, `-`, and the first 8 hex digits of the SHA-256 of the full name.
pub fn bounded_name(name: &str) -> String {
    if name.len() <= MAX_NAME_LEN {
        return name.to_string();
    }
    let digest = Sha256::digest(name.as_bytes());
    let hash = hex::encode(&digest[..4]);
    // Names are ASCII in Kubernetes, but never cut inside a UTF-8 sequence.
    let mut cut = CUT_LEN;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}-{hash}", &name[..cut])
}

/// The name of a child object: `<parent>-<suffix>`, bounded.
pub fn child_name(parent: &str, suffix: &str) -> String {
    bounded_name(&format!("{parent}-{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_unchanged() {
        assert_eq!(child_name("support", "gateway"), "support-gateway");
    }

    #[test]
    fn long_names_are_cut_and_hashed() {
        let parent = "a".repeat(63);
        let name = child_name(&parent, "gateway");
        assert!(name.len() <= MAX_NAME_LEN, "{name}");
        assert!(name.starts_with(&"a".repeat(54)));
        let other = child_name(&parent, "rate-limiting");
        assert_ne!(
            name, other,
            "different children of one parent must not collide"
        );
        assert_eq!(name, child_name(&parent, "gateway"), "deterministic");
    }
}
