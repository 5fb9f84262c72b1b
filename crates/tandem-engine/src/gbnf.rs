//! GBNF, the grammar format of llama.cpp's `grammar` field (and of vLLM's
//! `guided_grammar` with its xgrammar backend), read into the Lark dialect
//! llguidance compiles, so that a client moving from either server keeps
//! its grammars on the device.
//!
//! The reading accepts every grammar llama.cpp's own parser accepts, with
//! the same meaning, and a little more: a newline may appear anywhere
//! whitespace may (a rule ends where the next `name ::=` starts). Token
//! references (`<[1234]>`, `<|tool|>`) are refused: they name one model's
//! vocabulary. The input is untrusted text: every error is a message, never
//! a panic, and nesting and repetition counts are bounded.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// How deep groups may nest: recursion in the reader is bounded by it.
const MAX_DEPTH: usize = 64;
/// How many repetition marks may follow one another (`"a"*?`): each
/// nests the expression once more, and the nesting is walked recursively.
const MAX_POSTFIX: usize = 4;
/// The largest count a `{m,n}` repetition may name: llguidance expands
/// bounded repetitions, and a larger count would only fail there, slower.
pub const MAX_REPEAT: u32 = 1024;

/// The Lark grammar (llguidance's dialect) that accepts what the GBNF
/// grammar `src` accepts, starting at its `root` rule; or why it cannot be
/// read, with the line and column.
pub fn to_lark(src: &str) -> Result<String, String> {
    let mut p = Reader {
        src,
        pos: 0,
        depth: 0,
    };
    let mut rules: BTreeMap<&str, Expr> = BTreeMap::new();
    let mut order: Vec<&str> = Vec::new();
    p.space();
    while !p.done() {
        let name = p.name().ok_or_else(|| p.error("expected a rule name"))?;
        p.space();
        if !p.eat("::=") {
            return Err(p.error(&format!("expected `::=` after `{name}`")));
        }
        p.space();
        let body = p.alternates()?;
        // llama.cpp keeps the last definition of a rule.
        if rules.insert(name, body).is_none() {
            order.push(name);
        }
        p.space();
    }
    if !rules.contains_key("root") {
        return Err("the grammar has no `root` rule".into());
    }
    let mut used = BTreeSet::new();
    for body in rules.values() {
        body.references(&mut used);
    }
    if let Some(missing) = used.iter().find(|n| !rules.contains_key(*n)) {
        return Err(format!("rule `{missing}` is used but not defined"));
    }
    let mut out = format!("start: {}\n", lark_name("root"));
    for name in order {
        if let Some(body) = rules.get(name) {
            let _ = writeln!(out, "{}: {}", lark_name(name), body.lark(Context::Top));
        }
    }
    Ok(out)
}

/// A GBNF rule name as a Lark rule name. Lark reads names that start with
/// a capital as terminals and has no capitals in rule names, so each
/// capital becomes `_` and its small letter (GBNF names have no `_`): the
/// map is one to one.
fn lark_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    out.push_str("g_");
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A grammar expression.
#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Alt(Vec<Expr>),
    Seq(Vec<Expr>),
    Literal(String),
    /// A character class: its ranges, and whether it is negated.
    Class(Vec<(char, char)>, bool),
    /// Any one character (`.`).
    Any,
    Ref(String),
    Repeat(Box<Expr>, u32, Option<u32>),
}

/// Where an expression is written, which decides whether it needs
/// brackets around it.
#[derive(Clone, Copy, PartialEq)]
enum Context {
    Top,
    InSeq,
    Operand,
}

