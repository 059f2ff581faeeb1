//! Golden tests for the planner, through the public API: `tests/golden/plan/<case>.json`
//! (`{"desired": <Desired>, "observed": <Observed>}`) → `<case>.ops.json` (the `Plan`, or
//! `{"error": "…"}`). `CLOUDLB_BLESS=1` (or `UPDATE_GOLDEN=1`, as for the build goldens) rewrites
//! the expected files; review the diff.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step fails the test

use cloudlb_core::model::Desired;
use cloudlb_core::model::observed::Observed;
use cloudlb_core::plan::plan;
use std::path::{Path, PathBuf};

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
    let name = case.file_name().and_then(|n| n.to_str()).expect("name");
    let stem = name.strip_suffix(".json").expect(".json");
    case.with_file_name(format!("{stem}{EXPECTED}"))
}

#[test]
fn golden_plans() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/plan");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("golden dir")
        .map(|e| e.expect("dir entry").path())
        .collect();
    let name = |p: &PathBuf| {
        p.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string()
    };
    let mut cases: Vec<_> = files
        .iter()
        .filter(|p| name(p).ends_with(".json") && !name(p).ends_with(EXPECTED))
        .cloned()
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 10,
        "expected the golden cases in {}",
        dir.display()
    );
    let orphans: Vec<_> = files
        .iter()
        .filter(|p| name(p).ends_with(EXPECTED))
        .filter(|p| !cases.iter().any(|c| expected_path(c) == **p))
        .collect();
    assert!(
        orphans.is_empty(),
        "expected files without a case: {orphans:?}"
    );

    let mut failures = Vec::new();
    for case in &cases {
        let got = run_case(case);
        let expected_path = expected_path(case);
        if bless() {
            std::fs::write(&expected_path, &got).expect("write golden");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if expected != got {
            failures.push(format!("{}:\n{got}", case.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "plan golden mismatch (CLOUDLB_BLESS=1 to accept, then review the diff):\n{}",
        failures.join("\n")
    );
}
