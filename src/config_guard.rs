//! Checks on the configuration text before and beside serde's typed parse.
//!
//! PURE. Three jobs, kept out of `config.rs` so the typed schema stays about
//! meaning:
//! - [`precheck`]: a size cap and a flow-nesting cap *before* serde_yaml
//!   sees the text. libyaml's scanner costs time quadratic in the depth of
//!   nested `[`/`{` (a 20,000-deep file takes 1.5 s, a 60,000-deep one over
//!   5 s), which no typed schema can stop because the cost is paid before
//!   any type is consulted. Block nesting is linear and serde_yaml's own
//!   recursion limit (128) bounds it.
//! - [`duplicate_keys`]: a key written twice in *any* mapping is an error
//!   naming the key path (`clusters.main.ports: duplicate entry with key
//!   "rw"`). serde's derived structs already reject a repeated field, but a
//!   `BTreeMap` (cluster names, port names) keeps the last silently.
//! - [`check_authority`] and [`redact`]: API URLs carry no credentials, and
//!   no message about the file ever shows a password that was in it.

/// Largest configuration file accepted: about 9,000 ports in block style.
/// A file this size parses in about 0.75 s, most of it serde_yaml.
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;
/// Deepest nesting of flow collections (`[`, `{`) accepted. The deepest
/// legitimate one in this format is 3 (`ports: {rw: {roles: [leader]}}`).
pub const MAX_FLOW_DEPTH: usize = 8;

/// Rejects text that is too large or nested too deep to parse cheaply.
pub fn precheck(text: &str) -> Result<(), String> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(format!(
            "the file has {} bytes; at most {MAX_CONFIG_BYTES} are accepted",
            text.len()
        ));
    }
    let (depth, line) = flow_depth(text);
    if depth > MAX_FLOW_DEPTH {
        return Err(format!(
            "line {line}: `[`/`{{` nested more than {MAX_FLOW_DEPTH} deep; this format needs at most 3"
        ));
    }
    Ok(())
}

/// The deepest flow nesting in `text` and the (1-based) line where it is
/// first exceeded, as an upper bound of what libyaml will see.
///
/// The lexer errs on the side of counting: a bracket it cannot place is an
/// opening. It knows what can hide a bracket from libyaml: quoted scalars
/// (which start only where a token starts), comments (`#` after a space or
/// at a line start), and block scalars (`|`, `>`), whose content lines are
/// skipped by indentation. Inside a flow collection a plain scalar cannot
/// contain a bracket at all, so there every bracket outside quotes and
/// comments counts.
fn flow_depth(text: &str) -> (usize, usize) {
    let b = text.as_bytes();
    let mut depth = 0usize;
    let mut max = 0usize;
    let mut max_line = 0usize;
    let mut line = 1usize;
    let mut i = 0usize;
    // Where a token may start (after indentation, an indicator or a space).
    let mut token_start = true;
    // Indentation of the current line, and of the line a block scalar
    // started on (its content is every following line indented more).
    let mut indent = 0usize;
    let mut at_line_start = true;
    let mut block_scalar: Option<usize> = None;
    while i < b.len() {
        let c = b[i];
        if at_line_start {
            let spaces = b[i..].iter().take_while(|&&x| x == b' ').count();
            let rest = &b[i + spaces..];
            let blank = rest.is_empty() || line_break(rest, 0) > 0;
            if let Some(parent) = block_scalar {
                if blank || spaces > parent {
                    // Block scalar content: skip the line.
                    i = skip_line(b, i);
                    line += 1;
                    continue;
                }
                block_scalar = None;
            }
            indent = spaces;
            at_line_start = false;
            token_start = true;
            i += spaces;
            continue;
        }
        let br = line_break(b, i);
        if br > 0 {
            line += 1;
            at_line_start = true;
            i += br;
            continue;
        }
        match c {
            b' ' | b'\t' => {
                token_start = true;
                i += 1;
                continue;
            }
            b'#' if token_start => {
                i = skip_comment(b, i);
                continue;
            }
            b'"' | b'\'' if token_start => {
                let (end, lines) = skip_quoted(b, i);
                line += lines;
                i = end;
                token_start = false;
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    max = depth;
                    max_line = line;
                }
                token_start = true;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                token_start = true;
            }
            b',' if depth > 0 => token_start = true,
            b'|' | b'>' if token_start && depth == 0 => {
                block_scalar = Some(indent);
                i = skip_line(b, i);
                line += 1;
                at_line_start = true;
                continue;
            }
            b'-' | b'?' | b':' if indicator(b, i, depth > 0) => {
                // An indicator: a token may start after it.
                token_start = true;
            }
            b'-' | b'?' | b':' => {
                // Glued to what follows (`-x`, and `?x`, `:x` in block
                // context): the start of a plain scalar, as libyaml reads
                // it, so a quote after it opens nothing.
                i = skip_plain(b, i, depth > 0);
                token_start = false;
                continue;
            }
            b'!' | b'&' | b'*' if token_start => {
                // A tag, an anchor or an alias: a node's property, after
                // which (and a space) a flow collection may open; it is not
                // the start of a plain scalar that would hide the bracket.
                i = skip_property(b, i);
                continue;
            }
            _ => {
                // A plain scalar. In block context it may hold brackets and
                // quotes that mean nothing, so skip it to where the next
                // token can start; in flow context it ends at an indicator.
                i = skip_plain(b, i, depth > 0);
                token_start = false;
                continue;
            }
        }
        i += 1;
    }
    (max, max_line)
}

