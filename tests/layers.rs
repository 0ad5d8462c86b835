//! The layers docs/architecture.md draws, checked on the sources: the protocol (`src/nbd/`)
//! and the nbdkit plugin serve through the export seam and never reach the engine themselves;
//! the one adapter over the engine is `src/service/exports.rs`.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn frontends_never_import_the_engine() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (dir, engine) in [
        ("src/nbd", "crate::engine"),
        ("nbdkit-plugin/src", "thinnbd::engine"),
    ] {
        let mut files = Vec::new();
        rust_files(&root.join(dir), &mut files);
        assert!(!files.is_empty(), "no sources under {dir}");
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for (n, line) in text.lines().enumerate() {
                assert!(
                    !line.contains(engine),
                    "{}:{}: {engine} (go through thinnbd::service::exports)",
                    f.display(),
                    n + 1
                );
            }
        }
    }
}
