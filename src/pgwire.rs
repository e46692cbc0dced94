//! Just enough of the PostgreSQL wire protocol's connection start-up to
//! retry a connection that the server refused because it is shutting down
//! or starting up (SQLSTATE 57P03), as a demoted leader does during a
//! switchover.
//!
//! PURE: byte slices in, answers out. The proxy stays a byte relay; these
//! two questions are asked only until the login completes or needs the
//! client:
//! - how many SSLRequest/GSSENCRequest packets did the client send (each
//!   gets a single-byte answer, `N` when refused, before the startup)?
//! - what is the server's first answer: a single `N`, the start of TLS/GSS
//!   (`S`/`G`: the rest is encrypted, stop looking), a refusal because the
//!   server is going away or not there yet (SQLSTATE 57P01 admin shutdown,
//!   57P02 crash shutdown, 57P03 cannot connect now), or anything else (stop
//!   looking)?

/// SSLRequest and GSSENCRequest codes (protocol.h: 1234.5679, 1234.5680).
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

/// Largest server answer examined; a longer first message is not a refusal.
pub const MAX_ANSWER_BYTES: usize = 4096;

/// What the client's bytes so far say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientStart {
    /// SSL/GSS encryption requests sent before the startup packet.
    pub encryption_requests: usize,
    /// Complete packets seen (encryption requests and the startup packet).
    /// A PostgreSQL server says nothing before the first one.
    pub packets: usize,
}

/// Reads the client's start-up packets; `None` when the bytes do not look
/// like a PostgreSQL client (then nothing is retried).
pub fn client_start(sent: &[u8]) -> Option<ClientStart> {
    let mut at = 0;
    let mut start = ClientStart {
        encryption_requests: 0,
        packets: 0,
    };
    while sent.len() >= at + 8 {
        let len = u32::from_be_bytes(sent[at..at + 4].try_into().ok()?) as usize;
        let code = u32::from_be_bytes(sent[at + 4..at + 8].try_into().ok()?);
        if !(8..=10_000).contains(&len) {
            return None;
        }
        if len == 8 && (code == SSL_REQUEST || code == GSSENC_REQUEST) {
            start.encryption_requests += 1;
            start.packets += 1;
            at += 8;
        } else {
            // A StartupMessage (or CancelRequest): nothing more to count.
            if sent.len() >= at + len {
                start.packets += 1;
            }
            return Some(start);
        }
    }
    Some(start)
}

/// The server's first answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Not enough bytes to tell.
    Incomplete,
    /// `N`: an encryption request was refused; a startup packet follows.
    NoEncryption,
    /// Anything else: relay it and stop looking (TLS or GSS beginning, an
    /// authentication request, another error, or not PostgreSQL at all).
    Other,
    /// An ErrorResponse saying the server is shutting down or starting up
    /// (SQLSTATE 57P01, 57P02, 57P03), with its message.
    GoingAway { message: String },
}

/// Classifies what the server said so far. `expect_single` is true while
/// the client has encryption requests without an answer yet.
///
/// A login that needs nothing from the client (trust, peer, certificate)
/// runs from AuthenticationOk through ParameterStatus and BackendKeyData to
/// ReadyForQuery; all of it is examined, so that a server killed in the
/// middle of it (57P01 during a shutdown) can still be replaced. An
/// authentication request that the client must answer, ReadyForQuery, or
/// anything else ends the examination (`Other`).
pub fn server_answer(reply: &[u8], expect_single: bool) -> Answer {
    let Some(&first) = reply.first() else {
        return Answer::Incomplete;
    };
    if expect_single {
        return if first == b'N' {
            Answer::NoEncryption
        } else {
            Answer::Other
        };
    }
    let mut at = 0;
    loop {
        let Some(&tag) = reply.get(at) else {
            return Answer::Incomplete;
        };
        if !matches!(tag, b'R' | b'S' | b'K' | b'N' | b'v' | b'E') {
            return Answer::Other; // ReadyForQuery, or not PostgreSQL
        }
        if reply.len() < at + 5 {
            return Answer::Incomplete;
        }
        let len = u32::from_be_bytes([reply[at + 1], reply[at + 2], reply[at + 3], reply[at + 4]])
            as usize;
        if !(4..MAX_ANSWER_BYTES).contains(&len) {
            return Answer::Other;
        }
        let end = at + 1 + len;
        if reply.len() < end {
            return Answer::Incomplete;
        }
        let body = &reply[at + 5..end];
        match tag {
            // AuthenticationOk: the login goes on without the client.
            b'R' if body.len() >= 4 && body[..4] == [0, 0, 0, 0] => {}
            // ParameterStatus, BackendKeyData, NoticeResponse,
            // NegotiateProtocolVersion.
            b'S' | b'K' | b'N' | b'v' => {}
            b'E' => return error_answer(body),
            _ => return Answer::Other,
        }
        at = end;
    }
}

