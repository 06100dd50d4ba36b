//! Keeps the user guide in `docs/` honest against the code, without a network or a server:
//!
//! - every service and every `rpc` of `proto/modelgate/v1/*.proto` is in `docs/api.md` (a heading
//!   or table row naming `Service/Method`, and a `grpcurl` example calling it), every field of
//!   every request message is named there, and api.md documents no RPC that does not exist;
//! - every long flag of `modelgate serve` (read from `ServeArgs`, not from any document) is in a
//!   table row of `docs/configuration.md` with its environment variable and its default value,
//!   and the settings tables name no flag that does not exist;
//! - every relative link in `docs/*.md` points at a file that exists, and every `#anchor` into a
//!   Markdown page at one of its headings; `docs/README.md` links every page.
//!
//! Every assertion lists everything that is missing, not just the first.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn docs_dir() -> PathBuf {
    root().join("docs")
}

fn doc(name: &str) -> String {
    read(&docs_dir().join(name))
}

/// Every `docs/*.md` page, by file name.
fn doc_pages() -> Vec<PathBuf> {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(docs_dir())
        .expect("docs/ exists")
        .map(|e| e.expect("listing docs/").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    pages.sort();
    pages
}

// ---------------------------------------------------------------------------------------------
// Protos

/// One `rpc` of a service.
struct Rpc {
    name: String,
    request: String,
}

/// What the control API's protos declare.
#[derive(Default)]
struct Protos {
    /// Service → its RPCs, in file order.
    services: BTreeMap<String, Vec<Rpc>>,
    /// Message → its field names (oneof members included; nested messages separately).
    messages: BTreeMap<String, Vec<String>>,
}

/// The text of a line without its `//` comment.
fn code_of(line: &str) -> &str {
    line.split("//").next().unwrap_or("").trim()
}

/// Reads `service`, `rpc` and `message` declarations from proto source. Enough of the grammar
/// for these files: one declaration per line, braces counted per line.
fn parse_proto(src: &str, out: &mut Protos) {
    enum Block {
        Service(String),
        Message(String),
        Other,
    }
    let mut stack: Vec<Block> = Vec::new();
    for raw in src.lines() {
        let line = code_of(raw);
        if line.is_empty() {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let opens = line.matches('{').count();
        let closes = line.matches('}').count();
        match words.first().copied() {
            Some("service") if opens > 0 => {
                let name = words[1].trim_end_matches('{').to_string();
                out.services.entry(name.clone()).or_default();
                stack.push(Block::Service(name));
                continue;
            }
            Some("message") if opens > 0 => {
                let name = words[1].trim_end_matches('{').to_string();
                out.messages.entry(name.clone()).or_default();
                stack.push(Block::Message(name));
                continue;
            }
            Some("rpc") => {
                // rpc Name(stream? Request) returns (stream? Response) {}
                let rest = line.trim_start_matches("rpc").trim();
                let (name, after) = rest.split_once('(').expect("rpc Name(");
                let request = after
                    .split_once(')')
                    .expect("rpc Name(Request)")
                    .0
                    .trim()
                    .trim_start_matches("stream ")
                    .trim()
                    .to_string();
                if let Some(Block::Service(s)) = stack.last() {
                    out.services.get_mut(s).expect("declared").push(Rpc {
                        name: name.trim().to_string(),
                        request,
                    });
                }
                // `{}` or `{ option … }` on the same line: balanced, nothing to push.
                for _ in closes..opens {
                    stack.push(Block::Other);
                }
                continue;
            }
            _ => {}
        }
        // A field: `[repeated|optional] type name = N [options];`, possibly inside a oneof.
        if line.ends_with(';') && line.contains('=') && !line.starts_with("option") {
            let before_eq = line.split('=').next().unwrap_or("");
            if let Some(field) = before_eq.split_whitespace().last() {
                let owner = stack.iter().rev().find_map(|b| match b {
                    Block::Message(m) => Some(m.clone()),
                    _ => None,
                });
                if let Some(m) = owner {
                    out.messages
                        .get_mut(&m)
                        .expect("declared")
                        .push(field.to_string());
                }
            }
        }
        for _ in closes..opens {
            stack.push(Block::Other);
        }
        for _ in opens..closes {
            stack.pop();
        }
    }
}

fn protos() -> Protos {
    let dir = root().join("proto/modelgate/v1");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.expect("listing protos").path())
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .proto files in {}", dir.display());
    let mut out = Protos::default();
    for f in files {
        parse_proto(&read(&f), &mut out);
    }
    out
}

#[test]
fn the_proto_reader_reads_services_rpcs_and_fields() {
    let mut p = Protos::default();
    parse_proto(
        "service S {\n  // a comment with rpc Fake(X)\n  rpc A(AReq) returns (B) {}\n  \
         rpc C(stream CReq) returns (stream D) {}\n}\nmessage AReq {\n  string x = 1; // c\n  \
         map<string, double> m = 2;\n  oneof kind {\n    int64 y = 3;\n  }\n  \
         repeated string z = 4 [deprecated = true];\n}\nmessage CReq {}\n",
        &mut p,
    );
    let rpcs: Vec<(&str, &str)> = p.services["S"]
        .iter()
        .map(|r| (r.name.as_str(), r.request.as_str()))
        .collect();
    assert_eq!(rpcs, [("A", "AReq"), ("C", "CReq")]);
    assert_eq!(p.messages["AReq"], ["x", "m", "y", "z"]);
    assert!(p.messages["CReq"].is_empty());
}

/// Lines of a Markdown document outside fenced code blocks.
fn prose_lines(md: &str) -> Vec<&str> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in md.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push(line);
        }
    }
    out
}

