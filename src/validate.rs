//! Lenient, FastAPI-shaped input validation.
//!
//! DB-GPT's servers are FastAPI apps whose inputs are pydantic v2 models in "lax" mode: a
//! port may arrive as `"8001"`, a bool as `"True"` or `1`, and every problem is reported as
//! `422 {"detail":[{"type","loc","msg","input"},…]}` naming the field. Python clients and
//! scripts rely on both behaviours, so this module reproduces them for JSON bodies and for
//! query strings alike (a query string is read as a JSON object whose values are strings).
//! A [`Fields`] reader collects *all* errors of one input before failing, as pydantic does.

use serde_json::{Map, Value, json};

/// One pydantic-style error entry.
pub fn error_entry(kind: &str, loc: &[&str], msg: &str, input: &Value) -> Value {
    json!({ "type": kind, "loc": loc, "msg": msg, "input": input })
}

/// Validation failure: the list of pydantic-style error entries.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationErrors(pub Vec<Value>);

impl std::fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|e| {
                let loc: Vec<String> = e["loc"]
                    .as_array()
                    .map(|l| {
                        l.iter()
                            .map(|p| match p {
                                Value::String(s) => s.clone(),
                                other => other.to_string(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                format!("{}: {}", loc.join("."), e["msg"].as_str().unwrap_or(""))
            })
            .collect();
        write!(f, "{}", parts.join("; "))
    }
}

impl std::error::Error for ValidationErrors {}

/// Parses a request body as a JSON object, with FastAPI's error for malformed JSON.
pub fn parse_json_object(body: &[u8], class_name: &str) -> Result<Value, ValidationErrors> {
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return Err(ValidationErrors(vec![json!({
                "type": "json_invalid",
                "loc": ["body", e.column()],
                "msg": "JSON decode error",
                "input": {},
                "ctx": { "error": e.to_string() },
            })]));
        }
    };
    if !value.is_object() {
        return Err(ValidationErrors(vec![json!({
            "type": "dataclass_type",
            "loc": ["body"],
            "msg": format!("Input should be a dictionary or an instance of {class_name}"),
            "input": value,
            "ctx": { "class_name": class_name },
        })]));
    }
    Ok(value)
}

/// Turns a raw query string into a JSON object of string values (last value wins).
pub fn query_object(raw: Option<&str>) -> Value {
    let mut map = Map::new();
    if let Some(raw) = raw {
        for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
            map.insert(k.into_owned(), Value::String(v.into_owned()));
        }
    }
    Value::Object(map)
}

/// Reads typed fields out of one JSON object, collecting pydantic-style errors.
pub struct Fields<'a> {
    origin: &'static str,
    obj: &'a Map<String, Value>,
    whole: &'a Value,
    errors: Vec<Value>,
}

impl<'a> Fields<'a> {
    /// `origin` is the first `loc` element: `"body"` or `"query"`. `value` must be an object.
    pub fn new(origin: &'static str, value: &'a Value) -> Self {
        static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
        let obj = value
            .as_object()
            .unwrap_or_else(|| EMPTY.get_or_init(Map::new));
        Fields {
            origin,
            obj,
            whole: value,
            errors: Vec::new(),
        }
    }

    fn push(&mut self, kind: &str, name: &str, msg: &str, input: &Value) {
        self.errors
            .push(error_entry(kind, &[self.origin, name], msg, input));
    }

    /// Records an error found by the caller (e.g. a range check) against field `name`.
    pub fn invalid(&mut self, kind: &str, name: &str, msg: &str) {
        let input = self.obj.get(name).cloned().unwrap_or(Value::Null);
        self.push(kind, name, msg, &input);
    }

    fn missing(&mut self, name: &str) {
        let whole = self.whole.clone();
        self.push("missing", name, "Field required", &whole);
    }

    /// Records pydantic's `string_too_long` against field `name` when `value` has more than
    /// `max` characters (characters, as pydantic's `max_length` and SQL `varchar(n)` count).
    pub fn max_chars(&mut self, name: &str, value: &str, max: usize) {
        if value.chars().nth(max).is_none() {
            return;
        }
        let input = self.obj.get(name).cloned().unwrap_or(Value::Null);
        self.errors.push(json!({
            "type": "string_too_long",
            "loc": [self.origin, name],
            "msg": format!("String should have at most {max} characters"),
            "input": input,
            "ctx": { "max_length": max },
        }));
    }

