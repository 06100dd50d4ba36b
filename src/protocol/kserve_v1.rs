//! KServe v1 / TF Serving REST (`POST /v1/models/{m}:predict`): its bodies to and from OIP REST
//! JSON, which `oip_rest` turns into OIP gRPC. Pure translation, no HTTP.
//!
//! Request forms: `{"instances": [...]}` (row form: one element per row — a number, a nested list,
//! or an object naming each input) and `{"inputs": ...}` (columnar form: a list, like instances, or
//! an object of named inputs each holding all rows). A list feeds the model's first input, named
//! and typed by its metadata. Answer: `{"predictions": [...]}`, one element per row — the single
//! output's row, or an object of every output's row.

use serde_json::{json, Map, Value};

use super::oip_rest::BadRequest;

fn bad(msg: impl Into<String>) -> BadRequest {
    BadRequest(msg.into())
}

/// The dimensions of a nested JSON list (from its first elements).
fn dims(v: &Value) -> Vec<i64> {
    let mut out = Vec::new();
    let mut cur = v;
    while let Value::Array(a) = cur {
        out.push(a.len() as i64);
        match a.first() {
            Some(x) => cur = x,
            None => break,
        }
    }
    out
}

fn datatype_of(v: &Value, default: &str) -> String {
    let mut cur = v;
    while let Value::Array(a) = cur {
        match a.first() {
            Some(x) => cur = x,
            None => return default.to_string(),
        }
    }
    match cur {
        Value::String(_) => "BYTES".into(),
        Value::Bool(_) => "BOOL".into(),
        _ => default.to_string(),
    }
}

fn tensor(name: &str, data: Value, datatype: &str) -> Value {
    json!({"name": name, "shape": dims(&data), "datatype": datatype_of(&data, datatype), "data": data})
}

/// An OIP REST infer body for a v1 predict `body`; `first` is the model's first input (name and
/// datatype), which a list of rows feeds.
pub fn predict_to_v2(body: &[u8], first: (&str, &str)) -> Result<Value, BadRequest> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("the body must be a JSON object"))?;
    let (name, datatype) = first;
    let inputs: Vec<Value> = match (obj.get("instances"), obj.get("inputs")) {
        (Some(_), Some(_)) => return Err(bad("give 'instances' or 'inputs', not both")),
        (Some(Value::Array(rows)), None) => {
            if rows.is_empty() {
                return Err(bad("'instances' is empty"));
            }
            if rows.iter().all(Value::is_object) {
                // One object per row naming each input: gathered into one tensor per input.
                let mut by_input: Map<String, Value> = Map::new();
                for (i, r) in rows.iter().enumerate() {
                    for (k, x) in r.as_object().expect("checked") {
                        let col = by_input.entry(k.clone()).or_insert_with(|| json!([]));
                        let col = col.as_array_mut().expect("an array");
                        if col.len() != i {
                            return Err(bad(format!(
                                "'instances[{i}]' does not name the same inputs as the rows before"
                            )));
                        }
                        col.push(x.clone());
                    }
                }
                by_input
                    .into_iter()
                    .map(|(k, data)| tensor(&k, data, datatype))
                    .collect()
            } else if rows.iter().any(Value::is_object) {
                return Err(bad("'instances' mixes objects and values"));
            } else {
                vec![tensor(name, Value::Array(rows.clone()), datatype)]
            }
        }
        (Some(_), None) => return Err(bad("'instances' must be a list of rows")),
        (None, Some(Value::Object(cols))) => cols
            .iter()
            .map(|(k, data)| tensor(k, data.clone(), datatype))
            .collect(),
        (None, Some(data @ Value::Array(_))) => vec![tensor(name, data.clone(), datatype)],
        (None, Some(_)) => return Err(bad("'inputs' must be a list or an object of inputs")),
        (None, None) => return Err(bad("the body needs 'instances' or 'inputs'")),
    };
    Ok(json!({ "inputs": inputs }))
}

/// Splits an OIP REST output tensor into its rows (the first dimension).
fn rows_of(t: &Value) -> Vec<Value> {
    let data = t["data"].as_array().cloned().unwrap_or_default();
    let shape: Vec<usize> = t["shape"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter_map(Value::as_u64)
                .map(|d| d as usize)
                .collect()
        })
        .unwrap_or_default();
    if shape.len() <= 1 {
        return data;
    }
    let per_row: usize = shape[1..].iter().product::<usize>().max(1);
    data.chunks(per_row)
        .map(|c| Value::Array(c.to_vec()))
        .collect()
}

/// The v1 answer for an OIP REST infer answer: `{"predictions": [...]}`.
pub fn v2_to_predictions(answer: &Value) -> Value {
    let outputs = answer["outputs"].as_array().cloned().unwrap_or_default();
    let predictions: Vec<Value> = match outputs.as_slice() {
        [one] => rows_of(one),
        many => {
            let columns: Vec<(String, Vec<Value>)> = many
                .iter()
                .map(|t| (t["name"].as_str().unwrap_or("").to_string(), rows_of(t)))
                .collect();
            let n = columns.iter().map(|c| c.1.len()).max().unwrap_or(0);
            (0..n)
                .map(|i| {
                    Value::Object(
                        columns
                            .iter()
                            .map(|(k, rows)| {
                                (k.clone(), rows.get(i).cloned().unwrap_or(Value::Null))
                            })
                            .collect(),
                    )
                })
                .collect()
        }
    };
    json!({ "predictions": predictions })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_and_columnar_forms_become_oip_tensors() {
        let v = predict_to_v2(
            br#"{"instances": [[1, 2, 3], [4, 5, 6]]}"#,
            ("input", "FP32"),
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"inputs": [{"name": "input", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [4, 5, 6]]}]})
        );
        let v = predict_to_v2(
            br#"{"instances": [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]}"#,
            ("input", "FP32"),
        )
        .unwrap();
        assert_eq!(
            v["inputs"][0],
            json!({"name": "a", "shape": [2], "datatype": "FP32", "data": [1, 2]})
        );
        assert_eq!(v["inputs"][1]["datatype"], "BYTES");
        let v = predict_to_v2(br#"{"inputs": {"a": [[1], [2]]}}"#, ("input", "FP64")).unwrap();
        assert_eq!(v["inputs"][0]["shape"], json!([2, 1]));
        assert_eq!(v["inputs"][0]["datatype"], "FP64");
        let e = |b: &str| {
            predict_to_v2(b.as_bytes(), ("input", "FP32"))
                .unwrap_err()
                .0
        };
        assert!(e(r#"{"instances": 3}"#).contains("'instances'"));
        assert!(e(r#"{}"#).contains("'instances' or 'inputs'"));
        assert!(e(r#"{"instances": [{"a": 1}, {"b": 2}]}"#).contains("instances[1]"));
    }

    #[test]
    fn answers_become_predictions_by_row() {
        let one = json!({"outputs": [{"name": "p", "shape": [2, 2], "datatype": "FP32", "data": [0.1, 0.9, 0.8, 0.2]}]});
        assert_eq!(
            v2_to_predictions(&one),
            json!({"predictions": [[0.1, 0.9], [0.8, 0.2]]})
        );
        let two = json!({"outputs": [
            {"name": "p", "shape": [2, 1], "datatype": "FP32", "data": [0.1, 0.8]},
            {"name": "label", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]});
        assert_eq!(
            v2_to_predictions(&two),
            json!({"predictions": [{"p": [0.1], "label": "a"}, {"p": [0.8], "label": "b"}]})
        );
    }
}
