//! QMP framing (docs/interop/qmp-spec.rst in QEMU): a client sends a stream of JSON objects
//! (one per line from `socat`, `qmp-shell` and `qemu.qmp`, but a line break is not required);
//! the server answers each `execute` with a `return` or an `error` echoing its `id`.
//!
//! Input is bounded: a message longer than [`MAX_MESSAGE`] is skipped (its bytes are counted,
//! not kept) and answered with an error, as is anything that is not valid JSON. The client stays
//! connected, as QEMU keeps it.

use serde_json::{json, Map, Value};

/// Longest message a client may send; QMP commands are a few hundred bytes.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// The error classes QEMU still uses (qapi/error.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
}

impl ErrorClass {
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
        }
    }
}

/// A failed command or a malformed message: what the client reads in `error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }
    pub fn not_found(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }
}

/// One complete message cut from the input stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// The message's bytes.
    Message(Vec<u8>),
    /// A message longer than [`MAX_MESSAGE`] was skipped.
    TooLong,
}

/// Cuts the input stream into top-level JSON values by tracking brackets and strings, so a
/// message may span lines or share one with the next. A word outside strings that cannot start
/// `true`, `false` or `null` ends the message at once (as a lexical error ends it in QEMU), so
/// an unclosed `{bad` does not swallow what follows; the rest of that line is skipped.
#[derive(Default)]
pub struct Framer {
    /// The letters of the current word outside strings.
    word: Vec<u8>,
    /// The previous byte was part of a number (an exponent `e` may follow).
    numeric: bool,
    /// Skipping to the end of the line after a lexical error.
    skip_line: bool,
    buf: Vec<u8>,
    depth: u32,
    in_string: bool,
    escape: bool,
    /// Inside a bare token (not an object or array): ends at whitespace.
    bare: bool,
    /// The current message is over the limit: its bytes are dropped.
    overflow: bool,
}

impl Framer {
    /// Feeds `input`, appending every message it completes to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Frame>) {
        for &b in input {
            if self.skip_line {
                self.skip_line = b != b'\n';
                continue;
            }
            let started = self.depth > 0 || self.bare;
            if !started {
                match b {
                    b' ' | b'\t' | b'\r' | b'\n' => continue,
                    b'{' | b'[' => self.depth = 1,
                    _ => self.bare = true,
                }
                self.keep(b);
                continue;
            }
            if self.bare {
                if b.is_ascii_whitespace() {
                    self.finish(out);
                } else {
                    self.keep(b);
                }
                continue;
            }
            self.keep(b);
            if self.in_string {
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            if b.is_ascii_alphabetic() && !(self.numeric && matches!(b, b'e' | b'E')) {
                self.word.push(b);
                if !["true", "false", "null"]
                    .iter()
                    .any(|w| w.as_bytes().starts_with(&self.word))
                {
                    self.finish(out);
                    self.skip_line = b != b'\n';
                    continue;
                }
            } else {
                self.word.clear();
            }
            self.numeric = b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+');
            match b {
                b'"' => self.in_string = true,
                // Saturating: nesting deeper than u32 is garbage that ends as TooLong anyway.
                b'{' | b'[' => self.depth = self.depth.saturating_add(1),
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        self.finish(out);
                    }
                }
                _ => {}
            }
        }
    }

    fn keep(&mut self, b: u8) {
        if self.overflow {
            return;
        }
        if self.buf.len() >= MAX_MESSAGE {
            self.overflow = true;
            self.buf = Vec::new();
            return;
        }
        self.buf.push(b);
    }

    fn finish(&mut self, out: &mut Vec<Frame>) {
        out.push(if self.overflow {
            Frame::TooLong
        } else {
            Frame::Message(std::mem::take(&mut self.buf))
        });
        *self = Framer::default();
    }
}

/// A parsed `execute` message.
#[derive(Debug, PartialEq)]
pub struct Command {
    pub name: String,
    pub arguments: Map<String, Value>,
    pub id: Option<Value>,
}