/// The fenced code blocks of a Markdown document.
fn code_blocks(md: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in md.lines() {
        if line.trim_start().starts_with("```") {
            match current.take() {
                Some(b) => blocks.push(b),
                None => current = Some(String::new()),
            }
        } else if let Some(b) = current.as_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    blocks
}

/// lowerCamelCase of a proto field name: the JSON name grpcurl and proto JSON use.
fn json_name(field: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in field.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn every_service_and_rpc_is_in_the_api_reference() {
    let p = protos();
    assert!(
        p.services.len() >= 8,
        "expected the eight modelgate.v1 services, read {:?}",
        p.services.keys().collect::<Vec<_>>()
    );
    let api = doc("api.md");
    let prose = prose_lines(&api);
    let examples: Vec<String> = code_blocks(&api)
        .into_iter()
        .filter(|b| b.contains("grpcurl"))
        .collect();
    let mut missing = Vec::new();
    for (service, rpcs) in &p.services {
        let full = format!("modelgate.v1.{service}");
        if !api.contains(&full) {
            missing.push(format!("service {full} is not named"));
        }
        for rpc in rpcs {
            let name = format!("{service}/{}", rpc.name);
            let listed = prose.iter().any(|l| {
                let t = l.trim_start();
                (t.starts_with('#') || t.starts_with('|')) && t.contains(&name)
            });
            if !listed {
                missing.push(format!("{name}: no heading or table row names it"));
            }
            let example = format!("{full}/{}", rpc.name);
            let has_example = examples.iter().any(|b| b.contains(&example));
            if !has_example {
                missing.push(format!("{name}: no grpcurl example calling {example}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/api.md is missing:\n  {}",
        missing.join("\n  ")
    );

    // And nothing documented as an RPC that the protos do not have.
    let known: BTreeSet<String> = p
        .services
        .iter()
        .flat_map(|(s, rpcs)| rpcs.iter().map(move |r| format!("{s}/{}", r.name)))
        .collect();
    let stale: Vec<&str> = prose
        .iter()
        .filter_map(|l| l.strip_prefix("### "))
        .map(|h| h.trim().trim_matches('`'))
        .filter(|h| h.contains('/') && !known.contains(*h))
        .collect();
    assert!(
        stale.is_empty(),
        "docs/api.md documents RPCs the protos do not declare: {stale:?}"
    );
}

#[test]
fn every_request_field_is_in_the_api_reference() {
    let p = protos();
    let api = doc("api.md");
    let mut missing = BTreeSet::new();
    for (service, rpcs) in &p.services {
        for rpc in rpcs {
            let Some(fields) = p.messages.get(&rpc.request) else {
                missing.insert(format!(
                    "{service}/{}: request message {} not found in the protos",
                    rpc.name, rpc.request
                ));
                continue;
            };
            for f in fields {
                // Named in backticks by its proto name, or by its JSON name.
                let named =
                    api.contains(&format!("`{f}`")) || api.contains(&format!("`{}`", json_name(f)));
                if !named {
                    missing.insert(format!(
                        "{service}/{}: field `{f}` of {}",
                        rpc.name, rpc.request
                    ));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/api.md does not name these request fields:\n  {}",
        missing.into_iter().collect::<Vec<_>>().join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// Settings

/// `modelgate serve`'s settings, from the code: (long flag, argument id, default values).
fn serve_flags() -> Vec<(String, String, Vec<String>)> {
    use clap::CommandFactory;
    /// `ServeArgs` is a flattened `clap::Args`; a parser around it gives the full command.
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        _serve: modelgate::config::ServeArgs,
    }
    Cli::command()
        .get_arguments()
        .filter(|a| a.get_id() != "help")
        .filter_map(|a| {
            let long = a.get_long()?.to_string();
            let defaults = a
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            Some((long, a.get_id().as_str().to_string(), defaults))
        })
        .collect()
}

/// Whether `line` names `--flag` exactly (not `--flag-more`).
fn names_flag(line: &str, flag: &str) -> bool {
    let needle = format!("--{flag}");
    line.match_indices(&needle).any(|(i, _)| {
        let next = line[i + needle.len()..].chars().next();
        !matches!(next, Some(c) if c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

#[test]
fn every_serve_flag_is_in_the_configuration_page_with_its_default() {
    let flags = serve_flags();
    assert!(
        flags.len() >= 30,
        "expected modelgate serve's settings, read {} flags",
        flags.len()
    );
    let page = doc("configuration.md");
    let rows: Vec<&str> = prose_lines(&page)
        .into_iter()
        .filter(|l| l.trim_start().starts_with('|'))
        .collect();
    let mut missing = Vec::new();
    for (long, id, defaults) in &flags {
        let env = format!(
            "{}{}",
            modelgate::config::ENV_PREFIX,
            id.to_ascii_uppercase()
        );
        let candidates: Vec<&&str> = rows.iter().filter(|r| names_flag(r, long)).collect();
        if candidates.is_empty() {
            missing.push(format!("--{long}: no table row names it"));
            continue;
        }
        let row = candidates
            .iter()
            .find(|r| r.contains(&format!("`{env}`")))
            .or_else(|| candidates.first())
            .expect("non-empty");
        if !row.contains(&format!("`{env}`")) {
            missing.push(format!("--{long}: its row does not name `{env}`"));
        }
        for d in defaults {
            if !row.contains(&format!("`{d}`")) {
                missing.push(format!("--{long}: its row does not give the default `{d}`"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/configuration.md is missing (defaults and variables come from ServeArgs):\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn the_settings_tables_name_no_flag_that_does_not_exist() {
    let known: BTreeSet<String> = serve_flags().into_iter().map(|(l, _, _)| l).collect();
    let page = doc("configuration.md");
    // The "## Settings" section: from its heading to the next level-2 heading.
    let start = page
        .find("\n## Settings")
        .expect("docs/configuration.md has a '## Settings' section");
    let rest = &page[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    let section = &rest[..end];
    let mut unknown = BTreeSet::new();
    for line in prose_lines(section) {
        for (i, _) in line.match_indices("`--") {
            let flag: String = line[i + 3..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !flag.is_empty() && !known.contains(&flag) {
                unknown.insert(format!("--{flag}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "docs/configuration.md's settings name flags modelgate serve does not have: {unknown:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Links

/// Link targets of `[text](target)` in a Markdown document, outside code blocks and code spans.
fn links(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in prose_lines(md) {
        // Drop code spans, where `](` is not a link.
        let mut text = String::new();
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 0 {
                text.push_str(part);
            }
        }
        let mut rest = text.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            let target = after[..end].split_whitespace().next().unwrap_or("");
            out.push(target.trim_matches(|c| c == '<' || c == '>').to_string());
            rest = &after[end..];
        }
    }
    out
}

fn is_external(target: &str) -> bool {
    target.is_empty()
        || target.contains("://")
        || target.starts_with("mailto:")
        || target.starts_with('#')
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .chars()
        .filter_map(|c| {
            if c == ' ' {
                Some('-')
            } else if c.is_alphanumeric() || c == '-' || c == '_' {
                Some(c)
            } else {
                None
            }
        })
        .flat_map(char::to_lowercase)
        .collect()
}

/// Every anchor a Markdown page offers (repeated headings get `-1`, `-2`… as on GitHub).
fn anchors(md: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for line in prose_lines(md) {
        let t = line.trim_start();
        if !t.starts_with('#') {
            continue;
        }
        let text = t.trim_start_matches('#');
        if !text.starts_with(' ') {
            continue;
        }
        let s = slug(text);
        let n = seen.entry(s.clone()).or_insert(0);
        out.insert(if *n == 0 {
            s.clone()
        } else {
            format!("{s}-{n}")
        });
        *n += 1;
    }
    out
}

#[test]
fn the_link_and_anchor_readers_work() {
    let md = "See [a](a.md), [b](../b.md#x \"t\") and [c](https://c).\n`[no](code.md)`\n\
              ```\n[no](fenced.md)\n```\n";
    assert_eq!(links(md), ["a.md", "../b.md#x", "https://c"]);
    assert_eq!(slug(" A/B experiments"), "ab-experiments");
    assert_eq!(
        slug(" `--record-predictions false`"),
        "--record-predictions-false"
    );
    let a = anchors("# T\n## Results\n### Results\n```\n# not a heading\n```\n");
    assert_eq!(
        a.into_iter().collect::<Vec<_>>(),
        ["results", "results-1", "t"]
    );
}

#[test]
fn every_relative_link_in_the_docs_points_at_a_file_that_exists() {
    let mut broken = Vec::new();
    for page in doc_pages() {
        let md = read(&page);
        let name = page.file_name().unwrap().to_string_lossy().into_owned();
        for target in links(&md) {
            if is_external(&target) {
                continue;
            }
            let file = target.split('#').next().unwrap_or("");
            let path = docs_dir().join(file);
            if !path.exists() {
                broken.push(format!(
                    "docs/{name}: ({target}) → {} does not exist",
                    path.display()
                ));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "broken links in docs/:\n  {}",
        broken.join("\n  ")
    );
}

#[test]
fn every_anchor_in_the_docs_points_at_a_heading() {
    let mut broken = Vec::new();
    for page in doc_pages() {
        let md = read(&page);
        let name = page.file_name().unwrap().to_string_lossy().into_owned();
        for target in links(&md) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let Some((file, anchor)) = target.split_once('#') else {
                continue;
            };
            let path = if file.is_empty() {
                page.clone()
            } else {
                docs_dir().join(file)
            };
            // Missing files are the other test's; anchors are checked in Markdown pages only.
            if path.extension().is_none_or(|x| x != "md") || !path.exists() {
                continue;
            }
            if !anchors(&read(&path)).contains(anchor) {
                broken.push(format!(
                    "docs/{name}: ({target}) → no heading '#{anchor}' in {}",
                    path.display()
                ));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "links to missing headings in docs/:\n  {}",
        broken.join("\n  ")
    );
}

#[test]
fn the_docs_index_links_every_page() {
    let index = doc("README.md");
    let linked: BTreeSet<String> = links(&index)
        .into_iter()
        .map(|t| t.split('#').next().unwrap_or("").to_string())
        .collect();
    let mut expected: BTreeSet<String> = doc_pages()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| n != "README.md")
        .collect();
    // Pages others write: the index must list them even before they exist.
    for page in ["observability.md", "deployment.md", "declarative-state.md"] {
        expected.insert(page.to_string());
    }
    let unlisted: Vec<&String> = expected.iter().filter(|p| !linked.contains(*p)).collect();
    assert!(
        unlisted.is_empty(),
        "docs/README.md does not link these pages: {unlisted:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// TLS to model servers

/// Sentences of a Markdown document's prose: paragraphs and list items joined across lines, each
/// table row on its own, split at full stops.
fn sentences(md: &str) -> Vec<String> {
    let mut blocks: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in prose_lines(md) {
        let line = line.trim();
        let starts_block = line.is_empty()
            || line.starts_with('|')
            || line.starts_with('#')
            || line.starts_with("- ")
            || line
                .split_once(". ")
                .is_some_and(|(n, _)| n.parse::<u32>().is_ok());
        if starts_block && !current.is_empty() {
            blocks.push(std::mem::take(&mut current));
        }
        if line.starts_with('|') {
            blocks.push(line.to_string());
        } else if !line.is_empty() {
            current.push_str(line);
            current.push(' ');
        }
    }
    blocks.push(current);
    blocks
        .iter()
        .flat_map(|b| b.split(". ").map(str::to_string).collect::<Vec<_>>())
        .filter(|s| !s.trim().is_empty())
        .collect()
}

/// modelgate speaks TLS to `https://` model servers: no page of the user guide, the README or a
/// proto comment may say such endpoints are refused, unsupported or not implemented (webhooks,
/// which really are plain HTTP only, aside), and the two tables of what an endpoint may be name
/// `https://host:port`.
#[test]
fn the_docs_say_https_upstreams_are_spoken_to_over_tls() {
    assert_eq!(
        modelgate::registry::normalize_endpoint("https://models.internal:8443/").unwrap(),
        "https://models.internal:8443",
        "the registry takes https:// endpoints"
    );
    let mut pages: Vec<(String, String)> = doc_pages()
        .iter()
        .map(|p| {
            let name = format!("docs/{}", p.file_name().unwrap().to_string_lossy());
            (name, read(p))
        })
        .collect();
    pages.push(("README.md".into(), read(&root().join("README.md"))));
    let proto_dir = root().join("proto/modelgate/v1");
    for entry in std::fs::read_dir(&proto_dir).unwrap() {
        let path = entry.unwrap().path();
        let comments: String = read(&path)
            .lines()
            .filter_map(|l| l.split_once("//").map(|(_, c)| c.trim().to_string()))
            .collect::<Vec<_>>()
            .join("\n");
        let name = format!(
            "proto/modelgate/v1/{}",
            path.file_name().unwrap().to_string_lossy()
        );
        pages.push((name, comments));
    }
    let mut wrong = Vec::new();
    for (name, text) in &pages {
        for s in sentences(text) {
            let lower = s.to_lowercase();
            let about_upstream_tls = (s.contains("https://") || s.contains("TLS"))
                && ["upstream", "model server", "endpoint", "any port"]
                    .iter()
                    .any(|w| lower.contains(w))
                && !lower.contains("webhook");
            let denies = [
                "refused",
                "not supported",
                "not implemented",
                "no tls",
                "cleartext only",
            ]
            .iter()
            .any(|w| lower.contains(w));
            if about_upstream_tls && denies {
                wrong.push(format!("{name}: {}", s.trim()));
            }
        }
    }
    for (page, row_start) in [
        ("api.md", "| `endpoint` |"),
        ("declarative-state.md", "| `endpoint` |"),
    ] {
        let md = doc(page);
        let row = md
            .lines()
            .find(|l| l.starts_with(row_start))
            .unwrap_or_else(|| panic!("docs/{page} has no {row_start} row"));
        if !row.contains("https://host:port") {
            wrong.push(format!(
                "docs/{page}: the endpoint row does not name https://host:port: {row}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "the docs contradict TLS to https:// model servers:\n  {}",
        wrong.join("\n  ")
    );
}
