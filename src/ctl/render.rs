//! How `modelgate ctl` shows answers: proto JSON as is (`--output json`), or for people, scalar
//! fields as `key: value` lines and lists of messages as tables.

use comfy_table::{presets::NOTHING, ContentArrangement, Table};
use prost::{Message, Name};
use serde_json::{Map, Value};

use super::client::json;
use crate::spec;

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Human-readable: key/value lines and tables.
    Table,
    /// Proto JSON (lowerCamelCase names, defaults included), one document per answer.
    Json,
}

/// Enum values lose their type prefix for people: `STAGE_PRODUCTION` → `production`.
const ENUM_PREFIXES: [&str; 3] = ["STAGE_", "EXPERIMENT_STATE_", "FEATURE_TYPE_"];

/// A cell: strings bare, enum names shortened, numbers trimmed, nested values as compact JSON.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => ENUM_PREFIXES
            .iter()
            .find_map(|p| s.strip_prefix(p))
            .map(|rest| {
                if rest == "UNSPECIFIED" {
                    "none".to_string()
                } else {
                    rest.to_lowercase()
                }
            })
            .unwrap_or_else(|| s.clone()),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => {
                let s = format!("{f:.6}");
                s.trim_end_matches('0').trim_end_matches('.').to_string()
            }
            _ => n.to_string(),
        },
        Value::Bool(b) => b.to_string(),
        Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => {
            a.iter().map(cell).collect::<Vec<_>>().join(", ")
        }
        Value::Object(o) if o.values().all(|x| !x.is_object() && !x.is_array()) => {
            spec::format_pairs(o.iter().map(|(k, x)| (k, cell(x))))
        }
        other => other.to_string(),
    }
}

/// A table of `rows` (objects), like `kubectl get`: `columns` picks and orders them (empty: every
/// key that has a value in some row, in order of first appearance).
pub fn table(rows: &[Value], columns: &[&str]) -> String {
    let mut keys: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
    if keys.is_empty() {
        for r in rows {
            if let Some(o) = r.as_object() {
                for k in o.keys() {
                    if !keys.contains(k) {
                        keys.push(k.clone());
                    }
                }
            }
        }
        keys.retain(|k| {
            rows.iter()
                .any(|r| r.get(k).is_some_and(|v| !cell(v).is_empty()))
        });
    }
    let mut t = Table::new();
    t.load_preset(NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(keys.iter().map(|k| k.as_str()));
    for r in rows {
        t.add_row(
            keys.iter()
                .map(|k| r.get(k).map(cell).unwrap_or_default())
                .collect::<Vec<_>>(),
        );
    }
    t.to_string()
}

/// A whole answer for people: scalar fields (nested messages flattened as `a.b`) as aligned
/// `key: value` lines, then each list of messages as a titled table.
pub fn human(v: &Value) -> String {
    let Some(obj) = v.as_object() else {
        return cell(v);
    };
    let mut lines = Vec::new();
    let mut tables = Vec::new();
    flatten("", obj, &mut lines, &mut tables);
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in &lines {
        out.push_str(&format!("{k:width$}  {v}\n"));
    }
    for (title, rows) in tables {
        if !out.is_empty() {
            out.push('\n');
        }
        if rows.is_empty() {
            out.push_str(&format!("{title}: none\n"));
        } else {
            out.push_str(&format!("{title}:\n{}\n", table(&rows, &[])));
        }
    }
    out
}

fn flatten(
    prefix: &str,
    obj: &Map<String, Value>,
    lines: &mut Vec<(String, String)>,
    tables: &mut Vec<(String, Vec<Value>)>,
) {
    for (k, v) in obj {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Array(a) if a.iter().any(Value::is_object) => tables.push((key, a.clone())),
            Value::Object(o) if o.values().any(|x| x.is_object() || x.is_array()) => {
                flatten(&key, o, lines, tables)
            }
            // Unset fields say nothing to a reader (`--output json` shows them).
            _ if cell(v).is_empty() => {}
            _ => lines.push((key, cell(v))),
        }
    }
}

/// The value inside a proto `oneof` wrapper such as `FeatureValue` (`{"number": 6.1}`) or
/// `PredictionValue` (`{"label": "1"}`): people want the 6.1, not the JSON around it.
fn unwrap_oneof(v: &Value) -> Value {
    match v.as_object() {
        Some(o) if o.len() == 1 => o.values().next().cloned().unwrap_or_default(),
        Some(o) if o.is_empty() => Value::Null,
        _ => v.clone(),
    }
}

/// A `PredictionRecord` with its predictions as plain values (`1`, not `{"label":"1"}`), for the
/// rows of `predictions list`.
pub fn plain_predictions(record: &mut Value) {
    if let Some(p) = record.get_mut("predictions").and_then(Value::as_array_mut) {
        for v in p.iter_mut() {
            *v = unwrap_oneof(v);
        }
    }
}

fn take_array(obj: &mut Map<String, Value>, key: &str) -> Vec<Value> {
    match obj.remove(key) {
        Some(Value::Array(a)) => a,
        _ => Vec::new(),
    }
}