    /// The raw value of a field, `None` when absent.
    pub fn raw(&self, name: &str) -> Option<&'a Value> {
        self.obj.get(name)
    }

    /// A value that is present and not JSON `null`.
    fn present(&self, name: &str) -> Option<&'a Value> {
        self.obj.get(name).filter(|v| !v.is_null())
    }

    // ---- strings ----

    fn as_str(&mut self, name: &str, v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            other => {
                self.push("string_type", name, "Input should be a valid string", other);
                None
            }
        }
    }

    /// A required string. `null` is a type error, absence is `missing`.
    pub fn req_str(&mut self, name: &str) -> String {
        match self.obj.get(name) {
            None => {
                self.missing(name);
                String::new()
            }
            Some(v) => self.as_str(name, v).unwrap_or_default(),
        }
    }

    /// An optional, nullable string.
    pub fn opt_str(&mut self, name: &str) -> Option<String> {
        let v = self.present(name)?;
        self.as_str(name, v)
    }

    // ---- integers ----

    fn as_int(&mut self, name: &str, v: &Value) -> Option<i64> {
        match v {
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Some(i)
                } else if let Some(f) = n.as_f64() {
                    if f.fract() == 0.0 && f.abs() < 9.0e15 {
                        Some(f as i64)
                    } else {
                        self.push(
                            "int_from_float",
                            name,
                            "Input should be a valid integer, got a number with a fractional part",
                            v,
                        );
                        None
                    }
                } else {
                    self.push("int_type", name, "Input should be a valid integer", v);
                    None
                }
            }
            Value::String(s) => match s.trim().parse::<i64>() {
                Ok(i) => Some(i),
                Err(_) => {
                    self.push(
                        "int_parsing",
                        name,
                        "Input should be a valid integer, unable to parse string as an integer",
                        v,
                    );
                    None
                }
            },
            Value::Bool(b) => Some(*b as i64),
            other => {
                self.push("int_type", name, "Input should be a valid integer", other);
                None
            }
        }
    }

    /// A required integer within `[min, max]`.
    pub fn req_int(&mut self, name: &str, min: i64, max: i64) -> i64 {
        match self.obj.get(name) {
            None => {
                self.missing(name);
                0
            }
            Some(v) => self.ranged(name, v, min, max).unwrap_or(0),
        }
    }

    /// An optional, nullable integer within `[min, max]`.
    pub fn opt_int(&mut self, name: &str, min: i64, max: i64) -> Option<i64> {
        let v = self.present(name)?;
        self.ranged(name, v, min, max)
    }

    fn ranged(&mut self, name: &str, v: &Value, min: i64, max: i64) -> Option<i64> {
        let i = self.as_int(name, v)?;
        if i < min {
            self.push(
                "greater_than_equal",
                name,
                &format!("Input should be greater than or equal to {min}"),
                v,
            );
            None
        } else if i > max {
            self.push(
                "less_than_equal",
                name,
                &format!("Input should be less than or equal to {max}"),
                v,
            );
            None
        } else {
            Some(i)
        }
    }

    // ---- floats ----

    fn as_float(&mut self, name: &str, v: &Value) -> Option<f64> {
        let f = match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => match s.trim().parse::<f64>() {
                Ok(f) => Some(f),
                Err(_) => {
                    self.push(
                        "float_parsing",
                        name,
                        "Input should be a valid number, unable to parse string as a number",
                        v,
                    );
                    return None;
                }
            },
            Value::Bool(b) => Some(*b as i64 as f64),
            _ => None,
        };
        match f {
            Some(f) if f.is_finite() => Some(f),
            Some(_) => {
                self.push("finite_number", name, "Input should be a finite number", v);
                None
            }
            None => {
                self.push("float_type", name, "Input should be a valid number", v);
                None
            }
        }
    }

    /// An optional, nullable float.
    pub fn opt_float(&mut self, name: &str) -> Option<f64> {
        let v = self.present(name)?;
        self.as_float(name, v)
    }

    // ---- booleans ----

    fn as_bool(&mut self, name: &str, v: &Value) -> Option<bool> {
        match v {
            Value::Bool(b) => Some(*b),
            Value::Number(n) if n.as_i64() == Some(0) => Some(false),
            Value::Number(n) if n.as_i64() == Some(1) => Some(true),
            Value::String(s) => match parse_lenient_bool(s) {
                Some(b) => Some(b),
                None => {
                    self.push(
                        "bool_parsing",
                        name,
                        "Input should be a valid boolean, unable to interpret input",
                        v,
                    );
                    None
                }
            },
            other => {
                self.push("bool_type", name, "Input should be a valid boolean", other);
                None
            }
        }
    }

    /// An optional, nullable bool.
    pub fn opt_bool(&mut self, name: &str) -> Option<bool> {
        let v = self.present(name)?;
        self.as_bool(name, v)
    }

    /// A bool with a default (absent → default; explicit `null` is a type error, as pydantic
    /// does for non-Optional fields).
    pub fn bool_or(&mut self, name: &str, default: bool) -> bool {
        match self.obj.get(name) {
            None => default,
            Some(v) => self.as_bool(name, v).unwrap_or(default),
        }
    }

    /// Whether any error was recorded so far.
    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// Ends reading: `Err` with every error collected, if any.
    pub fn finish(self) -> Result<(), ValidationErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(self.errors))
        }
    }
}