/// Parses one message; an error carries the `id` when the message had one, so the reply can
/// echo it.
pub fn parse(msg: &[u8]) -> Result<Command, (QmpError, Option<Value>)> {
    let v: Value = serde_json::from_slice(msg)
        .map_err(|e| (QmpError::generic(format!("JSON parse error, {e}")), None))?;
    let Value::Object(mut obj) = v else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = obj.remove("id");
    let fail = |desc: String| (QmpError::generic(desc), id.clone());
    let name = match obj.remove("execute") {
        Some(Value::String(s)) => s,
        Some(_) => return Err(fail("QMP input member 'execute' must be a string".into())),
        None => return Err(fail("QMP input lacks member 'execute'".into())),
    };
    let arguments = match obj.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(fail(
                "QMP input member 'arguments' must be an object".into(),
            ))
        }
    };
    if let Some(k) = obj.keys().next() {
        return Err(fail(format!("QMP input member '{k}' is unexpected")));
    }
    Ok(Command {
        name,
        arguments,
        id,
    })
}

/// The greeting sent on connect. `qemu.qmp` checks that `version` has QEMU's shape.
pub fn greeting() -> Value {
    json!({"QMP": {"version": version(), "capabilities": []}})
}

/// fvd's version in `query-version`'s shape (`qemu` holds fvd's numbers).
pub fn version() -> Value {
    let n = |s: &str| s.parse::<u64>().unwrap_or(0);
    json!({
        "qemu": {
            "major": n(env!("CARGO_PKG_VERSION_MAJOR")),
            "minor": n(env!("CARGO_PKG_VERSION_MINOR")),
            "micro": n(env!("CARGO_PKG_VERSION_PATCH")),
        },
        "package": concat!("fvd ", env!("CARGO_PKG_VERSION")),
    })
}

