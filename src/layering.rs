//! The module layering of `lib.rs`, enforced: each module imports only modules listed before it
//! (issue 8: the transforms and the executor imported each other, and every capability built on
//! them would have copied the workaround).

/// Top-level modules in layer order; a module may use only those before it (and itself). Test
/// code (after a file's `#[cfg(test)]`) may use anything.
const LAYERS: &[&str] = &[
    "dtype",
    "kernels",
    "formats",
    "references",
    "plan",
    "value",
    "state",
    "write",
    "transforms",
    "error",
    "executor",
    "prompt",
    "cli",
    "bindings",
];

/// The source files of a top-level module: `src/NAME.rs` or everything under `src/NAME/`.
fn files_of(module: &str) -> Vec<std::path::PathBuf> {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let file = src.join(format!("{module}.rs"));
    if file.is_file() {
        return vec![file];
    }
    let mut files = Vec::new();
    let mut dirs = vec![src.join(module)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}

#[test]
fn every_module_imports_only_the_layers_below_it() {
    let mut violations = Vec::new();
    for (rank, module) in LAYERS.iter().enumerate() {
        for file in files_of(module) {
            let text = std::fs::read_to_string(&file).expect("source file");
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for (line_no, line) in code.lines().enumerate() {
                for (above, _) in LAYERS.iter().enumerate().skip(rank + 1).map(|(i, m)| (m, i)) {
                    if line.contains(&format!("crate::{above}::")) || line.contains(&format!("crate::{above};")) {
                        violations.push(format!("{}:{}: {}", file.display(), line_no + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(violations.is_empty(), "imports pointing up:\n{}", violations.join("\n"));
}

#[test]
fn no_transform_imports_the_executor() {
    for file in files_of("transforms") {
        let text = std::fs::read_to_string(&file).expect("source file");
        assert!(!text.contains("executor::"), "{} imports the executor", file.display());
    }
}
