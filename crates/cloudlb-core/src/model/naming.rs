//! Deterministic cloud names (AWS rules: at most 32 characters, ASCII alphanumerics and hyphens,
//! no leading or trailing hyphen, not starting with `internal-`).
//!
//! Names are derived from the cluster, the Service namespace/name/UID (and for target groups the
//! immutable fields), so the operator finds its resources by name instead of listing the account.

use sha2::{Digest, Sha256};

pub const MAX_NAME_LEN: usize = 32;

/// The first `len` hex digits of the SHA-256 of `parts` (each ended by a NUL), for names that must
/// stay short and stable.
pub fn hash_hex(parts: &[&str], len: usize) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    h.finalize()
        .iter()
        .flat_map(|b| [b >> 4, b & 0xf])
        .take(len)
        .map(|n| char::from_digit(u32::from(n), 16).unwrap_or('0'))
        .collect()
}

/// Keeps ASCII alphanumerics, lower-cased, at most `max` characters.
fn sanitize(s: &str, max: usize) -> String {
    s.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .take(max)
        .collect()
}

/// `k8s-<ns>-<name>-<hash10>`: ≤ 32 chars.
pub fn load_balancer_name(cluster: &str, namespace: &str, name: &str, uid: &str) -> String {
    load_balancer_name_of_generation(cluster, namespace, name, uid, 0)
}

/// [`load_balancer_name`] of the Service's `generation`-th load balancer: 0 is the first; each
/// replacement (a change AWS cannot make in place, such as the scheme) makes the next one under
/// a new name, beside the one that serves until it is ready.
pub fn load_balancer_name_of_generation(
    cluster: &str,
    namespace: &str,
    name: &str,
    uid: &str,
    generation: u32,
) -> String {
    let generation = generation.to_string();
    let parts: &[&str] = match generation.as_str() {
        "0" => &["lb", cluster, namespace, name, uid],
        g => &["lb", cluster, namespace, name, uid, g],
    };
    let hash = hash_hex(parts, 10);
    // 3 ("k8s") + 1 + 8 + 1 + 8 + 1 + 10 = 32
    format!(
        "k8s-{}-{}-{hash}",
        sanitize(namespace, 8),
        sanitize(name, 8)
    )
    .replace("--", "-")
}

/// Target-group name: `k8s-<ns>-<name>-<hash10>` where the hash covers the load balancer identity,
/// the listener port and the immutable target-group fields (protocol, port, target type), so a
/// change of any of them yields a new group (create new, switch listener, delete old).
pub fn target_group_name(
    lb_name: &str,
    namespace: &str,
    name: &str,
    listener_port: u16,
    immutable: &str,
) -> String {
    let hash = hash_hex(&["tg", lb_name, &listener_port.to_string(), immutable], 10);
    format!(
        "k8s-{}-{}-{hash}",
        sanitize(namespace, 8),
        sanitize(name, 8)
    )
    .replace("--", "-")
}

/// Security-group name (EC2 allows 255 chars; kept short and recognisable).
pub fn security_group_name(lb_name: &str) -> String {
    format!("{lb_name}-frontend")
}

/// Checks a user-given load-balancer name against the AWS rules.
pub fn validate_lb_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("must be 1-{MAX_NAME_LEN} characters"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err("may contain only ASCII letters, digits and hyphens".into());
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err("must not begin or end with a hyphen".into());
    }
    if name.starts_with("internal-") {
        return Err("must not begin with \"internal-\"".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_and_deterministic() {
        let long = "a-very-long-namespace-name-that-goes-on";
        let a = load_balancer_name("prod", long, "my-service-with-long-name", "uid-1");
        let b = load_balancer_name("prod", long, "my-service-with-long-name", "uid-1");
        assert_eq!(a, b);
        assert!(a.len() <= MAX_NAME_LEN, "{a}");
        validate_lb_name(&a).expect("generated name valid");
        let other_uid = load_balancer_name("prod", long, "my-service-with-long-name", "uid-2");
        assert_ne!(a, other_uid, "a re-created Service gets a new name");
        let tg = target_group_name(&a, long, "svc", 80, "TCP/30080/instance");
        assert!(tg.len() <= MAX_NAME_LEN);
        validate_lb_name(&tg).expect("tg name valid");
        assert_ne!(tg, target_group_name(&a, long, "svc", 80, "TCP/30080/ip"));
    }

    #[test]
    fn short_and_odd_inputs_still_give_valid_names() {
        for (ns, n) in [("", ""), ("-", "-"), ("ünïcödé", "名前"), ("a", "b")] {
            let name = load_balancer_name("c", ns, n, "u");
            validate_lb_name(&name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn user_names_are_checked() {
        assert!(validate_lb_name("ok-name").is_ok());
        assert!(validate_lb_name("internal-x").is_err());
        assert!(validate_lb_name("-x").is_err());
        assert!(validate_lb_name("x_y").is_err());
        assert!(validate_lb_name(&"x".repeat(33)).is_err());
    }
}
