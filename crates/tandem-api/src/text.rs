//! From token bytes to released text: joins multi-byte UTF-8 characters that
//! tokens split, holds back text that may be the start of a stop sequence, and
//! cuts the answer where a stop sequence appears.

use crate::{Delta, TokenLogprob};

/// Turns token bytes into released text (see the module).
#[derive(Debug, Default)]
pub struct TextAssembler {
    /// Bytes of a character whose remaining bytes have not arrived yet.
    utf8_tail: Vec<u8>,
    /// Decoded text not yet released.
    held: String,
    /// Tokens not yet released, with the end offset of their text in `held`.
    held_tokens: Vec<(usize, TokenLogprob)>,
    stops: Vec<String>,
}

/// What one token released.
#[derive(Debug, Default, PartialEq)]
pub struct Step {
    /// Text (and tokens) released now.
    pub delta: Delta,
    /// A stop sequence was found: the answer ends with `delta`.
    pub stopped: bool,
}

impl TextAssembler {
    /// An assembler cutting at `stops`.
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            ..Self::default()
        }
    }

    /// Adds one token's bytes (and its logprob entry, when asked for).
    pub fn push(&mut self, bytes: &[u8], token: Option<TokenLogprob>) -> Step {
        self.utf8_tail.extend_from_slice(bytes);
        self.decode_tail(false);
        if let Some(t) = token {
            self.held_tokens.push((self.held.len(), t));
        }
        self.release(false)
    }

    /// Releases everything still held; call when generation ends for any
    /// reason other than a stop sequence.
    pub fn finish(&mut self) -> Step {
        self.decode_tail(true);
        self.release(true)
    }

    fn decode_tail(&mut self, flush: bool) {
        loop {
            match std::str::from_utf8(&self.utf8_tail) {
                Ok(s) => {
                    self.held.push_str(s);
                    self.utf8_tail.clear();
                    return;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // SAFETY-free: `valid_up_to` bytes are valid UTF-8 by contract.
                    self.held
                        .push_str(&String::from_utf8_lossy(&self.utf8_tail[..valid]));
                    match e.error_len() {
                        Some(bad) => {
                            self.held.push(char::REPLACEMENT_CHARACTER);
                            self.utf8_tail.drain(..valid + bad);
                        }
                        None => {
                            self.utf8_tail.drain(..valid);
                            if flush {
                                self.held.push(char::REPLACEMENT_CHARACTER);
                                self.utf8_tail.clear();
                            }
                            return;
                        }
                    }
                }
            }
        }
    }

    fn earliest_stop(&self) -> Option<usize> {
        self.stops.iter().filter_map(|s| self.held.find(s)).min()
    }

    /// Length of the longest suffix of `held` that could grow into a stop.
    fn partial_stop_len(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            let max = stop.len().saturating_sub(1).min(self.held.len());
            for len in (best + 1..=max).rev() {
                let start = self.held.len() - len;
                if self.held.is_char_boundary(start)
                    && stop.is_char_boundary(len)
                    && self.held[start..] == stop[..len]
                {
                    best = len;
                    break;
                }
            }
        }
        best
    }

    fn release(&mut self, all: bool) -> Step {
        let (cut, stopped) = match self.earliest_stop() {
            Some(pos) => (pos, true),
            None if all => (self.held.len(), false),
            None => (self.held.len() - self.partial_stop_len(), false),
        };
        let text: String = self.held.drain(..cut).collect();
        let mut tokens = Vec::new();
        let mut start = 0;
        let mut keep = Vec::new();
        for (end, tok) in self.held_tokens.drain(..) {
            // A token goes out with the text its first byte is in, so a
            // token straddling the cut is not lost; tokens that only make up
            // a stop sequence are dropped with it.
            if start < cut || (all && !stopped) {
                tokens.push(tok);
            } else if !stopped {
                keep.push((end - cut, tok));
            }
            start = end;
        }
        self.held_tokens = keep;
        if stopped {
            self.held.clear();
            self.utf8_tail.clear();
        }
        Step {
            delta: Delta {
                text,
                tokens,
                ..Delta::default()
            },
            stopped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stops: &[&str], pieces: &[&[u8]]) -> (String, bool) {
        let mut a = TextAssembler::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let step = a.push(p, None);
            out.push_str(&step.delta.text);
            if step.stopped {
                return (out, true);
            }
        }
        out.push_str(&a.finish().delta.text);
        (out, false)
    }

    #[test]
    fn joins_split_characters() {
        let e = "é".as_bytes();
        let mut a = TextAssembler::new(vec![]);
        assert_eq!(a.push(&e[..1], None).delta.text, "");
        assert_eq!(a.push(&e[1..], None).delta.text, "é");
    }

    #[test]
    fn stop_across_tokens_is_cut() {
        assert_eq!(
            feed(&["\n\n"], &[b"Paris", b".\n", b"\nMore"]),
            ("Paris.".into(), true)
        );
    }

    #[test]
    fn held_prefix_is_released_when_it_diverges() {
        let mut a = TextAssembler::new(vec!["STOP".into()]);
        assert_eq!(a.push(b"ab ST", None).delta.text, "ab ");
        assert_eq!(a.push(b"ART", None).delta.text, "START");
    }

    #[test]
    fn finish_flushes_held_text_and_bad_bytes() {
        assert_eq!(feed(&["xyz"], &[b"a x"]), ("a x".into(), false));
        assert_eq!(feed(&[], &[b"a\xe2\x82"]), ("a\u{FFFD}".into(), false));
        assert_eq!(feed(&[], &[b"\xffb"]), ("\u{FFFD}b".into(), false));
    }

    #[test]
    fn tokens_follow_their_text() {
        let tok = |t: &str| TokenLogprob {
            token: t.into(),
            logprob: -0.5,
            bytes: Some(t.as_bytes().to_vec()),
            top_logprobs: vec![],
        };
        let mut a = TextAssembler::new(vec!["END".into()]);
        let s1 = a.push(b"hi", Some(tok("hi")));
        assert_eq!(s1.delta.text, "hi");
        assert_eq!(s1.delta.tokens.len(), 1);
        let s2 = a.push(b" E", Some(tok(" E")));
        assert_eq!(s2.delta.text, " ");
        assert_eq!(s2.delta.tokens[0].token, " E");
        let s3 = a.push(b"ND", Some(tok("ND")));
        assert!(s3.stopped);
        assert_eq!(s3.delta, Delta::default());
    }
}
