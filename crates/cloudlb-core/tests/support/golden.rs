//! The golden-file check of the build goldens (`src/build/tests.rs`) and the plan goldens
//! (`tests/plan_golden.rs`), included by both with `#[path]`: every case's output against its
//! expected file, or, when blessing, the expected files rewritten.

use std::path::{Path, PathBuf};

/// The files in `dir`, sorted.
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("golden dir")
        .map(|e| e.expect("dir entry").path())
        .collect();
    files.sort();
    files
}

/// The file name of `path` (empty when it has none).
pub fn name(path: &Path) -> &str {
    path.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

/// The cases among `files` (those `is_case` picks by file name); there are at least ten.
pub fn cases(dir: &Path, files: &[PathBuf], is_case: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let cases: Vec<_> = files.iter().filter(|p| is_case(name(p))).cloned().collect();
    assert!(
        cases.len() >= 10,
        "expected the golden cases in {}",
        dir.display()
    );
    cases
}

/// Compares `run(case)` with the file at `expected(case)`, for every case; with `bless`, writes
/// it there instead. Fails with `mismatch` and every case that differs.
pub fn check(
    cases: &[PathBuf],
    expected: impl Fn(&Path) -> PathBuf,
    run: impl Fn(&Path) -> String,
    bless: bool,
    mismatch: &str,
) {
    let mut failures = Vec::new();
    for case in cases {
        let got = run(case);
        let expected_path = expected(case);
        if bless {
            std::fs::write(&expected_path, &got).expect("write golden");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if expected != got {
            failures.push(format!("{}:\n{got}", case.display()));
        }
    }
    assert!(failures.is_empty(), "{mismatch}:\n{}", failures.join("\n"));
}