/// The length of the line break at `b[i]`, 0 if there is none. libyaml
/// (YAML 1.1) breaks lines at LF, CR, CR LF, NEL (U+0085), LS (U+2028) and
/// PS (U+2029), not only at LF: a lexer that knew only LF would take what
/// follows a CR for the rest of a plain scalar, and miss the brackets that
/// libyaml sees at the start of a new line.
fn line_break(b: &[u8], i: usize) -> usize {
    match b.get(i..).unwrap_or_default() {
        [b'\r', b'\n', ..] | [0xC2, 0x85, ..] => 2,
        [b'\n' | b'\r', ..] => 1,
        [0xE2, 0x80, 0xA8 | 0xA9, ..] => 3,
        _ => 0,
    }
}

/// Where the line after the one `i` is on starts.
fn skip_line(b: &[u8], i: usize) -> usize {
    let end = skip_comment(b, i);
    end + line_break(b, end)
}

/// Where the line break that ends the line `i` is on starts (the caller
/// handles the break itself).
fn skip_comment(b: &[u8], i: usize) -> usize {
    (i..b.len())
        .find(|&j| line_break(b, j) > 0)
        .unwrap_or(b.len())
}

/// Past the closing quote of the scalar opening at `i`; also the number of
/// line breaks inside it. An unterminated one runs to the end of the text.
fn skip_quoted(b: &[u8], i: usize) -> (usize, usize) {
    let q = b[i];
    let mut j = i + 1;
    let mut lines = 0;
    while j < b.len() {
        match b[j] {
            b'\\' if q == b'"' => j += 1,
            b'\'' if q == b'\'' && b.get(j + 1) == Some(&b'\'') => j += 1,
            x if x == q => return (j + 1, lines),
            b'\n' => lines += 1,
            _ => {}
        }
        j += 1;
    }
    (b.len(), lines)
}

/// Whether the `-`, `?` or `:` at `b[i]` is an indicator, by libyaml's
/// rules: `-` when a blank, a line break or the end follows; `?` and `:`
/// also anywhere in flow context (`{"a":1}`, `[?x]`).
fn indicator(b: &[u8], i: usize, in_flow: bool) -> bool {
    let blank_next = matches!(b.get(i + 1), None | Some(b' ' | b'\t')) || line_break(b, i + 1) > 0;
    blank_next || (in_flow && b[i] != b'-')
}

/// Where the tag, anchor or alias at `b[i]` ends: at a space, a line break
/// or a flow indicator (which then counts).
fn skip_property(b: &[u8], i: usize) -> usize {
    (i + 1..b.len())
        .find(|&j| {
            matches!(b[j], b' ' | b'\t' | b',' | b'[' | b']' | b'{' | b'}') || line_break(b, j) > 0
        })
        .unwrap_or(b.len())
}

/// Past a plain scalar starting at `i`, stopping where a token could start:
/// at a line break, at `: ` or ` #`, and in flow context at any flow
/// indicator. Multi-line plain scalars are resumed line by line, which only
/// ever makes the lexer see more structure, never less.
fn skip_plain(b: &[u8], i: usize, in_flow: bool) -> usize {
    let mut j = i;
    while j < b.len() {
        let c = b[j];
        let next = b.get(j + 1).copied();
        let spaced = |x: Option<u8>| matches!(x, None | Some(b' ' | b'\t' | b'\r' | b'\n'));
        if line_break(b, j) > 0 {
            return j;
        }
        match c {
            b':' if spaced(next) || (in_flow && matches!(next, Some(b',' | b']' | b'}'))) => {
                return j
            }
            b' ' | b'\t' if next == Some(b'#') => return j,
            b',' | b'[' | b']' | b'{' | b'}' if in_flow => return j,
            _ => {}
        }
        j += 1;
    }
    j
}

