//! Replays the committed fuzz corpus (fuzz/corpus/<target>/) through the fuzz targets' own
//! checks, so every input the fuzzer kept, and every crash reproducer saved there, is checked
//! by plain `cargo test` on stable Rust, without libFuzzer.

use std::fs;
use std::panic;
use std::path::{Path, PathBuf};

// The very file the fuzz targets call, so the replay can never drift from the fuzzing.
#[path = "../../fuzz/src/lib.rs"]
mod checks;

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus");

/// The check a fuzz target runs on each input; it panics when a property does not hold.
type Check = fn(&[u8]);

/// (fuzz target and corpus directory name, the check that target runs on each input)
const TARGETS: &[(&str, Check)] = &[
    ("server_name_ext", checks::check_server_name_ext),
    ("name_rules", checks::check_name),
    ("answer_classify", checks::check_answer),
];

/// Every file of one corpus directory, sorted so failures are listed in a stable order.
fn corpus_files(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(CORPUS).join(target);
    let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.unwrap_or_else(|e| panic!("{}: {e}", dir.display())).path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_file_passes_its_target_checks() {
    let mut failed = Vec::new();
    for &(target, check) in TARGETS {
        let files = corpus_files(target);
        assert!(!files.is_empty(), "the {target} corpus is empty");
        for path in files {
            let data = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // Go on past a failure so one run names every failing file; the panic message
            // of each has already been printed by the panic hook.
            if panic::catch_unwind(|| check(&data)).is_err() {
                failed.push(path.display().to_string());
            }
        }
    }
    assert!(failed.is_empty(), "corpus files that fail their checks: {failed:#?}");
}

#[test]
fn every_corpus_directory_has_a_target() {
    let entries = fs::read_dir(CORPUS).unwrap_or_else(|e| panic!("{CORPUS}: {e}"));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("{CORPUS}: {e}"));
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(
            TARGETS.iter().any(|&(target, _)| target == name),
            "fuzz/corpus/{name} is not replayed: add its target to TARGETS"
        );
    }
}