impl Expr {
    fn references<'a>(&'a self, out: &mut BTreeSet<&'a str>) {
        match self {
            Expr::Alt(v) | Expr::Seq(v) => v.iter().for_each(|e| e.references(out)),
            Expr::Repeat(e, ..) => e.references(out),
            Expr::Ref(n) => {
                out.insert(n.as_str());
            }
            Expr::Literal(_) | Expr::Class(..) | Expr::Any => {}
        }
    }

    fn lark(&self, cx: Context) -> String {
        match self {
            Expr::Alt(v) => {
                let s = v
                    .iter()
                    .map(|e| e.lark(Context::Top))
                    .collect::<Vec<_>>()
                    .join(" | ");
                if cx == Context::Top {
                    s
                } else {
                    format!("({s})")
                }
            }
            // Lark has no word for the empty string, but an empty string
            // made optional is one.
            Expr::Seq(v) if v.is_empty() => empty(cx),
            Expr::Seq(v) if v.len() == 1 => v[0].lark(cx),
            Expr::Seq(v) => {
                let s = v
                    .iter()
                    .map(|e| e.lark(Context::InSeq))
                    .collect::<Vec<_>>()
                    .join(" ");
                if cx == Context::Operand && v.len() > 1 {
                    format!("({s})")
                } else {
                    s
                }
            }
            Expr::Literal(s) if s.is_empty() => empty(cx),
            // One lexeme a character: Lark's lexer takes the longest
            // lexeme it can, so `("a" | "ab") "bc"` would not read "abc",
            // where GBNF, which reads characters, does.
            Expr::Literal(s) => {
                let chars = s
                    .chars()
                    .map(|c| lark_string(c.encode_utf8(&mut [0; 4])))
                    .collect::<Vec<_>>();
                if cx == Context::Operand && chars.len() > 1 {
                    format!("({})", chars.join(" "))
                } else {
                    chars.join(" ")
                }
            }
            Expr::Class(ranges, negated) => lark_class(ranges, *negated),
            Expr::Any => "/(?s:.)/".into(),
            Expr::Ref(n) => lark_name(n),
            // Lark has no `{0}`: what repeats never matches only the
            // empty string.
            Expr::Repeat(_, _, Some(0)) => empty(cx),
            Expr::Repeat(e, min, max) => {
                let inner = e.lark(Context::Operand);
                let s = match (min, max) {
                    (0, None) => format!("{inner}*"),
                    (1, None) => format!("{inner}+"),
                    (0, Some(1)) => format!("{inner}?"),
                    (m, None) => format!("{inner}{{{m},}}"),
                    (m, Some(n)) if m == n => format!("{inner}{{{m}}}"),
                    (m, Some(n)) => format!("{inner}{{{m},{n}}}"),
                };
                if cx == Context::Operand {
                    format!("({s})")
                } else {
                    s
                }
            }
        }
    }
}

/// The empty string in Lark, which has no word for it.
fn empty(cx: Context) -> String {
    if cx == Context::Operand {
        "((\"\")?)".into()
    } else {
        "(\"\")?".into()
    }
}

/// A Lark string literal: JSON's escapes, which are what its lexer reads.
fn lark_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\x7f' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A character class as a Lark regular expression: every character by
/// its code point, so no character of the class means anything to the
/// regex syntax or ends the expression.
fn lark_class(ranges: &[(char, char)], negated: bool) -> String {
    if ranges.is_empty() {
        // `[^]` is any character; `[]`, refused by the reader, none.
        return "/(?s:.)/".into();
    }
    let mut out = String::from("/[");
    if negated {
        out.push('^');
    }
    for &(a, b) in ranges {
        if a == b {
            let _ = write!(out, "\\x{{{:x}}}", a as u32);
        } else {
            let _ = write!(out, "\\x{{{:x}}}-\\x{{{:x}}}", a as u32, b as u32);
        }
    }
    out.push_str("]/");
    out
}

/// A cursor over the grammar's text.
struct Reader<'a> {
    src: &'a str,
    pos: usize,
    depth: usize,
}

