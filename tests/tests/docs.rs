//! The repository's Markdown holds together: every relative link in every git-tracked `.md` file
//! resolves to a tracked file (or a directory holding some) inside the repository, every `#anchor`
//! names a heading of the page it points at, and no link or path points outside the repository (no
//! path above its root, no absolute path, nothing under the workspace's private `shared` folder,
//! which is not part of the repository).
//!
//! Needs `git` (the file list is `git ls-files`, so a link to a file that is only on one machine
//! fails too); no Envoy. Run with `cargo test -p circuit-breaker-e2e --test docs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

/// Paths that point at the workspace's private notes, spelt in two pieces so that this file does
/// not contain them.
fn forbidden_paths() -> [String; 2] {
    [format!("{}/shared", ".."), format!("{}/shared", "/work")]
}

/// The tracked files, and the text of the tracked Markdown files (for their headings).
struct Repo {
    files: BTreeSet<String>,
    markdown: BTreeMap<String, String>,
}

impl Repo {
    fn is_file_or_dir(&self, path: &str) -> bool {
        if path.is_empty() || self.files.contains(path) {
            return true;
        }
        let dir = format!("{}/", path.trim_end_matches('/'));
        self.files
            .range(dir.clone()..)
            .next()
            .is_some_and(|f| f.starts_with(&dir))
    }
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e crate lives one level below the repository root")
}

fn tracked_repo() -> Repo {
    let root = repo_root();
    let out = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(root)
        .output()
        .expect("git must be installed: the checked files are the git-tracked ones");
    assert!(
        out.status.success(),
        "git ls-files failed in {}: {}",
        root.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let files: BTreeSet<String> = String::from_utf8(out.stdout)
        .expect("tracked paths are UTF-8")
        .split('\0')
        .filter(|p| !p.is_empty())
        // A file deleted in the work tree but not yet in the index is not there to link to.
        .filter(|p| root.join(p).exists())
        .map(str::to_string)
        .collect();
    let markdown = files
        .iter()
        .filter(|p| p.ends_with(".md"))
        .map(|p| {
            let text = std::fs::read_to_string(root.join(p))
                .unwrap_or_else(|e| panic!("reading {p}: {e}"));
            (p.clone(), text)
        })
        .collect();
    Repo { files, markdown }
}

/// The lines of a Markdown text outside fenced code blocks, with inline code spans blanked, each with
/// its 1-based line number.
fn prose_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut fence: Option<(char, usize)> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let run = |c: char| trimmed.chars().take_while(|&x| x == c).count();
        match fence {
            Some((c, n)) => {
                if indent <= 3 && run(c) >= n && trimmed.trim_start_matches(c).trim().is_empty() {
                    fence = None;
                }
                continue;
            }
            None => {
                let opens = ['`', '~'].into_iter().find(|&c| indent <= 3 && run(c) >= 3);
                if let Some(c) = opens {
                    fence = Some((c, run(c)));
                    continue;
                }
            }
        }
        out.push((i + 1, strip_code_spans(line)));
    }
    out
}

/// `line` with every inline code span (a run of backticks up to the next run of the same length)
/// replaced by spaces; an unclosed run is left as it is.
fn strip_code_spans(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let n = chars[i..].iter().take_while(|&&c| c == '`').count();
        let mut j = i + n;
        let mut close = None;
        while j < chars.len() {
            if chars[j] == '`' {
                let m = chars[j..].iter().take_while(|&&c| c == '`').count();
                if m == n {
                    close = Some(j + m);
                    break;
                }
                j += m;
            } else {
                j += 1;
            }
        }
        match close {
            Some(end) => {
                out.extend(std::iter::repeat_n(' ', end - i));
                i = end;
            }
            None => {
                out.extend(&chars[i..i + n]);
                i += n;
            }
        }
    }
    out
}

/// Link destinations in one prose line: inline links and images (`[t](dest "title")`,
/// `[t](<dest>)`), reference definitions (`[id]: dest`) and HTML `href`/`src` attributes.
fn link_targets(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let dest = if let Some(inner) = after.strip_prefix('<') {
            inner.split('>').next().unwrap_or("")
        } else {
            let mut depth = 0usize;
            let end = after
                .char_indices()
                .find(|&(_, c)| match c {
                    '(' => {
                        depth += 1;
                        false
                    }
                    ')' if depth == 0 => true,
                    ')' => {
                        depth -= 1;
                        false
                    }
                    c => c.is_whitespace(),
                })
                .map_or(after.len(), |(i, _)| i);
            &after[..end]
        };
        out.push(dest.to_string());
        rest = after;
    }
    let t = line.trim_start();
    if line.len() - t.len() <= 3 && t.starts_with('[') && !t.starts_with("[^") {
        if let Some(close) = t.find("]:") {
            if let Some(dest) = t[close + 2..].split_whitespace().next() {
                out.push(
                    dest.trim_start_matches('<')
                        .trim_end_matches('>')
                        .to_string(),
                );
            }
        }
    }
    for attr in ["href=\"", "src=\""] {
        let mut rest = line;
        while let Some(at) = rest.find(attr) {
            let after = &rest[at + attr.len()..];
            out.push(after.split('"').next().unwrap_or("").to_string());
            rest = after;
        }
    }
    out
}

