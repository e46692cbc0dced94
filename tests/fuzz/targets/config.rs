//! The configuration loader: YAML text to a validated config or problems.
//! Besides never panicking: when the password `s3cret` appears in the text
//! only as the user information of URLs, no problem message shows it.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        if let Err(problems) = patroni_proxy::config::parse(text) {
            if text.contains(PASSWORD) && only_in_urls(text) {
                for p in &problems {
                    assert!(!p.contains(PASSWORD), "password shown: {p}");
                }
            }
        }
    });
}

const PASSWORD: &str = "s3cret";

/// Every `s3cret` is `scheme://user:s3cret@…` within one YAML token, and
/// nothing is escaped (an escape could spell it elsewhere).
fn only_in_urls(text: &str) -> bool {
    if text.contains('\\') {
        return false;
    }
    text.match_indices(PASSWORD).all(|(i, _)| {
        // YAML 1.1 line breaks include NEL, LS and PS: a quoted scalar
        // folds them into a space, which ends a URL.
        const ENDS: [char; 12] = [
            ' ', '\t', '\n', '\r', '"', '\'', ',', '[', '{', '\u{85}', '\u{2028}', '\u{2029}',
        ];
        let token_start = text[..i]
            .char_indices()
            .rev()
            .find(|(_, c)| ENDS.contains(c))
            .map_or(0, |(j, c)| j + c.len_utf8());
        let before = &text[token_start..i];
        let after = &text[i + PASSWORD.len()..];
        after.starts_with('@')
            && before.split_once("://").is_some_and(|(scheme, user)| {
                !scheme.is_empty() && user.ends_with(':') && !user.contains(['/', '@'])
            })
    })
}
