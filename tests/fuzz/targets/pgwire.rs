//! The PostgreSQL start-up parsers: the client's first packets and the
//! server's first answer. The first byte picks the side and flag.
use patroni_proxy::pgwire::{client_start, server_answer};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&sel, rest)) = data.split_first() else {
            return;
        };
        match sel % 3 {
            0 => {
                if let Some(s) = client_start(rest) {
                    assert!(s.encryption_requests <= s.packets);
                    assert!(s.packets * 8 <= rest.len());
                }
            }
            1 => {
                let _ = server_answer(rest, false);
            }
            _ => {
                let _ = server_answer(rest, true);
            }
        }
    });
}