/// GitHub's anchors for the ATX headings of a Markdown text: lower-cased, punctuation dropped,
/// spaces turned into `-`, a repeated anchor suffixed `-1`, `-2`...
fn heading_anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for (_, line) in prose_lines_keeping_code(text) {
        let t = line.trim_start();
        let level = t.chars().take_while(|&c| c == '#').count();
        if line.len() - t.len() > 3 || !(1..=6).contains(&level) {
            continue;
        }
        let body = &t[level..];
        if !(body.is_empty() || body.starts_with(' ') || body.starts_with('\t')) {
            continue;
        }
        let body = body.trim().trim_end_matches('#').trim_end();
        let slug = slug(&unlink(body));
        let n = seen.entry(slug.clone()).or_insert(0);
        out.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    out
}

/// Like [`prose_lines`], but code spans keep their text (a heading's `` `code` `` is in its anchor).
fn prose_lines_keeping_code(text: &str) -> Vec<(usize, String)> {
    let kept: Vec<&str> = text.lines().collect();
    prose_lines(text)
        .into_iter()
        .map(|(n, _)| (n, kept[n - 1].to_string()))
        .collect()
}

/// `[text](dest)` → `text`, as the rendered heading reads.
fn unlink(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(open) = rest.find('[') {
        let Some(mid) = rest[open..].find("](") else {
            break;
        };
        let Some(close) = rest[open + mid..].find(')') else {
            break;
        };
        out.push_str(&rest[..open]);
        out.push_str(&rest[open + 1..open + mid]);
        rest = &rest[open + mid + close + 1..];
    }
    out.push_str(rest);
    out
}

fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter(|&c| c.is_alphanumeric() || c == '_' || c == '-' || c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// `%20` and friends decoded; a malformed escape is kept as written.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `base_dir/relative`, normalised; `None` when it climbs above the repository root.
fn resolve(base_dir: &str, relative: &str) -> Option<String> {
    let mut parts: Vec<&str> = base_dir.split('/').filter(|p| !p.is_empty()).collect();
    for part in relative.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// Every problem with the links and paths of one Markdown file, one line each.
fn check_markdown(path: &str, text: &str, repo: &Repo) -> Vec<String> {
    let mut problems = Vec::new();
    let base_dir = path.rsplit_once('/').map_or("", |(d, _)| d);
    for (n, line) in text.lines().enumerate() {
        for bad in forbidden_paths() {
            if line.contains(&bad) {
                problems.push(format!(
                    "{path}:{}: names {bad}, which is outside the repository",
                    n + 1
                ));
            }
        }
    }
    for (n, line) in prose_lines(text) {
        for target in link_targets(&line) {
            let at = format!("{path}:{n}: link `{target}`");
            let scheme = target.split_once(':').filter(|(s, _)| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
            });
            match scheme {
                Some((s, _)) if s.eq_ignore_ascii_case("file") => {
                    problems.push(format!("{at} points outside the repository"));
                    continue;
                }
                Some(_) => continue, // http, https, mailto...: not a path in the repository
                None => {}
            }
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (percent_decode(f), Some(percent_decode(a))),
                None => (percent_decode(&target), None),
            };
            let file = file.split('?').next().unwrap_or("").to_string();
            if file.is_empty() {
                // `#anchor` alone: a heading of this very page.
                if let Some(anchor) = anchor.filter(|a| !a.is_empty()) {
                    if !heading_anchors(text).contains(&anchor.to_lowercase()) {
                        problems.push(format!("{at}: {path} has no heading for #{anchor}"));
                    }
                }
                continue;
            }
            if file.starts_with('/') {
                problems.push(format!("{at} is absolute; write it relative to {path}"));
                continue;
            }
            let Some(resolved) = resolve(base_dir, &file) else {
                problems.push(format!("{at} climbs above the repository root"));
                continue;
            };
            if !repo.is_file_or_dir(&resolved) {
                problems.push(format!(
                    "{at}: `{resolved}` is not a tracked file or directory"
                ));
                continue;
            }
            let Some(anchor) = anchor.filter(|a| !a.is_empty()) else {
                continue;
            };
            if let Some(page_text) = repo.markdown.get(&resolved) {
                if !heading_anchors(page_text).contains(&anchor.to_lowercase()) {
                    problems.push(format!("{at}: {resolved} has no heading for #{anchor}"));
                }
            }
        }
    }
    problems
}

