//! The workspace's structure holds: `vl-runtime` built without default features pulls in no
//! command-line, progress-bar, plotting or benchmark code, as `cargo tree` says, and no module
//! of the runtime, the exporter or the benchmarks imports one that imports it back.
#![allow(clippy::unwrap_used)]

use std::process::Command;

/// `cargo tree` for `vl-runtime`'s normal dependencies with `args` appended, one crate a line.
fn tree(args: &[&str]) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let out = Command::new(cargo)
        .args(["tree", "--offline", "--manifest-path", manifest, "-p", "vl-runtime", "--no-default-features"])
        .args(["-e", "normal", "--prefix", "depth", "--format", "{p}"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Crate names in a `--prefix depth` listing, with their depth.
fn crates(listing: &str) -> Vec<(usize, String)> {
    listing
        .lines()
        .filter_map(|l| {
            let depth_len = l.chars().take_while(char::is_ascii_digit).count();
            let depth = l[..depth_len].parse().ok()?;
            let name = l[depth_len..].split_whitespace().next()?.to_string();
            Some((depth, name))
        })
        .collect()
}

#[test]
fn the_runtime_has_no_cli_progress_bar_plotting_or_benchmark_dependencies() {
    let names = crates(&tree(&[]));
    assert!(names.iter().any(|(_, n)| n == "ort"), "cargo tree listed no ort: {names:?}");
    for banned in ["clap", "indicatif", "plotters", "vl-bench", "vl-run", "vl-export", "vl-serve", "console"] {
        assert!(names.iter().all(|(_, n)| n != banned), "vl-runtime depends on {banned}");
    }
}

#[test]
fn anyhow_reaches_the_runtime_only_through_ffmpeg_sidecar() {
    // ffmpeg-sidecar (the crate the project uses to drive ffmpeg) returns anyhow errors from its
    // API; the runtime itself converts them into its own typed errors and never names anyhow.
    let listing = tree(&["-i", "anyhow"]);
    let dependents: Vec<String> = crates(&listing).into_iter().filter(|(d, _)| *d == 1).map(|(_, n)| n).collect();
    assert!(dependents.iter().all(|n| n == "ffmpeg-sidecar"), "anyhow is pulled in by {dependents:?}");
    let runtime_toml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../runtime/Cargo.toml")).unwrap();
    assert!(!runtime_toml.contains("anyhow"), "runtime/Cargo.toml names anyhow");
}

/// Top-level module of each `.rs` file under `src` → the top-level modules its non-test code
/// names through `crate::`.
fn module_imports(src: &std::path::Path) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut imports = std::collections::BTreeMap::<String, std::collections::BTreeSet<String>>::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            let top =
                rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
            if top == "lib" || top == "main" || top == "bin" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            let names = imports.entry(top.clone()).or_default();
            for line in code.lines().map(str::trim_start).filter(|l| !l.starts_with("//")) {
                for (i, _) in line.match_indices("crate::") {
                    let name: String =
                        line[i + 7..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                    if !name.is_empty() && name != top {
                        names.insert(name);
                    }
                }
            }
        }
    }
    imports
}

/// A chain of modules from `from` back to itself, if there is one.
fn cycle_through(
    imports: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    from: &str,
) -> Option<Vec<String>> {
    let mut stack = vec![vec![from.to_string()]];
    let mut seen = std::collections::BTreeSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().unwrap();
        for next in imports.get(last).into_iter().flatten() {
            if next == from {
                return Some([path.clone(), vec![next.clone()]].concat());
            }
            if seen.insert(next.clone()) {
                stack.push([path.clone(), vec![next.clone()]].concat());
            }
        }
    }
    None
}

#[test]
fn no_module_of_the_runtime_or_the_exporter_imports_one_that_imports_it_back() {
    for krate in ["runtime", "exporter", "bench"] {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(krate).join("src");
        let imports = module_imports(&src);
        assert!(imports.len() > 3, "{krate}: found only {:?}", imports.keys());
        for module in imports.keys() {
            if let Some(cycle) = cycle_through(&imports, module) {
                panic!("{krate}: import circle {}", cycle.join(" → "));
            }
        }
    }
}
