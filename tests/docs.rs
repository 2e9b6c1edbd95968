//! The docs cannot rot. Over README.md and docs/*.md:
//! - every `keel ...` line in a shell block names a real subcommand (its `--help` exits 0),
//!   every long flag it uses appears in that subcommand's `--help`, and every `--set` key is
//!   a real config key taking that value;
//! - every TOML example of a run config (or a sweep's `[base]` and `[axes]`) loads;
//! - every relative link resolves to a file, and every `#anchor` to a heading in it;
//! - docs/configuration.md lists exactly the keys of the config structs, each with its
//!   default as `RunConfig::default()` serialises it.

use keel::config::{set_path, RunConfig};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md, then docs/*.md in name order.
fn doc_files() -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    assert!(!docs.is_empty(), "docs/ holds no .md page");
    let mut all = vec![repo().join("README.md")];
    all.extend(docs);
    all
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Where a line is, for messages: `docs/train.md:12`.
fn at(p: &Path, line: usize) -> String {
    let rel = p.strip_prefix(repo()).unwrap_or(p);
    format!("{}:{line}", rel.display())
}

// ---------------------------------------------------------------- markdown, the parts used

/// A fenced code block: its info string (`sh`, `toml`, ...) and its lines, numbered from 1.
struct Block {
    info: String,
    lines: Vec<(usize, String)>,
}

/// Split a page into fenced blocks and the prose lines outside them.
fn parse_md(text: &str) -> (Vec<Block>, Vec<(usize, String)>) {
    let mut blocks = Vec::new();
    let mut prose = Vec::new();
    let mut cur: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let t = line.trim_start();
        match cur.take() {
            Some(b) if t.starts_with("```") && t.trim_start_matches('`').trim().is_empty() => {
                blocks.push(b);
            }
            Some(mut b) => {
                b.lines.push((n, line.to_string()));
                cur = Some(b);
            }
            None if t.starts_with("```") => {
                cur = Some(Block {
                    info: t.trim_start_matches('`').trim().to_string(),
                    lines: Vec::new(),
                });
            }
            None => prose.push((n, line.to_string())),
        }
    }
    assert!(cur.is_none(), "a fenced block is never closed");
    (blocks, prose)
}

/// The prose with inline code spans removed, one paragraph at a time (a span can wrap a
/// line but not a paragraph; an unmatched backtick is literal).
fn without_code_spans(prose: &[(usize, String)]) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut para: Vec<(usize, String)> = Vec::new();
    let flush = |para: &mut Vec<(usize, String)>, out: &mut Vec<(usize, String)>| {
        let ticks: usize = para.iter().map(|(_, l)| l.matches('`').count()).sum();
        let mut paired = ticks - ticks % 2;
        let mut inside = false;
        for (n, l) in para.drain(..) {
            let mut s = String::new();
            for c in l.chars() {
                if c == '`' && paired > 0 {
                    paired -= 1;
                    inside = !inside;
                } else if !inside {
                    s.push(c);
                }
            }
            out.push((n, s));
        }
    };
    for (n, l) in prose {
        if l.trim().is_empty() {
            flush(&mut para, &mut out);
        } else {
            para.push((*n, l.clone()));
        }
    }
    flush(&mut para, &mut out);
    out
}

/// GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits, `-`,
/// `_` and spaces kept), each space a hyphen; repeats get `-1`, `-2`, ...
fn slugs(text: &str) -> BTreeSet<String> {
    let (_, prose) = parse_md(text);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for (_, l) in prose {
        let hashes = l.chars().take_while(|&c| c == '#').count();
        if hashes == 0 || hashes > 6 || !l[hashes..].starts_with(' ') {
            continue;
        }
        let title = l[hashes..].trim().replace(['`', '*'], "");
        let base: String = title
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let k = seen.entry(base.clone()).or_insert(0);
        out.insert(if *k == 0 {
            base.clone()
        } else {
            format!("{base}-{k}")
        });
        *k += 1;
    }
    out
}

// ---------------------------------------------------------------- shell lines

/// Split a shell line into words: quotes group and are removed, an unquoted `#` after
/// whitespace starts a comment.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut has = false;
    let mut prev_space = true;
    for c in line.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                has = true;
            }
            None if c == '#' && prev_space => break,
            None if c.is_whitespace() => {
                if has || !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
                has = false;
            }
            None => cur.push(c),
        }
        prev_space = quote.is_none() && c.is_whitespace();
    }
    if has || !cur.is_empty() {
        words.push(cur);
    }
    words
}

/// The keel arguments of a documented command line, if it runs keel.
fn keel_args(line: &str) -> Option<Vec<String>> {
    let t = line.trim();
    let t = t.strip_prefix("$ ").unwrap_or(t);
    let w = shell_words(t);
    let skip = match w.first().map(String::as_str) {
        Some("keel" | "./target/release/keel" | "target/release/keel") => 1,
        Some("cargo") if w.len() > 3 && w[1] == "run" && w[2] == "--release" && w[3] == "--" => 4,
        _ => return None,
    };
    Some(w[skip..].to_vec())
}

fn help(path: &[String]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(path)
        .arg("--help")
        .output()
        .expect("spawn keel");
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status.success(), text)
}

/// The subcommands a `--help` lists under `Commands:` (not `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect()
}

/// Whether `--flag` appears in a help text as itself (not as the start of a longer flag).
fn has_flag(help: &str, flag: &str) -> bool {
    let word = |c: char| c.is_alphanumeric() || c == '-' || c == '_';
    help.match_indices(flag).any(|(i, _)| {
        let before = help[..i].chars().next_back();
        let after = help[i + flag.len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(word)
    })
}

#[test]
fn every_documented_command_line_parses() {
    let mut helps: BTreeMap<Vec<String>, (bool, String)> = BTreeMap::new();
    let mut get = |path: &[String]| {
        helps
            .entry(path.to_vec())
            .or_insert_with(|| help(path))
            .clone()
    };
    let mut checked = 0;
    let mut problems = Vec::new();
    for f in doc_files() {
        let (blocks, _) = parse_md(&read(&f));
        for b in blocks {
            if !["sh", "bash", "shell", "console", ""].contains(&b.info.as_str()) {
                continue;
            }
            for (n, line) in &b.lines {
                let Some(args) = keel_args(line) else {
                    continue;
                };
                let here = at(&f, *n);
                // global options (`keel --threads 1 bench`) come before the subcommand
                let mut i = 0;
                while i < args.len() && args[i].starts_with('-') {
                    let takes_value = ["--threads", "--max-memory"].contains(&args[i].as_str());
                    i += if takes_value { 2 } else { 1 };
                }
                let Some(sub) = args.get(i) else {
                    problems.push(format!("{here}: no subcommand in `{}`", line.trim()));
                    continue;
                };
                let mut path = vec![sub.clone()];
                let (mut ok, mut text) = get(path.as_slice());
                // nested subcommands (`keel sweep collect DIR`)
                while ok {
                    match args.get(i + path.len()) {
                        Some(next) if subcommands(&text).contains(next) => {
                            path.push(next.clone());
                            (ok, text) = get(path.as_slice());
                        }
                        _ => break,
                    }
                }
                if !ok {
                    problems.push(format!(
                        "{here}: `keel {} --help` fails: {}",
                        path.join(" "),
                        text.trim()
                    ));
                    continue;
                }
                for (j, a) in args.iter().enumerate() {
                    if !a.starts_with("--") || a == "--" {
                        continue;
                    }
                    let flag = a.split('=').next().unwrap();
                    if !has_flag(&text, flag) {
                        problems.push(format!(
                            "{here}: `keel {}` has no flag {flag} (see its --help)",
                            path.join(" ")
                        ));
                    }
                    if flag == "--set" {
                        let value = match a.split_once('=') {
                            Some((_, v)) => Some(v.to_string()),
                            None => args.get(j + 1).cloned(),
                        };
                        match value {
                            Some(v) => {
                                if let Err(e) = RunConfig::parse(None, std::slice::from_ref(&v)) {
                                    problems.push(format!("{here}: --set {v}: {e}"));
                                }
                            }
                            None => problems.push(format!("{here}: --set without a value")),
                        }
                    }
                }
                checked += 1;
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // the README's two commands and the pages' examples were seen
    assert!(
        checked >= 20,
        "only {checked} keel command lines found in the docs"
    );
}

// ---------------------------------------------------------------- TOML examples

/// The value an axis of a sweep takes first: a list's first element, a log range's start.
fn first_axis_value(v: &toml::Value) -> toml::Value {
    match v {
        toml::Value::Array(a) if !a.is_empty() => a[0].clone(),
        toml::Value::Table(t) => match t.get("log") {
            Some(toml::Value::Array(a)) if !a.is_empty() => a[0].clone(),
            _ => v.clone(),
        },
        _ => v.clone(),
    }
}

#[test]
fn toml_examples_load() {
    let sections = fields_at("").expect("RunConfig lists its sections");
    let mut checked = 0;
    let mut problems = Vec::new();
    for f in doc_files() {
        let (blocks, _) = parse_md(&read(&f));
        for b in blocks.iter().filter(|b| b.info == "toml") {
            let here = at(&f, b.lines.first().map_or(0, |l| l.0));
            let text: String = b.lines.iter().map(|(_, l)| format!("{l}\n")).collect();
            let t: toml::Table = match text.parse() {
                Ok(t) => t,
                Err(e) => {
                    problems.push(format!("{here}: not valid TOML: {e}"));
                    continue;
                }
            };
            if t.keys().all(|k| sections.contains(k)) {
                // a run config
                if let Err(e) = RunConfig::from_table(t) {
                    problems.push(format!("{here}: {e}"));
                }
                checked += 1;
            } else if let Some(toml::Value::Table(base)) = t.get("base") {
                // a sweep file: its base, and each axis at its first value
                if let Err(e) = RunConfig::from_table(base.clone()) {
                    problems.push(format!("{here}: [base]: {e}"));
                }
                if let Some(toml::Value::Table(axes)) = t.get("axes") {
                    for (k, v) in axes {
                        let mut one = base.clone();
                        let r = set_path(&mut one, k, first_axis_value(v))
                            .and_then(|_| RunConfig::from_table(one));
                        if let Err(e) = r {
                            problems.push(format!("{here}: axis {k}: {e}"));
                        }
                    }
                }
                checked += 1;
            } else if t.contains_key("axes") {
                // a command sweep ([trial], no [base]): the sweep reader's own checks
                // (placeholders, steps, unknown keys)
                if let Err(e) = keel::sweep::SweepSpec::parse(&text, Path::new(&here)) {
                    problems.push(format!("{here}: {e}"));
                }
                checked += 1;
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(checked >= 3, "only {checked} TOML examples found");
}

// ---------------------------------------------------------------- links

#[test]
fn every_relative_link_and_anchor_resolves() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for f in doc_files() {
        let text = read(&f);
        let (_, prose) = parse_md(&text);
        for (n, line) in without_code_spans(&prose) {
            let mut rest = line.as_str();
            while let Some(i) = rest.find("](") {
                rest = &rest[i + 2..];
                let Some(end) = rest.find(')') else { break };
                let target = rest[..end].split_whitespace().next().unwrap_or("");
                rest = &rest[end..];
                if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                checked += 1;
                let here = at(&f, n);
                let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
                let dest = if file.is_empty() {
                    f.clone()
                } else {
                    f.parent().unwrap().join(file)
                };
                if !dest.exists() {
                    problems.push(format!(
                        "{here}: link to {target}: {} does not exist",
                        dest.display()
                    ));
                    continue;
                }
                if !anchor.is_empty() {
                    let ok = dest.extension().is_some_and(|e| e == "md")
                        && slugs(&read(&dest)).contains(anchor);
                    if !ok {
                        problems.push(format!(
                            "{here}: link to {target}: no heading with anchor #{anchor} in {}",
                            dest.display()
                        ));
                    }
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(checked >= 20, "only {checked} relative links found");
}

#[test]
fn the_readme_names_the_test_command_and_the_index_lists_every_page() {
    // .ci/run runs the README's test command
    let readme = read(&repo().join("README.md"));
    assert!(
        readme.contains("Tests: `cargo test --release`"),
        "README.md must keep the line naming the test command (.ci/run relies on it)"
    );
    let index = read(&repo().join("docs/README.md"));
    for f in doc_files().iter().skip(1) {
        let name = f.file_name().unwrap().to_str().unwrap();
        if name != "README.md" {
            assert!(
                index.contains(&format!("]({name})")),
                "docs/README.md does not link {name}"
            );
            assert!(
                readme.contains(&format!("](docs/{name})")),
                "README.md does not link docs/{name}"
            );
        }
    }
}

// ---------------------------------------------------------------- configuration reference

const PROBE: &str = "__keel_docs_probe";

/// The fields of the config struct at `path` (`""`: the sections), as serde lists them when
/// it refuses an unknown one; None when `path` is not a struct (a value, a map or an enum).
fn fields_at(path: &str) -> Option<Vec<String>> {
    let mut t = toml::Table::new();
    if path.is_empty() {
        t.insert(PROBE.to_string(), toml::Value::Integer(1));
    } else {
        set_path(&mut t, &format!("{path}.{PROBE}"), toml::Value::Integer(1)).unwrap();
    }
    let e = RunConfig::from_table(t).expect_err("an unknown key is refused");
    // serde: "unknown field `x`, expected one of `a`, `b`, `c`" (or "expected `a` or `b`")
    if !e.problem.contains("unknown field") {
        return None;
    }
    let (_, expected) = e.problem.split_once("expected")?;
    let names: Vec<String> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    assert!(
        !names.is_empty(),
        "{path}: cannot read the field list from: {}",
        e.problem
    );
    Some(names)
}

/// Every key of the run configuration, `section.key`; the entries of a map (the per-role
/// init overrides) as `section.key.<>.field`.
fn config_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let sections = fields_at("").expect("RunConfig lists its sections");
    assert!(sections.len() >= 10, "{sections:?}");
    for s in sections {
        let fields = fields_at(&s).unwrap_or_else(|| panic!("[{s}] is not a struct"));
        for k in fields {
            let p = format!("{s}.{k}");
            if let Some(sub) = fields_at(&p) {
                keys.extend(sub.iter().map(|g| format!("{p}.{g}")));
            } else if let Some(sub) = fields_at(&format!("{p}.x")) {
                keys.extend(sub.iter().map(|g| format!("{p}.<>.{g}")));
            } else {
                keys.insert(p);
            }
        }
    }
    keys
}

/// `init.roles.<role>.std` → `init.roles.<>.std`.
fn normalise_key(k: &str) -> String {
    k.split('.')
        .map(|s| {
            if s.starts_with('<') && s.ends_with('>') {
                "<>"
            } else {
                s
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn lookup<'a>(t: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let mut parts = key.split('.');
    let mut v = t.get(parts.next()?)?;
    for p in parts {
        v = v.as_table()?.get(p)?;
    }
    Some(v)
}

/// Equal values; an integer written for a float default (or the reverse) compares by value.
fn same(a: &toml::Value, b: &toml::Value) -> bool {
    match (a, b) {
        (toml::Value::Integer(i), toml::Value::Float(x))
        | (toml::Value::Float(x), toml::Value::Integer(i)) => *i as f64 == *x,
        _ => a == b,
    }
}

#[test]
fn configuration_reference_matches_the_config_structs() {
    let path = repo().join("docs/configuration.md");
    let text = read(&path);
    let (_, prose) = parse_md(&text);
    // key rows: | `section.key` | default | meaning |
    let mut rows: Vec<(usize, String, String)> = Vec::new();
    for (n, l) in &prose {
        let t = l.trim();
        if !t.starts_with('|') {
            continue;
        }
        let cells: Vec<&str> = t.trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() < 3 {
            continue;
        }
        let first = cells[0];
        let is_key = first.len() > 2
            && first.starts_with('`')
            && first.ends_with('`')
            && first[1..first.len() - 1].contains('.')
            && !first[1..first.len() - 1].contains([' ', '`']);
        if is_key {
            let key = normalise_key(&first[1..first.len() - 1]);
            let default = cells[1].trim_matches('`').to_string();
            rows.push((*n, key, default));
        }
    }
    let expected = config_keys();
    let mut problems = Vec::new();
    let mut documented = BTreeSet::new();
    for (n, key, _) in &rows {
        if !documented.insert(key.clone()) {
            problems.push(format!("{}: {key} is listed twice", at(&path, *n)));
        }
    }
    for k in expected.difference(&documented) {
        problems.push(format!(
            "docs/configuration.md: {k} is a config key but has no row"
        ));
    }
    for k in documented.difference(&expected) {
        problems.push(format!(
            "docs/configuration.md: {k} is not a config key (renamed or removed?)"
        ));
    }
    let defaults: toml::Table = RunConfig::default()
        .to_toml()
        .parse()
        .expect("the default config serialises to TOML");
    for (n, key, written) in &rows {
        let here = at(&path, *n);
        match lookup(&defaults, key) {
            // Option fields left unset, and map entries, have no default value
            None => {
                if written != "—" {
                    problems.push(format!(
                        "{here}: {key} has no default; write — (got {written})"
                    ));
                }
            }
            Some(v) => {
                let parsed = format!("v = {written}")
                    .parse::<toml::Table>()
                    .ok()
                    .and_then(|mut t| t.remove("v"));
                match parsed {
                    Some(p) if same(&p, v) => {}
                    _ => problems.push(format!(
                        "{here}: {key} defaults to {v}, the page says {written}"
                    )),
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------- the helpers themselves

#[test]
fn the_doc_helpers_read_what_they_should() {
    assert_eq!(
        shell_words(r#"keel sample --prompt "ada lives in" --set init.scheme="mitchell"  # c"#),
        [
            "keel",
            "sample",
            "--prompt",
            "ada lives in",
            "--set",
            "init.scheme=mitchell"
        ]
    );
    assert_eq!(shell_words("keel watch a#b"), ["keel", "watch", "a#b"]);
    let s = slugs("# keel watch\n## Measured: qk-norm across LR × width (2023)\n```sh\n# not a heading\n```\n## [guard]\n## [guard]\n");
    for want in [
        "keel-watch",
        "measured-qk-norm-across-lr--width-2023",
        "guard",
        "guard-1",
    ] {
        assert!(s.contains(want), "{want}: {s:?}");
    }
    assert!(!s.contains("not-a-heading"), "{s:?}");
    let help = "      --steps <STEPS>  Number\n      --set <K=V>\n      --max-steps";
    assert!(has_flag(help, "--steps") && has_flag(help, "--set"));
    assert!(!has_flag(help, "--step") && !has_flag(help, "--max"));
    let prose = vec![(1, "see `a](b)` and [x](y.md)".to_string())];
    assert_eq!(without_code_spans(&prose)[0].1, "see  and [x](y.md)");
    assert_eq!(normalise_key("init.roles.<role>.std"), "init.roles.<>.std");
}
