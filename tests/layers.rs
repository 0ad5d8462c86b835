//! The layers docs/architecture.md draws, checked on the sources: the protocol (`src/nbd/`)
//! and the nbdkit plugin serve through the export seam and never reach the engine themselves;
//! the one adapter over the engine is `src/service/exports.rs`. Inside the engine and inside
//! pdata, each module imports only the modules below it in the list in its `mod.rs`; pdata
//! imports no layer above it.

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

/// A layer's modules, top down, as its `mod.rs` lists them in a text block after "Modules by
/// responsibility" (modules on one line are one level).
fn module_levels(root: &Path, layer: &str) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(root.join(format!("src/{layer}/mod.rs"))).unwrap();
    let list = text
        .split("//! Modules by responsibility")
        .nth(1)
        .and_then(|rest| rest.split("//! ```text\n").nth(1))
        .and_then(|rest| rest.split("//! ```").next())
        .unwrap_or_else(|| panic!("src/{layer}/mod.rs lists its modules in a text block"));
    list.lines()
        .map(|line| {
            let line = line.trim_start_matches("//!").trim();
            let names = line.split("  ").next().unwrap_or("");
            names.split(',').map(|n| n.trim().to_string()).collect()
        })
        .collect()
}

/// The non-test code of each top-level module file of `src/{layer}/` (not `mod.rs`), by name.
fn layer_sources(root: &Path, layer: &str) -> Vec<(String, String)> {
    let dir = root.join("src").join(layer);
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    files
        .into_iter()
        .filter(|f| f.parent() == Some(&dir))
        .map(|f| (f.file_stem().unwrap().to_str().unwrap().to_string(), f))
        .filter(|(name, _)| name != "mod")
        .map(|(name, f)| {
            let text = std::fs::read_to_string(&f).unwrap();
            // Unit tests may use the whole layer.
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
            (name, code.to_string())
        })
        .collect()
}

/// Checks that each module of `src/{layer}/` imports only modules below it in its `mod.rs`
/// list; returns how many imports were checked.
fn check_layer_imports_downward(layer: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let levels = module_levels(root, layer);
    let level_of = |name: &str| levels.iter().position(|l| l.iter().any(|n| n == name));
    let crate_prefix = format!("crate::{layer}::");
    let mut checked = 0;
    for (name, code) in layer_sources(root, layer) {
        let mine = level_of(&name)
            .unwrap_or_else(|| panic!("{name} is not in the list in src/{layer}/mod.rs"));
        for (n, line) in code.lines().enumerate() {
            for prefix in ["super::", crate_prefix.as_str()] {
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
                        "src/{layer}/{name}.rs:{}: uses {module}, which is not below it",
                        n + 1
                    );
                    checked += 1;
                }
            }
        }
    }
    checked
}

#[test]
fn engine_modules_import_only_those_below_them() {
    let checked = check_layer_imports_downward("engine");
    assert!(checked > 20, "only {checked} engine imports found");
}

#[test]
fn rados_modules_import_only_those_below_them() {
    let checked = check_layer_imports_downward("rados");
    assert!(checked > 3, "only {checked} rados imports found");
}

#[test]
fn pdata_modules_import_only_those_below_them() {
    let checked = check_layer_imports_downward("pdata");
    assert!(checked > 10, "only {checked} pdata imports found");
}

/// pdata is the bottom layer: it reaches none above it, and what the thin layer stores in its
/// trees is told to it through a value type, never spelt in pdata.
#[test]
fn pdata_knows_nothing_of_the_layers_above() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src/pdata"), &mut files);
    assert!(files.len() > 5, "too few sources under src/pdata");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (n, line) in text.lines().enumerate() {
            for above in [
                "crate::thin",
                "crate::engine",
                "crate::service",
                "crate::nbd",
                "crate::rados",
                "block_time",
            ] {
                assert!(
                    !line.contains(above),
                    "{}:{}: {above} in pdata",
                    f.display(),
                    n + 1
                );
            }
        }
    }
}
