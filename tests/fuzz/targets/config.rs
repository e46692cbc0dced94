//! The configuration loader: YAML text to a validated config or problems.
//! Besides never panicking: no problem message shows a URL password.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        if let Err(problems) = patroni_proxy::config::parse(text) {
            for p in &problems {
                assert!(!p.contains("s3cret"), "password shown: {p}");
            }
        }
    });
}