/// pydantic v2's lax bool parsing of strings (case-insensitive).
pub fn parse_lenient_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "t" | "yes" | "y" | "on" => Some(true),
        "0" | "false" | "f" | "no" | "n" | "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_bools_match_pydantic() {
        for s in ["1", "true", "True", "TRUE", "t", "yes", "Y", "on", "On"] {
            assert_eq!(parse_lenient_bool(s), Some(true), "{s}");
        }
        for s in ["0", "false", "False", "f", "no", "n", "off", "OFF"] {
            assert_eq!(parse_lenient_bool(s), Some(false), "{s}");
        }
        for s in ["", "2", "maybe", "truee"] {
            assert_eq!(parse_lenient_bool(s), None, "{s}");
        }
    }

    #[test]
    fn collects_every_error_with_field_locations() {
        let v = json!({"host": 5, "port": "abc", "weight": "x"});
        let mut f = Fields::new("body", &v);
        f.req_str("model_name");
        f.req_str("host");
        f.req_int("port", 0, 65535);
        f.opt_float("weight");
        let errs = f.finish().unwrap_err().0;
        let kinds: Vec<_> = errs.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            ["missing", "string_type", "int_parsing", "float_parsing"]
        );
        assert_eq!(errs[0]["loc"], json!(["body", "model_name"]));
        assert_eq!(errs[0]["msg"], "Field required");
        assert_eq!(errs[2]["input"], "abc");
    }

    #[test]
    fn coerces_like_lax_mode() {
        let v = json!({"port": " 8001 ", "w": "2.5", "b": "yes", "i": 3.0, "n": null});
        let mut f = Fields::new("body", &v);
        assert_eq!(f.req_int("port", 0, 65535), 8001);
        assert_eq!(f.opt_float("w"), Some(2.5));
        assert_eq!(f.opt_bool("b"), Some(true));
        assert_eq!(f.opt_int("i", 0, 10), Some(3));
        assert_eq!(f.opt_str("n"), None);
        assert!(f.finish().is_ok());
    }

    #[test]
    fn range_and_fraction_errors() {
        let v = json!({"port": 70000, "i": 1.5});
        let mut f = Fields::new("query", &v);
        f.req_int("port", 0, 65535);
        f.opt_int("i", 0, 10);
        let errs = f.finish().unwrap_err().0;
        assert_eq!(errs[0]["type"], "less_than_equal");
        assert_eq!(errs[0]["loc"], json!(["query", "port"]));
        assert_eq!(errs[1]["type"], "int_from_float");
    }

    #[test]
    fn malformed_json_and_non_objects() {
        let e = parse_json_object(b"{not json", "ModelInstance").unwrap_err();
        assert_eq!(e.0[0]["type"], "json_invalid");
        let e = parse_json_object(b"[1,2]", "ModelInstance").unwrap_err();
        assert_eq!(e.0[0]["type"], "dataclass_type");
        assert_eq!(e.0[0]["loc"], json!(["body"]));
    }

    #[test]
    fn query_strings_become_string_objects() {
        let q = query_object(Some("model_name=a%40llm&host=h&port=1&prompt_template="));
        assert_eq!(q["model_name"], "a@llm");
        assert_eq!(q["port"], "1");
        assert_eq!(q["prompt_template"], "");
    }
}