#[test]
fn every_relative_link_in_the_markdown_resolves_inside_the_repository() {
    let repo = tracked_repo();
    assert!(
        repo.markdown.contains_key("README.md") && repo.markdown.len() > 1,
        "found too few tracked Markdown files: {:?}",
        repo.markdown.keys()
    );
    let problems: Vec<String> = repo
        .markdown
        .iter()
        .flat_map(|(path, text)| check_markdown(path, text, &repo))
        .collect();
    assert!(
        problems.is_empty(),
        "{} broken link(s) or path(s) outside the repository:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn no_tracked_file_names_a_path_outside_the_repository() {
    let repo = tracked_repo();
    let root = repo_root();
    let mut problems = Vec::new();
    // Markdown files get this check, with their links, in the test above.
    for path in repo.files.iter().filter(|p| !p.ends_with(".md")) {
        // Binary files (and anything not UTF-8) hold no prose paths.
        let Ok(text) = std::fs::read_to_string(root.join(path)) else {
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            for bad in forbidden_paths() {
                if line.contains(&bad) {
                    problems.push(format!("{path}:{}: names {bad}", n + 1));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the repository must stand on its own; these lines point outside it:\n{}",
        problems.join("\n")
    );
}

// ---- The checker itself, on made-up pages: each kind of breakage is caught, and nothing else is. ----

fn fake_repo(pages: &[(&str, &str)], other_files: &[&str]) -> Repo {
    let mut files: BTreeSet<String> = other_files.iter().map(|f| f.to_string()).collect();
    files.extend(pages.iter().map(|(p, _)| p.to_string()));
    let markdown = pages
        .iter()
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect();
    Repo { files, markdown }
}

fn problems_of(page: &str, text: &str, repo: &Repo) -> Vec<String> {
    check_markdown(page, text, repo)
}

#[test]
fn checker_accepts_good_links_and_ignores_code_and_urls() {
    let target = "# Configuration\n\n## The `max_upstreams` limit\n\n## Example\n\n## Example\n";
    let repo = fake_repo(&[("docs/configuration.md", target)], &["envoy/e2e.yaml"]);
    let page =
        "See [the table](configuration.md), [a limit](configuration.md#the-max_upstreams-limit),\n\
        [the second example](configuration.md#example-1), [the bootstrap](../envoy/e2e.yaml),\n\
        [the folder](../envoy/), [Envoy](https://www.envoyproxy.io/) and [me](#links).\n\n\
        ## Links\n\n```\n[not a link](missing.md)\n```\n\nInline code: `[x](missing.md)`.\n\n\
        [ref]: configuration.md#example\n";
    assert_eq!(
        problems_of("docs/README.md", page, &repo),
        Vec::<String>::new()
    );
}

#[test]
fn checker_reports_a_missing_file() {
    let repo = fake_repo(&[], &[]);
    let p = problems_of("docs/README.md", "[gone](configuration.md)\n", &repo);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains("docs/configuration.md"), "{p:?}");
    let p = problems_of("README.md", "[gone]: docs/metrics.md\n", &repo);
    assert_eq!(p.len(), 1, "a reference definition is checked too: {p:?}");
}

#[test]
fn checker_reports_a_missing_anchor() {
    let repo = fake_repo(&[("docs/health.md", "# Health\n\n## The JSON\n")], &[]);
    let p = problems_of("docs/README.md", "[json](health.md#the-body)\n", &repo);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains("#the-body"), "{p:?}");
    let p = problems_of("docs/x.md", "# X\n\n[self](#nowhere)\n", &repo);
    assert_eq!(
        p.len(),
        1,
        "an anchor into the page itself is checked too: {p:?}"
    );
}

#[test]
fn checker_reports_paths_outside_the_repository() {
    let repo = fake_repo(&[], &["CONTRACT.md"]);
    let [up, abs] = forbidden_paths();
    for (page, text) in [
        ("README.md", format!("[contract]({up}/CONTRACT.md)\n")),
        ("README.md", "[up](../CONTRACT.md)\n".to_string()),
        ("k8s/README.md", "[up](../../CONTRACT.md)\n".to_string()),
        ("README.md", "[abs](/CONTRACT.md)\n".to_string()),
        ("README.md", "[file](file:///etc/passwd)\n".to_string()),
        (
            "README.md",
            format!("The contract is in `{abs}/CONTRACT.md`.\n"),
        ),
    ] {
        let p = problems_of(page, &text, &repo);
        assert!(!p.is_empty(), "{page}: {text:?} should be refused");
    }
}

/// The metric names in docs/metrics.md are exactly the ones the filter exports, as the core writes them
/// once (`cb_core::telemetry::Metric::ALL`): none missing, none the filter does not have.
#[test]
fn the_metrics_page_names_exactly_the_metrics_the_filter_exports() {
    let text = std::fs::read_to_string(repo_root().join("docs/metrics.md")).unwrap();
    let exported: BTreeSet<&str> = cb_core::telemetry::Metric::ALL
        .iter()
        .map(|m| m.name())
        .collect();
    let named: BTreeSet<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("circuit_breaker_"))
        // The page shows what a name looks like without the stats tags (labels mangled in, `___`).
        .filter(|w| !w.contains("___"))
        .map(str::to_string)
        .collect();
    let missing: Vec<_> = exported.iter().filter(|m| !named.contains(**m)).collect();
    let unknown: Vec<_> = named
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/metrics.md does not name {missing:?}"
    );
    assert!(
        unknown.is_empty(),
        "docs/metrics.md names metrics the filter does not export: {unknown:?}"
    );
}
