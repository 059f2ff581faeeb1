//! Certificates for the testbed, through the openssl CLI: the API server's keys, and serving
//! certificates for webhooks that the API server calls.

use std::path::{Path, PathBuf};

/// Runs `openssl ARGS` (the openssl CLI); a failure panics with what openssl said.
pub fn openssl(args: &[&str]) {
    crate::process::run_ok(std::process::Command::new("openssl").args(args));
}

/// A self-signed certificate valid for the IP address `ip` (its own CA: the caBundle is the
/// certificate) and its key, as `tls.crt` and `tls.key` in `dir`.
pub fn self_signed_for_ip(dir: &Path, ip: &str) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).expect("certificate dir");
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let san = format!("subjectAltName=IP:{ip}");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=cloudlb-test",
        "-addext",
        &san,
        "-keyout",
        path_str(&key),
        "-out",
        path_str(&cert),
    ]);
    (cert, key)
}

pub(crate) fn path_str(path: &Path) -> &str {
    path.to_str().expect("testbed paths are UTF-8")
}