/// A key written twice in any mapping: serde_yaml's untyped `Value` rejects
/// it with the mapping's key path, which the typed parse would not.
pub fn duplicate_keys(text: &str) -> Result<(), String> {
    match serde_yaml::from_str::<serde_yaml::Value>(text) {
        Err(e) if e.to_string().contains("duplicate entry") => Err(e.to_string()),
        // Other errors are the typed parse's to report, with better words.
        _ => Ok(()),
    }
}

/// Checks the authority (`host[:port]`) of an API URL: no user information,
/// a host, and a port within 1..=65535. `display` is the URL as it may be
/// shown.
pub fn check_authority(authority: &str, display: &str) -> Result<(), String> {
    // `display` is the whole URL: `http://u:pa/ss@h` has its `@` after a `/`.
    if authority.contains('@') || display.contains('@') {
        return Err(format!(
            "{display:?} carries credentials; remove them from the URL and set \
             the cluster's tls.username and tls.password_file instead"
        ));
    }
    let port = if let Some(rest) = authority.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return Err(format!("{display:?} has an unclosed `[` in its host"));
        };
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{display:?}: [{ip}] is not an IPv6 address"));
        }
        match after {
            "" => None,
            p => match p.strip_prefix(':') {
                Some(p) => Some(p),
                None => return Err(format!("{display:?} has text after the `]` of its host")),
            },
        }
    } else {
        authority.split_once(':').map(|(_, p)| p)
    };
    if authority.starts_with(':') || authority.is_empty() {
        return Err(format!("{display:?} has no host"));
    }
    if let Some(p) = port {
        match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|c| c.is_ascii_digit()) => {}
            _ => {
                return Err(format!(
                    "{display:?} has port {p:?}; expected a number from 1 to 65535"
                ))
            }
        }
    }
    Ok(())
}

/// Where the authority at the start of `tail` (just after a `://`) ends in
/// a message: at a quote, a comma or ASCII white space. A backslash ends it
/// only as the start of an escaped quote: messages quote values the way
/// Rust's `{:?}` does, so an escape such as `\u{85}` inside a password is
/// part of it (stopping there would show the rest of the password).
fn authority_end(tail: &str) -> usize {
    let b = tail.as_bytes();
    (0..b.len())
        .find(|&i| match b[i] {
            b'"' | b'\'' | b' ' | b'\t' | b',' | b'\n' | b'\r' => true,
            b'\\' => matches!(b.get(i + 1), Some(b'"' | b'\'')),
            _ => false,
        })
        .unwrap_or(b.len())
}

