//! Golden tests for the planner, through the public API: `tests/golden/plan/<case>.json`
//! (`{"desired": <Desired>, "observed": <Observed>}`) → `<case>.ops.json` (the `Plan`, or
//! `{"error": "…"}`). `CLOUDLB_BLESS=1` (or `UPDATE_GOLDEN=1`, as for the build goldens) rewrites
//! the expected files; review the diff.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step fails the test

use cloudlb_core::model::Desired;
use cloudlb_core::model::observed::Observed;
use cloudlb_core::plan::plan;
use std::path::{Path, PathBuf};

#[path = "support/golden.rs"]
mod golden;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    desired: Desired,
    observed: Observed,
}

const EXPECTED: &str = ".ops.json";

fn bless() -> bool {
    std::env::var("CLOUDLB_BLESS").is_ok_and(|v| v == "1")
        || std::env::var_os("UPDATE_GOLDEN").is_some()
}

fn run_case(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read case");
    let case: Case = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{}: not a plan case: {e}", path.display()));
    let out = match plan(&case.desired, &case.observed) {
        Ok(p) => serde_json::to_string_pretty(&p),
        Err(e) => serde_json::to_string_pretty(&serde_json::json!({ "error": e.to_string() })),
    };
    out.expect("json") + "\n"
}

fn expected_path(case: &Path) -> PathBuf {
    let stem = golden::name(case).strip_suffix(".json").expect(".json");
    case.with_file_name(format!("{stem}{EXPECTED}"))
}

#[test]
fn golden_plans() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/plan");
    let files = golden::files(&dir);
    let cases = golden::cases(&dir, &files, |n| {
        n.ends_with(".json") && !n.ends_with(EXPECTED)
    });
    let orphans: Vec<_> = files
        .iter()
        .filter(|p| golden::name(p).ends_with(EXPECTED))
        .filter(|p| !cases.iter().any(|c| expected_path(c) == **p))
        .collect();
    assert!(
        orphans.is_empty(),
        "expected files without a case: {orphans:?}"
    );
    golden::check(
        &cases,
        expected_path,
        run_case,
        bless(),
        "plan golden mismatch (CLOUDLB_BLESS=1 to accept, then review the diff)",
    );
}