/// A successful reply.
pub fn ok_reply(ret: Value, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("return".into(), ret);
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// An error reply.
pub fn error_reply(e: &QmpError, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert(
        "error".into(),
        json!({"class": e.class.name(), "desc": e.desc}),
    );
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// One reply or event as sent: compact JSON and CRLF, as QEMU ends them.
pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).unwrap_or_default();
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(input: &[&[u8]]) -> Vec<Frame> {
        let mut f = Framer::default();
        let mut out = Vec::new();
        for i in input {
            f.feed(i, &mut out);
        }
        out
    }

    fn msg(s: &str) -> Frame {
        Frame::Message(s.as_bytes().to_vec())
    }

    #[test]
    fn framer_splits_objects_across_and_within_lines() {
        let out = frames(&[
            b"{\"execute\": \"a\"}\n{\"exe",
            b"cute\": \"b\", \"x\": \"}{\\\"\"}{\"c\": [1]}  ",
        ]);
        assert_eq!(
            out,
            vec![
                msg("{\"execute\": \"a\"}"),
                msg("{\"execute\": \"b\", \"x\": \"}{\\\"\"}"),
                msg("{\"c\": [1]}"),
            ]
        );
    }

    #[test]
    fn framer_ends_a_message_at_a_lexical_error_and_skips_its_line() {
        assert_eq!(
            frames(&[b"{bad stuff\n{\"a\": [true, null, 1e5, -2E+3]}"]),
            vec![msg("{b"), msg("{\"a\": [true, null, 1e5, -2E+3]}")]
        );
    }

    #[test]
    fn framer_cuts_bare_tokens_at_whitespace() {
        assert_eq!(frames(&[b"garbage\n{}"]), vec![msg("garbage"), msg("{}")]);
    }

    #[test]
    fn framer_skips_an_oversize_message_and_resumes() {
        let mut big = b"{\"x\": \"".to_vec();
        big.resize(MAX_MESSAGE * 3, b'a');
        big.extend_from_slice(b"\"}\n{\"execute\": \"y\"}");
        let mut f = Framer::default();
        let mut out = Vec::new();
        f.feed(&big, &mut out);
        assert_eq!(out, vec![Frame::TooLong, msg("{\"execute\": \"y\"}")]);
        assert!(f.buf.capacity() <= MAX_MESSAGE);
    }

    #[test]
    fn parse_reports_each_malformation_with_the_id() {
        let c = parse(br#"{"execute": "quit", "id": 7, "arguments": {"a": 1}}"#).unwrap();
        assert_eq!(c.name, "quit");
        assert_eq!(c.id, Some(json!(7)));
        assert_eq!(c.arguments["a"], 1);
        let err = |m: &str| parse(m.as_bytes()).unwrap_err();
        assert!(err("{bad").0.desc.starts_with("JSON parse error"));
        assert_eq!(err("[1]").0.desc, "QMP input must be a JSON object");
        let (e, id) = err(r#"{"id": "x"}"#);
        assert_eq!(e.desc, "QMP input lacks member 'execute'");
        assert_eq!(id, Some(json!("x")));
        assert!(err(r#"{"execute": 1}"#).0.desc.contains("must be a string"));
        assert!(err(r#"{"execute": "a", "arguments": []}"#)
            .0
            .desc
            .contains("must be an object"));
        assert!(err(r#"{"execute": "a", "foo": 1}"#)
            .0
            .desc
            .contains("'foo' is unexpected"));
    }

    #[test]
    fn replies_echo_the_id_and_end_with_crlf() {
        let e = error_reply(&QmpError::not_found("no"), Some(json!("i")));
        assert_eq!(
            e,
            json!({"error": {"class": "CommandNotFound", "desc": "no"}, "id": "i"})
        );
        assert_eq!(ok_reply(json!({}), None), json!({"return": {}}));
        assert!(encode(&json!({})).ends_with(b"}\r\n"));
        assert_eq!(greeting()["QMP"]["capabilities"], json!([]));
        assert!(greeting()["QMP"]["version"]["qemu"]["minor"].is_u64());
    }

    /// JSON values as clients send them: nested objects and arrays of strings with escapes and
    /// brackets inside, numbers with exponents, literals.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            (-1e300f64..1e300).prop_map(|f| json!(f)),
            "[ -~\\t\n\"{}\\[\\]é]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z\"{}]{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Feeds `input` cut at `cuts` (offsets, any order, out of range ones ignored).
    fn frames_cut(input: &[u8], cuts: &[usize]) -> Vec<Frame> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        at.push(0);
        at.push(input.len());
        at.sort_unstable();
        let pieces: Vec<&[u8]> = at.windows(2).map(|w| &input[w[0]..w[1]]).collect();
        frames(&pieces)
    }

    proptest! {
        /// Whatever a client sends, however the reads cut it: the same messages, none longer
        /// than the limit, and no panic.
        #[test]
        fn framer_is_independent_of_read_boundaries(
            input in prop::collection::vec(
                prop_oneof![
                    4 => any::<u8>(),
                    6 => prop::sample::select(b"{}[]\"\\ \nax1e-".to_vec()),
                ],
                0..400,
            ),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            let whole = frames(&[&input]);
            prop_assert_eq!(&frames_cut(&input, &cuts), &whole);
            for f in &whole {
                if let Frame::Message(m) = f {
                    prop_assert!(m.len() <= MAX_MESSAGE);
                    prop_assert!(!m.is_empty());
                }
            }
        }

        /// Values written one after the other, with any whitespace between them and cut
        /// anywhere, come out one message each, each the value's text.
        #[test]
        fn framer_returns_each_value_sent(
            values in prop::collection::vec(json_value(), 1..5),
            seps in prop::collection::vec("[ \t\r\n]{0,3}", 5),
            pretty in any::<bool>(),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            // Top-level values as messages: objects or arrays (bare tokens end at whitespace,
            // so a top-level string with spaces is not one message, as in QEMU).
            let values: Vec<Value> = values.into_iter().map(|v| json!({ "v": v })).collect();
            let texts: Vec<Vec<u8>> = values
                .iter()
                .map(|v| {
                    if pretty {
                        serde_json::to_vec_pretty(v).unwrap()
                    } else {
                        serde_json::to_vec(v).unwrap()
                    }
                })
                .collect();
            let mut input = Vec::new();
            for (text, sep) in texts.iter().zip(&seps) {
                input.extend_from_slice(text);
                input.extend_from_slice(sep.as_bytes());
            }
            // Each message is the value's text, to the byte.
            let got: Vec<Vec<u8>> = frames_cut(&input, &cuts)
                .into_iter()
                .map(|f| match f {
                    Frame::Message(m) => m,
                    Frame::TooLong => panic!("a short message was cut as too long"),
                })
                .collect();
            prop_assert_eq!(got, texts);
        }
    }
}
