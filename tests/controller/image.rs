//! The container image definition: hadolint-clean, a scratch final stage running as non-root.
//! (`scripts/build-image` assembles and runs the same final stage with buildah.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step fails the test

use crate::support;
use std::path::PathBuf;
use std::process::Command;

fn hadolint() -> PathBuf {
    let cache = std::env::var_os("CLOUDLB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                })
                .join("cloudlb")
        });
    cache.join("tools-venv/bin/hadolint")
}

#[test]
fn dockerfile_passes_hadolint() {
    let bin = hadolint();
    assert!(
        bin.exists(),
        "{} is missing: run scripts/install-test-deps",
        bin.display()
    );
    let dockerfile = concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile");
    support::process::run_ok(Command::new(&bin).arg(dockerfile));
}

#[test]
fn final_stage_is_scratch_non_root_with_ca_bundle() {
    let dockerfile = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile"))
        .expect("Dockerfile");
    let last_stage = dockerfile.rsplit("\nFROM ").next().unwrap_or_default();
    assert!(
        last_stage.starts_with("scratch"),
        "final stage:\n{last_stage}"
    );
    assert!(last_stage.contains("USER 65532:65532"));
    assert!(last_stage.contains("/etc/ssl/certs/ca-certificates.crt"));
    assert!(last_stage.contains("ENTRYPOINT [\"/cloudlb\"]"));
    assert!(
        dockerfile.contains("+crt-static"),
        "the binary must be static to run FROM scratch"
    );
}