/// A `PredictionRecord` for people: its fields as `key: value` lines, then a table with one line
/// per row of the request: each feature's value under the feature's name, then the prediction
/// (and the feature-store entity, when there is one); then the outcomes.
pub fn prediction_record(record: &Value) -> String {
    let mut rest = record.clone();
    let Some(obj) = rest.as_object_mut() else {
        return human(record);
    };
    let names: Vec<String> = take_array(obj, "featureNames").iter().map(cell).collect();
    let rows = take_array(obj, "rows");
    let predictions = take_array(obj, "predictions");
    let entities = take_array(obj, "entityIds");
    let outcomes = obj.remove("outcomes");
    let mut out = human(&rest);
    let lines = rows.len().max(predictions.len());
    if lines > 0 {
        let values = |i: usize| -> Vec<Value> {
            rows.get(i)
                .and_then(|r| r.get("values"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let width = (0..lines).map(|i| values(i).len()).max().unwrap_or(0);
        let with_entity = entities.iter().any(|e| !cell(e).is_empty());
        let mut header = vec!["row".to_string()];
        // A feature without a name (more values than names) is shown by its position.
        header.extend(
            (0..width.max(names.len()))
                .map(|j| names.get(j).cloned().unwrap_or_else(|| format!("[{j}]"))),
        );
        header.push("prediction".into());
        if with_entity {
            header.push("entity".into());
        }
        let mut t = Table::new();
        t.load_preset(NOTHING)
            .set_content_arrangement(ContentArrangement::Disabled)
            .set_header(header.clone());
        for i in 0..lines {
            let vals = values(i);
            let mut line = vec![i.to_string()];
            line.extend((0..header.len() - 2 - usize::from(with_entity)).map(|j| {
                vals.get(j)
                    .map(|v| cell(&unwrap_oneof(v)))
                    .unwrap_or_default()
            }));
            line.push(
                predictions
                    .get(i)
                    .map(|p| cell(&unwrap_oneof(p)))
                    .unwrap_or_default(),
            );
            if with_entity {
                line.push(entities.get(i).map(cell).unwrap_or_default());
            }
            t.add_row(line);
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&format!("rows:\n{t}\n"));
    }
    if let Some(outcomes) = outcomes.filter(|o| o.as_array().is_some_and(|a| !a.is_empty())) {
        out.push('\n');
        out.push_str(&human(&serde_json::json!({ "outcomes": outcomes })));
    }
    out
}

/// Prints a typed answer in the chosen format.
pub fn whole<M: Message + Name>(answer: &M, output: Output) {
    print(&json(answer), output);
}

/// Prints an answer that is a list: in table mode its `rows` under `columns` (`no {what}` when
/// there are none), as JSON the whole answer.
pub fn list<M: Message + Name>(
    answer: &M,
    rows: Vec<Value>,
    what: &str,
    columns: &[&str],
    output: Output,
) {
    match output {
        Output::Json => whole(answer, output),
        Output::Table if rows.is_empty() => println!("no {what}"),
        Output::Table => println!("{}", table(&rows, columns)),
    }
}

/// The rows of a list answer, as proto JSON.
pub fn rows<R: Message + Name>(items: &[R]) -> Vec<Value> {
    items.iter().map(json).collect()
}

/// Prints an answer in the chosen format.
pub fn print(v: &Value, output: Output) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(v).expect("JSON values print")
        ),
        Output::Table => print!("{}", human(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cells_read_like_people_write() {
        assert_eq!(cell(&json!("STAGE_PRODUCTION")), "production");
        assert_eq!(cell(&json!("STAGE_UNSPECIFIED")), "none");
        assert_eq!(cell(&json!(0.25)), "0.25");
        assert_eq!(cell(&json!(3)), "3");
        assert_eq!(cell(&json!(["a", "b"])), "a, b");
        assert_eq!(cell(&json!({"team": "risk"})), "team=risk");
    }

    #[test]
    fn a_prediction_shows_feature_names_beside_values() {
        let record = json!({
            "requestId": "r1",
            "model": "iris",
            "version": 1,
            "featureNames": ["sepal_length", "sepal_width", "colour"],
            "rows": [
                {"values": [{"number": 6.099999904632568}, {"number": 2.8}, {"text": "red"}]},
                {"values": [{"number": 5.0}, {}, {"text": "blue"}]}
            ],
            "predictions": [{"label": "1"}, {"value": 0.25}],
            "entityIds": [],
            "outcomes": []
        });
        let s = prediction_record(&record);
        assert!(s.contains("requestId  r1"), "{s}");
        assert!(!s.contains('{'), "no raw JSON: {s}");
        let table: Vec<Vec<&str>> = s
            .lines()
            .skip_while(|l| *l != "rows:")
            .skip(1)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            table[0],
            ["row", "sepal_length", "sepal_width", "colour", "prediction"],
            "{s}"
        );
        assert_eq!(table[1], ["0", "6.1", "2.8", "red", "1"], "{s}");
        assert_eq!(table[2], ["1", "5", "blue", "0.25"], "{s}");
        let mut listed = record.clone();
        plain_predictions(&mut listed);
        assert_eq!(cell(&listed["predictions"]), "1, 0.25");
    }

    #[test]
    fn answers_become_lines_and_tables() {
        let v = json!({
            "model": "iris",
            "significance": {"test": "chi2", "pValue": 0.01},
            "variants": [{"name": "a", "requests": 3}, {"name": "b", "requests": 4}]
        });
        let s = human(&v);
        assert!(s.contains("model"), "{s}");
        assert!(s.contains("significance  pValue=0.01, test=chi2"), "{s}");
        assert!(s.contains("variants:"), "{s}");
        let rows: Vec<&str> = s.lines().skip_while(|l| *l != "variants:").collect();
        assert_eq!(
            rows[1].split_whitespace().collect::<Vec<_>>(),
            ["name", "requests"]
        );
        assert_eq!(rows[3].split_whitespace().collect::<Vec<_>>(), ["b", "4"]);
        // Columns without a value anywhere are left out.
        let t = table(&[json!({"a": "x", "b": ""})], &[]);
        assert_eq!(t.split_whitespace().collect::<Vec<_>>(), ["a", "x"]);
    }
}
