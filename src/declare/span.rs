//! The TOML span locator: from a byte offset to the path of the field written there, and from a
//! field's path to its line and column, so that every [`DeclareError`](super::DeclareError)
//! names the field and where it is written. Works on the text alone (`toml`'s spanned document),
//! whether or not it is a valid state file.

use std::ops::Range;

/// 1-based line and column (in characters) of byte `offset`.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// A key or array item of the document, with where it is written.
struct Node {
    /// `models[0].versions[1].endpoint`.
    path: String,
    /// The key's bytes (none for an array item).
    key: Option<Range<usize>>,
    /// The value's bytes; for an `[[array]]` item, its header (where "missing field" points).
    value: Range<usize>,
}

/// Every key and array item of the document. `None` when the text is not TOML.
fn nodes(text: &str) -> Option<Vec<Node>> {
    use toml::de::{DeTable, DeValue};
    fn table(t: &DeTable<'_>, prefix: &str, out: &mut Vec<Node>) {
        for (k, v) in t.iter() {
            let path = if prefix.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{prefix}.{}", k.get_ref())
            };
            out.push(Node {
                path: path.clone(),
                key: Some(k.span()),
                value: v.span(),
            });
            value(v, &path, out);
        }
    }
    fn value(v: &toml::Spanned<DeValue<'_>>, path: &str, out: &mut Vec<Node>) {
        match v.get_ref() {
            DeValue::Table(t) => table(t, path, out),
            DeValue::Array(a) => {
                for (i, item) in a.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    out.push(Node {
                        path: p.clone(),
                        key: None,
                        value: item.span(),
                    });
                    value(item, &p, out);
                }
            }
            _ => {}
        }
    }
    let doc = DeTable::parse(text).ok()?;
    let mut out = Vec::new();
    table(doc.get_ref(), "", &mut out);
    Some(out)
}

/// How deep `path` is: one level per `.` or `[`.
fn depth(path: &str) -> usize {
    path.matches(['.', '[']).count()
}

/// The path of the key or item whose text covers byte `offset` (where a serde error points), so
/// that the error names the field, not only its line. A key wins over the values around it (an
/// unknown key inside a table's header); otherwise the deepest value or item (a wrong type, or a
/// missing field reported at its table's `[[header]]`).
pub(super) fn path_at(text: &str, offset: usize) -> Option<String> {
    let nodes = nodes(text)?;
    let deepest = |covers: &dyn Fn(&Node) -> bool| {
        nodes
            .iter()
            .filter(|n| covers(n))
            .max_by_key(|n| depth(&n.path))
            .map(|n| n.path.clone())
    };
    deepest(&|n| n.key.as_ref().is_some_and(|k| k.contains(&offset)))
        .or_else(|| deepest(&|n| n.value.contains(&offset)))
}

/// Where `path` (or, when it is not written in the file — a defaulted field — its nearest
/// ancestor) starts.
pub(super) fn position_of_path(text: &str, path: &str) -> Option<(usize, usize)> {
    let nodes = nodes(text)?;
    let mut wanted = path.to_string();
    loop {
        if let Some(n) = nodes.iter().find(|n| n.path == wanted) {
            let at = n.key.as_ref().unwrap_or(&n.value).start;
            return Some(line_column(text, at));
        }
        let cut = wanted.rfind(['.', '['])?;
        wanted.truncate(cut);
    }
}
