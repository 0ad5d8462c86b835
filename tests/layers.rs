//! The layers docs/architecture.md draws, checked on the sources: the protocol (`src/nbd/`)
//! and the nbdkit plugin serve through the export seam and never reach the engine themselves;
//! the one adapter over the engine is `src/service/exports.rs`. Inside the engine, each module
//! imports only the modules below it in the list in `src/engine/mod.rs`.

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

/// The engine's modules, top down, as `src/engine/mod.rs` lists them (modules on one line are
/// one level).
fn engine_levels(root: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(root.join("src/engine/mod.rs")).unwrap();
    let list = text
        .split("//! Modules by responsibility")
        .nth(1)
        .and_then(|rest| rest.split("//! ```text\n").nth(1))
        .and_then(|rest| rest.split("//! ```").next())
        .expect("src/engine/mod.rs lists its modules in a text block");
    list.lines()
        .map(|line| {
            let line = line.trim_start_matches("//!").trim();
            let names = line.split("  ").next().unwrap_or("");
            names.split(',').map(|n| n.trim().to_string()).collect()
        })
        .collect()
}

#[test]
fn engine_modules_import_only_those_below_them() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let levels = engine_levels(root);
    let level_of = |name: &str| levels.iter().position(|l| l.iter().any(|n| n == name));
    let mut files = Vec::new();
    rust_files(&root.join("src/engine"), &mut files);
    let mut checked = 0;
    for f in files {
        let name = f.file_stem().unwrap().to_str().unwrap().to_string();
        if f.parent() != Some(&root.join("src/engine")) || name == "mod" {
            continue;
        }
        let mine = level_of(&name).unwrap_or_else(|| panic!("{name} is not in the engine's list"));
        let text = std::fs::read_to_string(&f).unwrap();
        // Unit tests may use the whole engine.
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        for (n, line) in code.lines().enumerate() {
            for prefix in ["super::", "crate::engine::"] {
                for used in line.split(prefix).skip(1) {
                    let module: String = used
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    let Some(theirs) = level_of(&module) else {
                        continue;
                    };
                    assert!(
                        theirs > mine,
                        "src/engine/{name}.rs:{}: uses {module}, which is not below it",
                        n + 1
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} engine imports found");
}
