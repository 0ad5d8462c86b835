//! The shell blocks of the project's Markdown (README.md, docs/), so that tests run the
//! commands the documents show as written. Shared by the test crates' support modules.

use std::path::Path;

/// A Markdown file of the checkout, by its path from the repository root.
pub fn read_doc(path: &str) -> String {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()))
}

/// The command lines of the first ```sh block under `heading` (a whole heading line, such as
/// "## Run it"), without comments and blank lines. Panics when there is no such block.
pub fn sh_block(markdown: &str, heading: &str) -> Vec<String> {
    let mut lines = markdown.lines();
    lines
        .by_ref()
        .find(|l| l.trim_end() == heading)
        .unwrap_or_else(|| panic!("no heading {heading:?}"));
    lines
        .by_ref()
        .take_while(|l| !l.starts_with('#'))
        .find(|l| l.trim_end() == "```sh")
        .unwrap_or_else(|| panic!("no ```sh block under {heading:?}"));
    lines
        .take_while(|l| l.trim_end() != "```")
        .map(without_comment)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// A command line without its trailing `# comment` (the blocks quote no `#`).
fn without_comment(line: &str) -> &str {
    match line.find(" #") {
        Some(at) => line[..at].trim(),
        None if line.trim_start().starts_with('#') => "",
        None => line.trim(),
    }
}
