//! The admin HTTP request parser, on the whole input and on every prefix a
//! slow client could deliver it in; responses it rejects with must render.
use patroni_proxy::admin::{parse_request, Parse};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let whole = parse_request(data);
        if let Parse::Reject(resp) = &whole {
            let _ = resp.render();
        }
        // Bytes arrive in pieces: an early verdict must not contradict
        // what the whole says once it was final.
        let step = data.len() / 7 + 1;
        let mut end = step;
        while end < data.len() {
            if let Parse::Ok(r) = parse_request(&data[..end]) {
                assert_eq!(whole, Parse::Ok(r), "prefix {end} decided differently");
                break;
            }
            end += step;
        }
    });
}