/// `text` with the user information of every `scheme://user:pass@` URL in it
/// replaced by `***` (everything up to the URL's last `@`, as a password may
/// hold a `/`), for messages that quote the file.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        // Up to where a URL surely ends: a password may hold a `/`.
        let end = authority_end(tail);
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(a) => {
                out.push_str("***");
                out.push_str(&authority[a..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_flow_nesting_is_refused_quickly() {
        let n = 60_000;
        let text = format!("clusters: {}{}\n", "[".repeat(n), "]".repeat(n));
        let started = std::time::Instant::now();
        let e = precheck(&text).unwrap_err();
        assert!(
            e.starts_with("line 1: `[`/`{` nested more than 8 deep"),
            "{e}"
        );
        // Linear: far below what libyaml would take (over 5 s).
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let text = format!("clusters:\n  a: {}\n", "{x: ".repeat(40));
        assert!(precheck(&text).unwrap_err().starts_with("line 2:"));
    }

    #[test]
    fn brackets_that_libyaml_does_not_nest_are_not_counted_as_deep() {
        for ok in [
            "listen: \"[::1]:6432\"\nhosts: ['http://[::1]:8008', \"x]]]]\"]\n",
            "k: a[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[b\n",
            "# [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\nk: 1\n",
            "k: |\n  [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n  \"\nj: 1\n",
            "ports: {rw: {listen: \"127.0.0.1:1\", roles: [leader]}}\n",
        ] {
            assert_eq!(precheck(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn quotes_and_closers_cannot_hide_real_nesting() {
        // A `]` inside a quoted scalar closes nothing.
        let text = format!("k: {}\n", "[ \"]\", ".repeat(40));
        assert!(precheck(&text).is_err());
        // A quote inside a flow plain scalar opens nothing.
        let text = format!("k: [a \"b, {}\n", "[".repeat(40));
        assert!(precheck(&text).is_err());
        // A block scalar ends where the indentation does.
        let text = format!("a:\n  k: |\n    \"\n  j: {}\n", "[".repeat(40));
        assert!(precheck(&text).is_err());
    }

    #[test]
    fn oversized_files_are_refused() {
        let text = "#".repeat(MAX_CONFIG_BYTES + 1);
        assert!(precheck(&text).unwrap_err().contains("at most 1048576"));
    }

    #[test]
    fn authority_rules() {
        let check = |a: &str| check_authority(a, a);
        assert_eq!(check("h:8008"), Ok(()));
        assert_eq!(check("[::1]:8008"), Ok(()));
        assert_eq!(check("[::1]"), Ok(()));
        assert_eq!(check("h"), Ok(()));
        assert!(check("h:99999").unwrap_err().contains("port \"99999\""));
        assert!(check("h:0").is_err());
        assert!(check("h:+80").is_err());
        assert!(check("h:").is_err());
        assert!(check("[::1").is_err());
        assert!(check("[nope]:1").is_err());
        assert!(check("u:p@h").unwrap_err().contains("tls.password_file"));
    }

    #[test]
    fn redaction_hides_user_information() {
        assert_eq!(
            redact("a \"http://user:s3cret@h:8008/x\" and https://h2 and http://u@h3"),
            "a \"http://***@h:8008/x\" and https://h2 and http://***@h3"
        );
        assert_eq!(redact("no urls"), "no urls");
        assert_eq!(redact("x http://u:pa/ss@h/p y"), "x http://***@h/p y");
        // A control character in the password, escaped by `{:?}` (found by
        // the config fuzz target): the escape is part of the password.
        let quoted = format!("{:?}", "http://u:s3cr\u{85}x:s3cret@h");
        assert_eq!(redact(&quoted), "\"http://***@h\"");
        assert_eq!(
            redact(r#"string "a \"http://u:p@h\" b""#),
            r#"string "a \"http://***@h\" b""#
        );
    }

    #[test]
    fn every_yaml_line_break_starts_a_line_for_the_nesting_lexer() {
        // Found by the config fuzz target: text after a CR (or NEL, LS, PS)
        // is a new line to libyaml, whose flow nesting then costs seconds;
        // the lexer took it for the rest of a plain scalar.
        let deep = "{".repeat(5_000);
        for br in ["\r", "\u{85}", "\u{2028}", "\u{2029}", "\r\n"] {
            let text = format!("&a{br}{deep}");
            let err = precheck(&text).unwrap_err();
            assert!(err.contains("nested more than"), "{br:?}: {err}");
            assert!(err.starts_with("line 2:"), "{br:?}: {err}");
        }
        let (depth, _) = flow_depth("a: b\r# {{{{{{{{{{\rc: [d]\r");
        assert_eq!(depth, 1, "a comment ends at a CR too");
    }

    #[test]
    fn a_quote_glued_to_a_dash_question_mark_or_colon_opens_no_quoted_scalar() {
        // libyaml reads `?'x`, `:'x` and `-'x` in block context as plain
        // scalars (the indicators need a blank after them), so the quote
        // opens nothing and the brackets on the next line nest (a fuzz
        // finding: 11 KB like this took libyaml 0.3 s, 34 KB 3.6 s).
        let deep = "[".repeat(9);
        for glued in ["?'''? ts:", ":'x", "-'x", "? a: ?'x"] {
            let text = format!("{glued}\nk: {deep}\n");
            assert!(precheck(&text).is_err(), "{glued:?}");
        }
        // A real indicator before a quote still opens it, and in flow
        // context `?` and `:` are indicators even when glued.
        assert!(precheck(&format!("? 'x\n{deep}'\n")).is_ok());
        assert!(precheck(&format!("- 'x {deep}'\n")).is_ok());
        assert!(precheck(&format!("k: {{\"a\":'{deep}'}}\n")).is_ok());
        assert!(precheck(&format!("k: [?'{deep}']\n")).is_ok());
    }

    #[test]
    fn a_tag_anchor_or_alias_does_not_hide_the_brackets_after_it() {
        // Found by the config fuzz target: `!tag [[[[...` is a tag, then a
        // flow sequence, which the lexer took for one plain scalar.
        let deep = "[".repeat(5_000);
        for property in ["!t", "!ut---", "&a", "*a", "!!seq"] {
            let text = format!("k:\n {property} {deep}");
            let err = precheck(&text).unwrap_err();
            assert!(err.contains("nested more than"), "{property}: {err}");
        }
        // A legitimate file with an anchor still passes.
        let ok = "clusters: &c\n  main: {hosts: [\"http://h:8008\"], ports: {rw: {listen: \"127.0.0.1:5000\", roles: [leader]}}}\n";
        assert_eq!(flow_depth(ok).0, 4);
        assert_eq!(precheck(ok), Ok(()));
    }
}