fn error_answer(body: &[u8]) -> Answer {
    let (mut code, mut message) = ("", String::new());
    for field in body.split(|b| *b == 0) {
        match field.split_first() {
            Some((b'C', v)) => code = std::str::from_utf8(v).unwrap_or(""),
            Some((b'M', v)) => message = String::from_utf8_lossy(v).into_owned(),
            _ => {}
        }
    }
    if matches!(code, "57P01" | "57P02" | "57P03") {
        Answer::GoingAway { message }
    } else {
        Answer::Other
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn startup_packet() -> Vec<u8> {
        let body = b"\x00\x03\x00\x00user\x00postgres\x00database\x00postgres\x00\x00";
        let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        p.extend_from_slice(body);
        p
    }

    pub fn ssl_request() -> Vec<u8> {
        let mut p = 8u32.to_be_bytes().to_vec();
        p.extend_from_slice(&SSL_REQUEST.to_be_bytes());
        p
    }

    pub fn error_response(code: &str, msg: &str) -> Vec<u8> {
        let mut body = Vec::new();
        for (t, v) in [(b'S', "FATAL"), (b'C', code), (b'M', msg)] {
            body.push(t);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut m = vec![b'E'];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn counts_encryption_requests_before_the_startup() {
        let start = |e, p| {
            Some(ClientStart {
                encryption_requests: e,
                packets: p,
            })
        };
        assert_eq!(client_start(&[]), start(0, 0));
        assert_eq!(client_start(&startup_packet()), start(0, 1));
        assert_eq!(
            client_start(&startup_packet()[..20]),
            start(0, 0),
            "incomplete startup"
        );
        let mut both = ssl_request();
        both.extend(startup_packet());
        assert_eq!(client_start(&both), start(1, 2));
        assert_eq!(client_start(&ssl_request()), start(1, 1));
        assert_eq!(client_start(&ssl_request()[..5]), start(0, 0));
        assert_eq!(client_start(b"x"), start(0, 0), "too short to tell");
        assert_eq!(client_start(b"GET / HTTP/1.1\r\n"), None, "not PostgreSQL");
        assert_eq!(
            client_start(b"\x00\x00\x00\x02\x00\x00\x00\x00"),
            None,
            "length below 8"
        );
    }

    #[test]
    fn recognises_a_refusal_only_in_full() {
        let refusal = error_response("57P03", "the database system is shutting down");
        assert_eq!(server_answer(&refusal[..3], false), Answer::Incomplete);
        assert_eq!(
            server_answer(&refusal[..refusal.len() - 1], false),
            Answer::Incomplete
        );
        assert_eq!(
            server_answer(&refusal, false),
            Answer::GoingAway {
                message: "the database system is shutting down".into()
            }
        );
        let killed = error_response(
            "57P01",
            "terminating connection due to administrator command",
        );
        assert!(matches!(
            server_answer(&killed, false),
            Answer::GoingAway { .. }
        ));
        assert_eq!(
            server_answer(&error_response("28P01", "password"), false),
            Answer::Other
        );
        assert_eq!(server_answer(b"N", true), Answer::NoEncryption);
        assert_eq!(server_answer(b"S", true), Answer::Other, "TLS begins");
        assert_eq!(
            server_answer(b"node1\n", false),
            Answer::Other,
            "not PostgreSQL"
        );
        assert_eq!(server_answer(b"", false), Answer::Incomplete);
        assert_eq!(
            server_answer(b"E\x7f\xff\xff\xff", false),
            Answer::Other,
            "absurd length"
        );
    }

    #[test]
    fn a_login_without_client_interaction_is_examined_to_ready_for_query() {
        let ok = [b'R', 0, 0, 0, 8, 0, 0, 0, 0];
        let param = |k: &str, v: &str| {
            let body = format!("{k}\0{v}\0");
            let mut m = vec![b'S'];
            m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
            m.extend_from_slice(body.as_bytes());
            m
        };
        let ready = [b'Z', 0, 0, 0, 5, b'I'];
        assert_eq!(
            server_answer(&ok, false),
            Answer::Incomplete,
            "AuthenticationOk: more to come"
        );
        let mut login = ok.to_vec();
        login.extend(param("server_version", "15.18"));
        assert_eq!(server_answer(&login, false), Answer::Incomplete);
        let mut killed = login.clone();
        killed.extend(error_response(
            "57P01",
            "terminating connection due to administrator command",
        ));
        assert!(
            matches!(server_answer(&killed, false), Answer::GoingAway { .. }),
            "killed mid-login"
        );
        login.extend(ready);
        assert_eq!(
            server_answer(&login, false),
            Answer::Other,
            "ReadyForQuery ends it"
        );
        let md5 = [b'R', 0, 0, 0, 12, 0, 0, 0, 5, 1, 2, 3, 4];
        assert_eq!(
            server_answer(&md5, false),
            Answer::Other,
            "a password request needs the client"
        );
    }
}