impl<'a> Reader<'a> {
    fn rest(&self) -> &'a str {
        self.src.get(self.pos..).unwrap_or_default()
    }

    fn done(&self) -> bool {
        self.rest().is_empty()
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn eat(&mut self, s: &str) -> bool {
        if self.rest().starts_with(s) {
            self.pos += s.len();
            true
        } else {
            false
        }
    }

    /// Where the cursor stands, as a person counts: line and column.
    fn error(&self, what: &str) -> String {
        let before = self.src.get(..self.pos).unwrap_or_default();
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!("{what} at line {line}, column {col}")
    }

    /// Skips blanks, newlines and `#` comments.
    fn space(&mut self) {
        loop {
            let rest = self.rest();
            let trimmed = rest.trim_start_matches([' ', '\t', '\r', '\n']);
            self.pos += rest.len() - trimmed.len();
            if trimmed.starts_with('#') {
                self.pos += trimmed.find('\n').unwrap_or(trimmed.len());
            } else {
                return;
            }
        }
    }

    fn name(&mut self) -> Option<&'a str> {
        let rest = self.rest();
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .unwrap_or(rest.len());
        (len > 0).then(|| {
            self.pos += len;
            &rest[..len]
        })
    }

    /// Whether a rule's definition (`name ::=`) starts here: the end of
    /// the one before.
    fn at_definition(&self) -> bool {
        let mut look = Reader {
            src: self.src,
            pos: self.pos,
            depth: 0,
        };
        look.name().is_some() && {
            look.space();
            look.rest().starts_with("::=")
        }
    }

    fn alternates(&mut self) -> Result<Expr, String> {
        let mut alts = vec![self.sequence()?];
        while self.eat("|") {
            self.space();
            alts.push(self.sequence()?);
        }
        Ok(if alts.len() == 1 {
            alts.swap_remove(0)
        } else {
            Expr::Alt(alts)
        })
    }

    fn sequence(&mut self) -> Result<Expr, String> {
        let mut items = Vec::new();
        loop {
            self.space();
            match self.peek() {
                None | Some('|' | ')') => break,
                _ if self.at_definition() => break,
                _ => {}
            }
            let atom = self.atom()?;
            items.push(self.postfix(atom)?);
        }
        Ok(if items.len() == 1 {
            items.swap_remove(0)
        } else {
            Expr::Seq(items)
        })
    }

    fn postfix(&mut self, mut e: Expr) -> Result<Expr, String> {
        for _ in 0..=MAX_POSTFIX {
            let (min, max) = match self.peek() {
                Some('*') => (0, None),
                Some('+') => (1, None),
                Some('?') => (0, Some(1)),
                Some('{') => {
                    self.bump();
                    let bounds = self.bounds()?;
                    e = Expr::Repeat(Box::new(e), bounds.0, bounds.1);
                    continue;
                }
                _ => return Ok(e),
            };
            self.bump();
            e = Expr::Repeat(Box::new(e), min, max);
        }
        Err(self.error(&format!(
            "more than {MAX_POSTFIX} repetitions of one repetition"
        )))
    }

    /// `{m}`, `{m,}`, `{,n}`, `{m,n}`, after the `{`.
    fn bounds(&mut self) -> Result<(u32, Option<u32>), String> {
        self.space();
        let min = self.number()?;
        self.space();
        let max = if self.eat(",") {
            self.space();
            let n = self.number()?;
            self.space();
            n
        } else {
            Some(min.ok_or_else(|| self.error("expected a count in `{}`"))?)
        };
        if !self.eat("}") {
            return Err(self.error("expected `}`"));
        }
        let min = min.unwrap_or(0);
        if max.is_some_and(|n| n < min) {
            return Err(self.error("a repetition's maximum is below its minimum"));
        }
        Ok((min, max))
    }

    fn number(&mut self) -> Result<Option<u32>, String> {
        let rest = self.rest();
        let len = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if len == 0 {
            return Ok(None);
        }
        let n = rest[..len]
            .parse::<u32>()
            .ok()
            .filter(|&n| n <= MAX_REPEAT)
            .ok_or_else(|| self.error(&format!("a repetition count above {MAX_REPEAT}")))?;
        self.pos += len;
        Ok(Some(n))
    }

    fn atom(&mut self) -> Result<Expr, String> {
        let at = self.pos;
        match self.bump() {
            Some('"') => self.string(at),
            Some('[') => self.class(at),
            Some('.') => Ok(Expr::Any),
            Some('(') => self.group(),
            Some('<' | '!') => {
                self.pos = at;
                Err(self.error(
                    "token references (`<[id]>`, `<|token|>`) name one model's vocabulary \
                     and are not supported",
                ))
            }
            Some(_) => {
                self.pos = at;
                match self.name() {
                    Some(n) => Ok(Expr::Ref(n.to_owned())),
                    None => Err(self.error("expected a string, a class, a rule or a group")),
                }
            }
            None => Err(self.error("unexpected end of the grammar")),
        }
    }

    /// The rest of a string opened at `at`.
    fn string(&mut self, at: usize) -> Result<Expr, String> {
        let mut s = String::new();
        loop {
            match self.peek() {
                None => {
                    self.pos = at;
                    return Err(self.error("a string that is never closed"));
                }
                Some('"') => {
                    self.bump();
                    return Ok(Expr::Literal(s));
                }
                Some(_) => s.push(self.char()?),
            }
        }
    }

    /// The rest of a character class opened at `at`.
    fn class(&mut self, at: usize) -> Result<Expr, String> {
        let negated = self.eat("^");
        let mut ranges = Vec::new();
        loop {
            match self.peek() {
                None => {
                    self.pos = at;
                    return Err(self.error("a character class that is never closed"));
                }
                Some(']') => {
                    self.bump();
                    break;
                }
                Some(_) => ranges.push(self.range()?),
            }
        }
        if ranges.is_empty() && !negated {
            self.pos = at;
            return Err(self.error("an empty character class matches nothing"));
        }
        Ok(Expr::Class(ranges, negated))
    }

    /// One character of a class, or a range of them (`-` before `]` is
    /// itself).
    fn range(&mut self) -> Result<(char, char), String> {
        let a = self.char()?;
        let rest = self.rest();
        let b = if rest.starts_with('-') && !rest.starts_with("-]") {
            self.bump();
            self.char()?
        } else {
            a
        };
        if b < a {
            return Err(self.error("a character range that runs backwards"));
        }
        Ok((a, b))
    }

    /// The rest of a group: its alternatives and the closing `)`.
    fn group(&mut self) -> Result<Expr, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error(&format!("groups nested deeper than {MAX_DEPTH}")));
        }
        self.space();
        let inner = self.alternates()?;
        self.space();
        if !self.eat(")") {
            return Err(self.error("expected `)`"));
        }
        self.depth -= 1;
        Ok(inner)
    }

    /// One character of a string or class, escapes read as llama.cpp
    /// reads them.
    fn char(&mut self) -> Result<char, String> {
        let at = self.pos;
        let c = self
            .bump()
            .ok_or_else(|| self.error("unexpected end of the grammar"))?;
        if c != '\\' {
            return Ok(c);
        }
        let hex = |r: &mut Self, digits: usize| {
            let rest = r.rest();
            let code = rest
                .get(..digits)
                .filter(|h| h.chars().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u32::from_str_radix(h, 16).ok());
            match code.and_then(char::from_u32) {
                Some(c) => {
                    r.pos += digits;
                    Ok(c)
                }
                None => {
                    r.pos = at;
                    Err(r.error("an escape that is not a character"))
                }
            }
        };
        match self.bump() {
            Some('x') => hex(self, 2),
            Some('u') => hex(self, 4),
            Some('U') => hex(self, 8),
            Some('t') => Ok('\t'),
            Some('r') => Ok('\r'),
            Some('n') => Ok('\n'),
            Some(c @ ('\\' | '"' | '[' | ']' | '-' | '^')) => Ok(c),
            _ => {
                self.pos = at;
                Err(self.error("an unknown escape"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_become_lark_rules() {
        let lark =
            to_lark("# yes or no\nroot ::= answer \"!\"?\nanswer ::= \"yes\" | \"no\" # two\n")
                .unwrap();
        assert_eq!(
            lark,
            "start: g_root\ng_root: g_answer \"!\"?\ng_answer: \"y\" \"e\" \"s\" | \"n\" \"o\"\n"
        );
    }

    #[test]
    fn classes_escapes_and_repetitions() {
        let lark = to_lark(r#"root ::= [a-z0-9_\-]{2,8} [^"\\\n] . "\x41\u00e9\"\\\t" ("a" | "b"){3,} "c"{,2} Upper-Name*
Upper-Name ::= """#)
        .unwrap();
        assert_eq!(
            lark,
            concat!(
                "start: g_root\n",
                r#"g_root: /[\x{61}-\x{7a}\x{30}-\x{39}\x{5f}\x{2d}]/{2,8} /[^\x{22}\x{5c}\x{a}]/ /(?s:.)/ "A" "é" "\"" "\\" "\u0009" ("a" | "b"){3,} "c"{0,2} g__upper-_name*"#,
                "\ng__upper-_name: (\"\")?\n"
            )
        );
    }

    #[test]
    fn rules_may_span_lines_as_in_llama_cpp() {
        let lark = to_lark(
            "root ::=\n  \"{\" (\n    item\n    (\",\" item)*\n  )? \"}\"\nitem ::= [0-9]+",
        )
        .unwrap();
        assert!(
            lark.contains("g_root: \"{\" (g_item (\",\" g_item)*)? \"}\""),
            "{lark}"
        );
    }

    #[test]
    fn what_cannot_be_read_is_said_where() {
        for (src, says) in [
            ("", "no `root` rule"),
            ("answer ::= \"x\"", "no `root` rule"),
            ("root ::= missing", "`missing` is used but not defined"),
            ("root ::= \"open", "never closed at line 1, column 10"),
            (
                "root ::= [a-",
                "unexpected end of the grammar at line 1, column 13",
            ),
            ("root ::= [ab", "never closed"),
            ("root ::= []", "empty character class"),
            ("root ::= [z-a]", "runs backwards"),
            ("root ::= \"\\q\"", "unknown escape"),
            ("root ::= \"\\uD800\"", "not a character"),
            ("root ::= \"a\"{3,2}", "below its minimum"),
            ("root ::= \"a\"{99999}", "above 1024"),
            ("root ::= <[1000]>", "token references"),
            ("root ::= (\"a\"", "expected `)`"),
            ("root = \"a\"", "expected `::=`"),
            (
                "root ::= \"a\"\n  ) ",
                "expected a rule name at line 2, column 3",
            ),
        ] {
            let err = to_lark(src).unwrap_err();
            assert!(err.contains(says), "{src:?}: {err}");
        }
        let deep = format!("root ::= {}\"a\"{}", "(".repeat(100), ")".repeat(100));
        assert!(to_lark(&deep).unwrap_err().contains("nested deeper"));
        let stacked = format!("root ::= \"a\"{}", "*".repeat(100_000));
        assert!(
            to_lark(&stacked)
                .unwrap_err()
                .contains("more than 4 repetitions")
        );
        assert!(to_lark("root ::= \"a\"*?{2}+").is_ok());
    }
}
